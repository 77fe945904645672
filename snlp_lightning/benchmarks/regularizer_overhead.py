"""Training-step overhead of the SNLP regularizer against lambda 0, measured in one run.

    python -m snlp_lightning.benchmarks.regularizer_overhead                    # quickstart plain + mHC models
    python -m snlp_lightning.benchmarks.regularizer_overhead --preset plain --depth 32 --width 640 --heads 5 --device cuda

One timed step = zero_grad, ``SNLPModule.compute_losses`` (sequential forward keeping every state,
CE, the regularizer at full weight), backward, gradient clipping at 1.0, the optimizer step
(``--optimizer``, default torch's Muon + AdamW) and the LR-scheduler step: what Lightning runs per step, without its logging. Every variant has its own
copy of the model (same init) and optimizer, and the variants are timed interleaved, one step each
per round (order rotated every round), on the same batch, so background load hits all of them
alike. Overhead = median over rounds of (variant time / lambda-0 time in the same round) - 1.

Variants, with L the depth and N in {L/4, L/2, 3L/4}: lambda 0; IDN (plain) or HCN (mHC) with
``n_par_configs`` [L/4], [L/2], [3L/4] and [L/4, L/2, 3L/4]; DiagN with all three (``--diag``).
Regularizer settings follow the quickstart configs: lambda 0.5, stride 2, HCN with a detached target.

The regularizer's batched calls (the stacks it builds with ``model.stack`` and calls once each)
are counted during one extra step per variant: IDN / HCN should make one call per suffix config
(all N blocks of that config in one call), DiagN two (F(x) and the no-grad F(x + eps z)).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..config import make_config
from ..models.attention import set_cpu_kernel
from ..module import SNLPModule
from ..optim import OptimConfig, build_optimizer
from ..regularizer import RegularizerConfig
from snlp_lightning.errors import ArgumentParser

LAMBDA = 0.5
STRIDE = 2


@dataclass
class Variant:
    """One row of the table: a regularizer setting, its model and optimizer, its step times (s)."""

    name: str
    reg: RegularizerConfig
    expected_calls: int  # batched regularizer calls per step that the design promises
    module: SNLPModule | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    times: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)  # blocks per batched call, from the counted step


def suffix_sizes(n_layer: int) -> list[int]:
    """[L/4, L/2, 3L/4], rounded, each in 1..L-1: [2, 4, 6] for L = 8, [8, 16, 24] for L = 32."""
    return [min(max(round(n_layer * q / 4), 1), n_layer - 1) for q in (1, 2, 3)]


def make_variants(preset: str, n_layer: int, diag: bool) -> list[Variant]:
    quarters = suffix_sizes(n_layer)
    kind, lam = ("HCN", "lambda_hcn") if preset == "mhc" else ("IDN", "lambda_idn")
    detach = preset == "mhc"  # the quickstart mHC run detaches the HCN target
    variants = [Variant("lambda 0", RegularizerConfig(n_par_configs=quarters), 0)]
    for n_list in [[n] for n in quarters] + [quarters]:
        cfg = RegularizerConfig(**{lam: LAMBDA}, n_par_configs=n_list, stride=STRIDE, detach=detach)
        variants.append(Variant(f"{kind} {n_list}", cfg, len(n_list)))
    if diag:
        cfg = RegularizerConfig(lambda_diag=LAMBDA, n_par_configs=quarters, stride=STRIDE)
        variants.append(Variant(f"DiagN {quarters}", cfg, 2 * len(quarters)))
    return variants


@contextlib.contextmanager
def count_regularizer_calls(model, sink: list[int]):
    """Append G (blocks in the call) for every batched call of the regularizer during a step.

    The regularizer stacks its suffix blocks with ``model.stack`` and calls each stack once (the
    sequential trace goes through ``model.block``), so counting the stacks counts its calls.
    """
    original = model.stack

    def counting(groups, average_branches: bool = False):
        sink.append(len(groups))
        return original(groups, average_branches)

    model.stack = counting  # an instance attribute shadows the method for this model only
    try:
        yield sink
    finally:
        del model.stack


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(v: Variant, inputs: torch.Tensor, targets: torch.Tensor, step: int, amp: torch.dtype | None) -> None:
    """One full training step of variant v; inputs, targets: (B, T) token ids."""
    v.optimizer.zero_grad(set_to_none=True)
    weight = torch.ones((), device=inputs.device)
    with torch.autocast(inputs.device.type, dtype=amp) if amp else contextlib.nullcontext():
        loss = v.module.compute_losses(inputs, targets, weight, step)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(v.module.parameters(), 1.0)
    v.optimizer.step()
    v.scheduler.step()


def run(args: argparse.Namespace, preset: str) -> list[Variant]:
    """Build the model once, copy it into every variant, time the variants interleaved."""
    device = torch.device(args.device)
    cfg = make_config(
        preset, n_layer=args.depth, n_embd=args.width, n_head=args.heads, n_kv_head=args.heads,
        vocab_size=args.vocab, sequence_len=args.seq, window_pattern="L",
    )
    torch.manual_seed(args.seed)
    variants = make_variants(preset, args.depth, args.diag)
    base = SNLPModule(cfg, regularizer=variants[0].reg).to(device)
    rounds = args.warmup + args.steps + 1  # + 1: the counted step
    for v in variants:
        v.module = copy.deepcopy(base)
        v.module.regularizer = v.reg.validate(cfg)
        v.optimizer, v.scheduler = build_optimizer(v.module.model, OptimConfig(optimizer=args.optimizer), rounds)
    gen = torch.Generator().manual_seed(args.seed)
    amp = None if args.dtype == "float32" else getattr(torch, args.dtype)
    for r in range(rounds):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen).to(device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            if r == 0:
                with count_regularizer_calls(v.module.model, v.calls):
                    train_step(v, inputs, targets, r, amp)
                continue
            sync(device)
            start = time.perf_counter()
            train_step(v, inputs, targets, r, amp)
            sync(device)
            if r > args.warmup:
                v.times.append(time.perf_counter() - start)
    return variants


def format_table(variants: list[Variant]) -> str:
    """Markdown: config, median and min ms/step, overhead vs lambda 0, batched calls per step."""
    base = variants[0].times
    lines = [
        "| config | median ms/step | min ms/step | overhead vs lambda 0 | batched regularizer calls / step (blocks per call) |",
        "|---|---|---|---|---|",
    ]
    for v in variants:
        ratio = statistics.median(t / b for t, b in zip(v.times, base))
        calls = f"{len(v.calls)} ({', '.join(map(str, v.calls))})" if v.calls else "0"
        if len(v.calls) != v.expected_calls:
            calls += f" - expected {v.expected_calls}!"
        lines.append(
            f"| {v.name} | {1e3 * statistics.median(v.times):.1f} | {1e3 * min(v.times):.1f} | "
            f"{100 * (ratio - 1):+.1f}% | {calls} |"
        )
    return "\n".join(lines)


def cpu_name() -> str:
    """'CPU <model name>, <k> cores' from /proc/cpuinfo where there is one."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"CPU {model}, {os.cpu_count()} cores"


