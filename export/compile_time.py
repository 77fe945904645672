"""Compile time of the compiled decoder steps against depth: ``python -m export.compile_time``.

For each depth L (one fresh process each, with an empty inductor cache, so nothing is reused
between depths or from an earlier run) a randomly initialised model of the preset at the size's
width is built, and for each mode and plan in order, in that one process (so a later plan may
reuse what an earlier one compiled):

- ``decode 1st``: wall time of the first compiled decode step (B, 1), compile included;
- ``verify 1st``: the first compiled ``verify`` step (prefill_exact over (B, --verify-len) tokens);
- ``graphs``: dynamo's count of graphs compiled so far in the process (all plans up to this one);
- ``decode ms`` / ``verify ms``: steady state, after every plan compiled: the median (and the
  minimum) of --iters rounds that call every step of every plan once each (round-robin: a slow
  spell of a shared machine lands on every row).

    python -m export.compile_time --layers 4 8 16 --plans seq idn:n{half}:{quarter}xF2:K1

``{half}`` and ``{quarter}`` in a plan stand for L // 2 and L // 4. Uses only the public API
(``compile_steps``), so the same script measures older commits. ``--modes whole`` compiles each
step as one graph (``regional=False``, what ``compile_steps`` did before regions); ``--modes whole
regional`` times both round-robin in one process (the compile times of the second mode may then
reuse kernels of the first: take those from separate runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def plan_for(template: str, layers: int) -> str:
    return template.format(half=layers // 2, quarter=layers // 4)


def measure_one(args) -> dict:
    """One depth, in this process: the rows of every plan."""
    import torch
    from torch._dynamo.utils import counters

    from export import LayerParallelDecoder
    from export.compiled import compile_steps, example_inputs
    from snlp_lightning import build_model, make_config

    torch.manual_seed(0)
    overrides = {key: int(value) if value.isdigit() else value for key, value in (kv.split("=", 1) for kv in args.set)}
    config = make_config(args.preset, size=args.size or None, **{**overrides, "n_layer": args.one})
    model = build_model(config).float().eval()
    counters.clear()
    rows, calls = [], {}

    def timed(fn, *inputs) -> float:
        start = time.perf_counter()
        fn(*inputs)
        return time.perf_counter() - start

    with torch.inference_mode():
        # 1. compile: the first call of each step, plan after plan.
        for template, mode in ((t, m) for m in args.modes for t in args.plans):
            plan = plan_for(template, args.one)
            decoder = LayerParallelDecoder(model, plan, batch_size=args.batch, max_seq_len=args.max_seq_len)
            # (compile_steps' own default for "default", so that the script also runs on older commits)
            steps = compile_steps(decoder) if mode == "default" else compile_steps(decoder, regional=mode == "regional")
            decode_in = example_inputs(decoder, 1, start=args.position)
            verify_in = example_inputs(decoder, args.verify_len, start=args.position)
            row = {"plan": str(decoder.plan), "mode": mode, "L": args.one}
            row["decode_first_s"] = timed(steps["decode"], *decode_in)
            row["verify_first_s"] = timed(steps["verify"], *verify_in)
            row["graphs"] = int(counters["stats"]["unique_graphs"])
            rows.append(row)
            calls[(len(rows) - 1, "decode")] = (steps["decode"], decode_in)
            calls[(len(rows) - 1, "verify")] = (steps["verify"], verify_in)
            print(json.dumps(row), file=sys.stderr, flush=True)
        # 2. steady state: every step once per round, --iters rounds (a slow spell hits all rows).
        times = {key: [] for key in calls}
        for round_ in range(args.iters + 2):
            for key, (step, inputs) in calls.items():
                elapsed = timed(step, *inputs)
                if round_ >= 2:
                    times[key].append(elapsed)
        for (i, name), values in times.items():
            rows[i][f"{name}_ms"] = 1e3 * statistics.median(values)
            rows[i][f"{name}_min_ms"] = 1e3 * min(values)
    return {"rows": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="nanochat")
    p.add_argument("--size", default="0.5b", help="one of PAPER_SIZES, or '' for the preset's own (tiny) size")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. n_embd=128")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--plans", nargs="+", default=["seq", "idn:n{half}:{quarter}xF2:K1"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--verify-len", type=int, default=5)
    p.add_argument("--position", type=int, default=16, help="position of the timed tokens")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--modes", nargs="+", default=["default"], choices=["default", "regional", "whole"],
                   help="compile_steps(decoder) as called (default), with regional=True, or regional=False (each step one graph)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one depth, this process
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure_one(args)))
        return
    rows = []
    for layers in args.layers:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            cmd = [sys.executable, "-m", "export.compile_time", *(argv if argv is not None else sys.argv[1:]), "--one", str(layers)]
            out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
            rows += json.loads(out.strip().splitlines()[-1])["rows"]
    header = "| L | plan | mode | decode 1st (s) | verify 1st (s) | graphs | decode ms (min) | verify ms (min) |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['L']} | {r['plan']} | {r['mode']} | {r['decode_first_s']:.1f} | {r['verify_first_s']:.1f} | {r['graphs']} | "
                     f"{r['decode_ms']:.1f} ({r['decode_min_ms']:.1f}) | {r['verify_ms']:.1f} ({r['verify_min_ms']:.1f}) |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
