"""Regularized training step, ours against the authors' model code, same weights, same losses.

    python -m snlp_lightning.benchmarks.vs_authors --authors /path/to/nanochat-snlp [--rounds 30]

Imports ``nanochat/gpt.py`` from a checkout of the authors' fork (phymhan/nanochat-snlp; nothing
of it is copied here), builds their model at the quickstart shape ("w/o x0ve": no lambdas, no value
embeddings, window L; L = 8, d = 128, 4 heads, vocab 4096, batch 16 x 128), loads its weights
into ours, and checks that both give the same CE and the same regularized loss (IDN, lambda 0.5,
N = [2, 4, 6], stride 2) before timing anything. One timed call = zero_grad, forward with the loss,
backward: the model's own work, no optimizer (theirs and ours differ there, and an optimizer step
in the denominator lowers a ratio without changing the regularizer's cost). The four cases run
interleaved, one call each per round; medians over rounds.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import torch

from ..models.attention import set_cpu_kernel
from ..models.nanochat_io import load_nanochat
from ..module import SNLPModule
from ..regularizer import RegularizerConfig
from ..errors import ArgumentParser, UserError

SHAPE = dict(sequence_len=128, vocab_size=4096, n_layer=8, n_head=4, n_kv_head=4, n_embd=128)
N_PAR, STRIDE, LAMBDA = [2, 4, 6], 2, 0.5


def authors_model(path: str, seed: int):
    """Their GPT at the quickstart shape, weights drawn by their init then perturbed (so no block is the identity)."""
    sys.path.insert(0, path)
    try:
        from nanochat.gpt import GPT, GPTConfig
    except ImportError as err:
        raise UserError(f"--authors {path} is not a nanochat-snlp checkout (nanochat/gpt.py): {err}") from None
    cfg = GPTConfig(**SHAPE, no_x0_resid=True, no_ve=True, window_pattern="L")
    model = GPT(cfg)
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "wte" not in name:  # zero-initialised projections too
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 * p.size(-1) ** -0.5)
    model.n_par_configs, model.idn_stride = N_PAR, STRIDE
    return model, dataclasses.asdict(cfg)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = ArgumentParser(prog="python -m snlp_lightning.benchmarks.vs_authors", description=__doc__.split("\n\n")[0])
    p.add_argument("--authors", required=True, help="a checkout of phymhan/nanochat-snlp")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds (after 3 untimed)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cpu-attention", choices=["math", "fast"], default="math")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_cpu_kernel(args.cpu_attention)
    theirs, their_config = authors_model(args.authors, args.seed)
    state = {"_orig_mod." + k: v for k, v in theirs.state_dict().items()}
    ours = {}
    for name, reg in (("ours, lambda 0", RegularizerConfig()),
                      ("ours, IDN", RegularizerConfig(lambda_idn=LAMBDA, n_par_configs=N_PAR, stride=STRIDE))):
        module = SNLPModule(load_nanochat(state, their_config).config, regularizer=reg)
        module.model.load_state_dict(load_nanochat(state, their_config).state_dict())
        ours[name] = module
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, SHAPE["vocab_size"], (16, SHAPE["sequence_len"] + 1), generator=gen)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    one = torch.ones(())

    def theirs_step(lam: float):
        theirs.zero_grad(set_to_none=True)
        loss = theirs(x, y, identity_newton_reg=lam)
        loss.backward()
        return loss.detach()

    def ours_step(module):
        module.zero_grad(set_to_none=True)
        loss = module.compute_losses(x, y, one, 0)["loss"]
        loss.backward()
        return loss.detach()

    cases = {
        "theirs, lambda 0": lambda: theirs_step(0.0),
        "theirs, IDN": lambda: theirs_step(LAMBDA),
        "ours, lambda 0": lambda: ours_step(ours["ours, lambda 0"]),
        "ours, IDN": lambda: ours_step(ours["ours, IDN"]),
    }
    losses = {name: float(run()) for name, run in cases.items()}
    for kind in ("lambda 0", "IDN"):
        a, b = losses[f"theirs, {kind}"], losses[f"ours, {kind}"]
        if abs(a - b) > 1e-4 * abs(a):
            raise UserError(f"the two models disagree ({kind}: loss {a} theirs, {b} ours): nothing to compare")
    times = {name: [] for name in cases}
    for r in range(args.rounds + 3):
        order = list(cases.items())
        order = order[r % 4:] + order[: r % 4]
        for name, run in order:
            start = time.perf_counter()
            run()
            if r >= 3:
                times[name].append(time.perf_counter() - start)
    med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU attention {args.cpu_attention}, "
          f"{args.rounds} rounds; IDN lambda {LAMBDA}, N = {N_PAR}, stride {STRIDE}; losses equal to 1e-4")
    print("| model | lambda 0: ms | IDN: ms | IDN / lambda 0 | regularizer's own ms |")
    print("|---|---|---|---|---|")
    for who in ("theirs", "ours"):
        base, reg = med[f"{who}, lambda 0"], med[f"{who}, IDN"]
        print(f"| {who} | {base:.1f} | {reg:.1f} | {reg / base:.2f}x | {reg - base:.1f} |")
    return med


if __name__ == "__main__":
    from snlp_lightning.errors import run_entry

    run_entry("vs_authors", main)