def header(args: argparse.Namespace, preset: str) -> str:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return (
        f"\n### {preset}: L = {args.depth}, d = {args.width}, {args.heads} heads, vocab {args.vocab}, "
        f"batch {args.batch} x {args.seq} tokens\n\n"
        f"device {name}, dtype {args.dtype}, optimizer {args.optimizer}, CPU attention {args.cpu_attention}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.steps} timed steps per config after {args.warmup} warm-up (+1 counted) steps, interleaved\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m snlp_lightning.benchmarks.regularizer_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", choices=["plain", "mhc"], default=["plain", "mhc"], help="model families (default: both)")
    p.add_argument("--depth", type=int, default=8, help="L (quickstart: 8)")
    p.add_argument("--width", type=int, default=128, help="n_embd (quickstart: 128)")
    p.add_argument("--heads", type=int, default=4, help="n_head = n_kv_head (quickstart: 4)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per config")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per config after the counted one")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="autocast dtype (float32: none)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--cpu-attention", choices=["math", "fast"], default="math",
                   help="CPU attention kernel (models/attention.py): math = the recorded numbers, fast = SDPA's flash kernel")
    p.add_argument("--optimizer", choices=["muon_adamw", "nanochat", "adamw"], default="muon_adamw",
                   help="optim.optimizer of every variant (nanochat: the authors' Muon, as the paper configs)")
    p.add_argument("--no-diag", dest="diag", action="store_false", help="skip the DiagN row (plain model)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, list[Variant]]:
    """Run every preset, print its table; returns preset -> variants (times in seconds)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_cpu_kernel(args.cpu_attention)
    results = {}
    for preset in args.preset:
        diag_args = argparse.Namespace(**{**vars(args), "diag": args.diag and preset == "plain"})
        variants = run(diag_args, preset)
        print(header(args, preset))
        print(format_table(variants), flush=True)
        results[preset] = variants
    return results


if __name__ == "__main__":
    from snlp_lightning.errors import run_entry

    run_entry("regularizer_overhead", main)
