"""Eager forward time of the sequential model and of solver plans, at the quickstart shape.

    python -m snlp_lightning.benchmarks.forward_speed [--threads 2] [--rounds 30]

Uses only the public API (``build_model``, ``snlp_forward``), so the same file can time another
checkout of the library: ``PYTHONPATH=/path/to/other/checkout python path/to/forward_speed.py``.
Prints the median ms per call of each case; the cases run interleaved, one call each per round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from snlp_lightning import build_model, snlp_forward

CASES = ("seq", "idn:n6:K1", "idn:n6:K2", "idn:n6:3xF2:K2")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="forward_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("plain", n_layer=8, n_embd=128, n_head=4, n_kv_head=4, vocab_size=4096, sequence_len=args.seq).eval()
    idx = torch.randint(0, 4096, (args.batch, args.seq))
    times: dict[str, list[float]] = {c: [] for c in CASES}
    with torch.no_grad():
        for r in range(args.rounds + 3):
            for case in CASES:
                start = time.perf_counter()
                model(idx) if case == "seq" else snlp_forward(model, idx, case)
                if r >= 3:  # warm-up rounds
                    times[case].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.seq}, L = 8, d = 128")
    for case in CASES:
        print(f"{case:>16}: {1e3 * statistics.median(times[case]):7.2f} ms")


if __name__ == "__main__":
    main()
