"""``snlp demo`` (alias ``snlp-demo``): build small models of each family and print how every solver
plan compares with the sequential model (logit error, top-1 agreement, cosine, residual, ideal
speedup, CPU time).

    snlp demo                                   # every family, the default plans, L = 8
    snlp demo --preset mhc --plans hcn:n6:K2 idn:n6:3xF2:K2

Untrained nanochat blocks are exactly the identity (zero output projections), which would make
every plan trivially exact, so the demo draws the output projections at the scale of the input
projections: a stand-in for trained weights, not a trained model. For real checkpoints see the
README.
"""

from __future__ import annotations

import time

import torch

from . import build_model
from .metrics import compare_logits
from .models import GPT
from .solvers import SolverPlan, snlp_solve
from .errors import ArgumentParser, at_least, run_entry

DEFAULT_PLANS = [
    "fixed:n6:K2", "idn:n6:K1", "idn:n6:K2", "damped:n6:K2:kappa=0.5", "diagn:n6:K2",
    "idn:n6:3xF2:K1", "idn:n6:3xF2:K2", "newton:n6:K2", "idn:n6:K6",
]
MHC_PLANS = ["hcn:n6:K1", "hcn:n6:K2", "hcn:n6:3xF2:K2"]
PROG = "snlp-demo"  # the alias's name; ``snlp demo`` passes its own


@torch.no_grad()
def untrained_with_live_blocks(preset: str, layers: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    model = build_model(preset, n_layer=layers, n_embd=128, n_head=4, n_kv_head=4, vocab_size=512, sequence_len=64)
    for block in model.transformer.h:
        for weight in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
            torch.nn.init.uniform_(weight, -(3 / weight.size(1)) ** 0.5, (3 / weight.size(1)) ** 0.5)
    return model.eval()


def run(preset: str, layers: int, plans: list[str], seed: int) -> str:
    model = untrained_with_live_blocks(preset, layers, seed)
    tokens = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        start = time.perf_counter()
        reference = model(tokens)
        seq_ms = (time.perf_counter() - start) * 1e3
        rows = [f"| seq | 1.00 | 0 | 1.000 | 1.0000 | - | {seq_ms:.1f} |"]
        for text in plans:
            plan = SolverPlan.parse(text)
            if plan.method == "hcn" and not model.config.use_mhc:
                continue
            start = time.perf_counter()
            result = snlp_solve(model, tokens, plan, residuals=True, generator=torch.Generator().manual_seed(seed))
            ms = (time.perf_counter() - start) * 1e3  # includes the residual bookkeeping
            m = compare_logits(reference, result.logits)
            rows.append(
                f"| {plan} | {plan.ideal_speedup(layers):.2f} | {m['max_abs']:.2e} | {m['top1']:.3f} | "
                f"{m['cosine']:.4f} | {result.residuals[-1]:.2e} | {ms:.1f} |"
            )
    header = (
        f"\n### {preset}: L={layers}, d=128, batch 4 x 64 tokens, float32, CPU eager\n\n"
        "| plan | ideal speedup | max abs dlogit | top-1 agree | cosine | final residual | ms |\n"
        "|---|---|---|---|---|---|---|"
    )
    return "\n".join([header, *rows])


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    """The command (``prog`` names it in --help and error lines: ``snlp demo`` under ``snlp``)."""
    run_entry(prog, _main, argv, prog)


def _main(argv: list[str] | None, prog: str = PROG) -> None:
    parser = ArgumentParser(prog=prog, description="Build small models of each family and print how every solver plan "
                            "compares with the sequential model (logit error, top-1 agreement, cosine, residual, "
                            "ideal speedup, CPU time).")
    parser.add_argument("--preset", default="all", choices=["all", "plain", "nanochat", "mhc", "mhc-dynamic"])
    parser.add_argument("--layers", type=at_least(1), default=8)
    parser.add_argument("--plans", nargs="+", default=None, help="plan strings, e.g. idn:n6:3xF2:K2 (hcn plans run on mHC presets)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed {args.seed} is not allowed: an integer in 0 .. 2**63 - 1")
    if args.plans and args.preset in ("plain", "nanochat") and any(SolverPlan.parse(p).method == "hcn" for p in args.plans):
        parser.error(f"hcn plans need an mHC model: use --preset mhc, mhc-dynamic or all (--preset {args.preset} has none)")
    if args.plans is None and args.layers < 6:
        parser.error(f"--layers {args.layers}: the default plans solve N = 6 blocks, so they need --layers >= 6; or pass --plans")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    presets = ["plain", "nanochat", "mhc", "mhc-dynamic"] if args.preset == "all" else [args.preset]
    for preset in presets:
        plans = args.plans or DEFAULT_PLANS + (MHC_PLANS if preset.startswith("mhc") else [])
        print(run(preset, args.layers, plans, args.seed), flush=True)


if __name__ == "__main__":
    main()
