"""``snlp bench`` (alias ``snlp-bench``): layer-parallel vs sequential, side by side in one process.

    snlp bench --checkpoint runs/quickstart/checkpoints/last.ckpt --data-dir data/bundled \\
        --plans idn:n4:K1 idn:n6:K2 idn:n6:3xF2:K1 --out bench/quickstart
    snlp bench --preset plain --size 0.5b --device cuda --dtype bfloat16 --plans idn:n24:4xF6:K2 --no-quality
    snlp bench --checkpoint ... --data-dir ... --sweep --budget 0.05

Sections (all in the same process, so the ratios share the machine's state):
1. full forward of (1, T) tokens, T in --lengths: sequential eager and compiled, each plan compiled;
   ms (median of --iters after --warmup), speedup vs sequential compiled, the ideal L / (S + K)
   and the fraction of it reached;
2. decode tokens/s at each --decode-batches: sequential eager, sequential compiled, each plan
   compiled, self-speculative (drafts from --speculative-plan, verified exactly; in float32 /
   float64 its output is checked identical to sequential greedy, in bfloat16 / float16, where the
   batched verification rounds differently, its agreement with it and the first divergence are
   reported instead: ``exactness_note``);
3. quality per plan on the validation split: PPL, top-1 agreement and logit cosine vs sequential;
4. --sweep: a grid of plans, the Pareto front of speedup vs PPL and the fastest plan within
   --budget (relative PPL increase over sequential).
Writes bench.md, bench.json and speedup_vs_ppl.png to --out (nothing else there is touched; every
value, the data and the folder are checked before any timing starts).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

from snlp_lightning import compat
from snlp_lightning.errors import (
    ArgumentParser, Fault, UserError, at_least, atomic_write_text, check_writable_parent, clean_stale_temps, path_kind, require_dir, save_figure,
    run_entry,
)
from snlp_lightning.solvers import SolverPlan
from snlp_lightning.solvers.plan import INITS

from .compiled import compile_step, compile_steps, example_inputs, no_recompiles, warm_up
from .decoder import DECODER_METHODS, LayerParallelDecoder
from .generate import generate_tokens, speculative_tokens
from .measure import interleaved_ms, quality, time_ms, validation_windows

PROG = "snlp-bench"
BENCH_FILES = ("bench.md", "bench.json", "speedup_vs_ppl.png")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description="Layer-parallel vs sequential: speed and quality.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a .ckpt from snlp fit, or a nanochat checkpoint")
    src.add_argument("--preset", help="random weights of a preset instead (plain, nanochat, mhc, mhc-dynamic)")
    p.add_argument("--size", default=None, help="with --preset: a paper size (0.5b, 3b)")
    p.add_argument("--plans", nargs="*", default=[], help="solver plans to measure")
    p.add_argument("--data-dir", default=None, help="prepared data (its val split gives the PPL); none = no quality")
    p.add_argument("--out", default="bench", help="output folder (bench.md, bench.json and speedup_vs_ppl.png are written there)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--lengths", type=at_least(1), nargs="+", default=[128, 2048], help="full-forward lengths T (capped at the model's)")
    p.add_argument("--warmup", type=at_least(0), default=50)
    p.add_argument("--iters", type=at_least(1), default=150)
    p.add_argument("--decode-batches", type=at_least(1), nargs="+", default=[1, 8])
    p.add_argument("--decode-tokens", type=at_least(1), default=64)
    p.add_argument("--prompt-len", type=at_least(1), default=16)
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed generations per decode row (median), one per round")
    p.add_argument("--speculative-plan", default=None, help="drafting plan (default: the first plan)")
    p.add_argument("--draft-len", type=at_least(1), default=4)
    p.add_argument("--val-tokens", type=at_least(1), default=32768)
    p.add_argument("--sweep", action="store_true", help="also measure a grid of plans and pick the fastest within --budget")
    p.add_argument("--sweep-fuse", type=at_least(1), nargs="+", default=[1, 2])
    p.add_argument("--sweep-iters", type=at_least(1), nargs="+", default=[1, 2])
    p.add_argument("--sweep-inits", nargs="+", default=["h0"], choices=INITS)
    p.add_argument("--budget", type=at_least(0.0, float), default=0.05, help="sweep: allowed relative PPL increase over sequential")
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--runtimes", action="store_true",
                   help="also decode seq and every plan with each runtime (eager, torch.compile, AOTInductor package) "
                        "at batch 1, against the fastest sequential runtime and the weight-streaming floor (builds a package per plan)")
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command (``prog`` names it in --help and error lines: ``snlp bench`` under ``snlp``)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(prog).parse_args(argv)

    def bench() -> None:
        compat.raise_dynamo_limits()  # every plan recompiles the decoder's step (global: set here, at entry)
        print(run(args, command=f"{prog} " + " ".join(argv)))

    return run_entry(prog, bench)


def _settings(args) -> tuple[torch.device, torch.dtype]:
    from .checkpoint import parse_device, parse_dtype

    if args.size and not args.preset:
        raise UserError(f"--size {args.size} applies only to --preset (a checkpoint has its own size)")

    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def _load(args, device):
    from .checkpoint import load_model

    if args.checkpoint:
        model, _ = load_model(args.checkpoint)
    else:
        from snlp_lightning import build_model

        torch.manual_seed(0)
        model = build_model(args.preset, args.size)
    return model.to(device).eval()


def _is_bench_json(path: Path) -> bool:
    """An earlier bench.json of this command (which it may replace)."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(results, dict) and {"header", "full", "decode", "quality"} <= set(results)
            and isinstance(results["header"], dict) and "command" in results["header"])


def check_bench_out(path: str | Path) -> Path:
    """``--out`` is a folder (or can be made) where snlp-bench may write its three files: it is never
    a file, and a bench.json, bench.md or speedup_vs_ppl.png there is replaced only when the
    bench.json is this command's own (the rest of the folder is never touched)."""
    out = Path(path).expanduser()
    kind = path_kind(out)
    if kind == "missing":
        check_writable_parent(out, "--out")
        return out
    if kind != "a folder":
        raise UserError(f"--out {out} is {kind}, not a folder: give a folder for {', '.join(BENCH_FILES)}")
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out} is not writable (permission denied)")
    clean_stale_temps(out)  # the temporaries of a bench that died while writing
    for name in BENCH_FILES:
        if path_kind(out / name) not in ("missing", "a file"):
            raise UserError(f"--out {out} holds {name} as {path_kind(out / name)}, where snlp-bench writes a file: choose another folder")
    if (out / "bench.json").exists():
        if not _is_bench_json(out / "bench.json"):
            raise UserError(f"--out {out} holds a bench.json that snlp-bench did not write: choose another folder (nothing was replaced)")
    else:
        theirs = [name for name in BENCH_FILES if (out / name).exists()]
        if theirs:
            raise UserError(f"--out {out} holds {', '.join(theirs)} but no bench.json of snlp-bench: "
                            "choose another folder (nothing was replaced)")
    return out


def _windows(data_dir: str, seq_len: int, max_tokens: int, vocab_size: int):
    """The validation windows, read before any timing so that a bad --data-dir fails at once."""
    folder = require_dir(data_dir, "--data-dir", "give a folder prepared by snlp-prepare")
    try:
        windows = validation_windows(folder, seq_len, max_tokens)
    except FileNotFoundError as err:
        raise UserError(f"--data-dir {folder}: {str(err).splitlines()[0]}") from None
    top = int(windows.max())
    if top >= vocab_size:
        raise UserError(f"--data-dir {folder} holds token id {top}, beyond the model's vocabulary of {vocab_size}: "
                        "it was prepared with another tokenizer")
    return windows


def sweep_plans(n_layer: int, mhc: bool, fuses, iters, inits) -> list[SolverPlan]:
    """IDN (and HCN for mHC) at N in {L/4, L/2, 3L/4} x fusion M x K x init, every combination that
    fits (M divides N, and K <= C = N / M: more iterations than chunks change nothing)."""
    plans = []
    for n in sorted({max(1, n_layer // 4), max(1, n_layer // 2), max(1, 3 * n_layer // 4)}):
        for m in fuses:
            if n % m:
                continue
            for k in (k for k in iters if k <= n // m):
                for init in inits:
                    for method in ("idn", "hcn") if mhc else ("idn",):
                        fusion = f":{n // m}xF{m}" if m > 1 else ""
                        plans.append(SolverPlan.parse(f"{method}:n{n}{fusion}:K{k}:{init}"))
    return plans


def run(args, command: str = "(python API)") -> str:
    # Every check first (settings, output folder, model, plans, lengths, validation data): a bad
    # value fails at once, never after minutes of timing.
    device, dtype = _settings(args)
    out = check_bench_out(args.out)
    model = _load(args, device)
    cfg = model.config
    plans = [SolverPlan.parse(p).validate(cfg) for p in args.plans]
    swept = sweep_plans(cfg.n_layer, cfg.use_mhc, args.sweep_fuse, args.sweep_iters, args.sweep_inits) if args.sweep else []
    timed = list(dict.fromkeys(p for p in plans + swept if p.method in DECODER_METHODS))
    skipped = [str(p) for p in plans if p.method not in DECODER_METHODS]
    lengths = sorted({min(t, cfg.sequence_len) for t in args.lengths})
    if not args.no_decode:
        _check_decode(args, cfg, [p for p in plans if p.method in DECODER_METHODS])
    elif args.speculative_plan:
        raise UserError("--speculative-plan drafts in the decode section, which --no-decode skips: drop one of them")
    windows = None
    if args.data_dir and not args.no_quality:
        windows = _windows(args.data_dir, min(cfg.sequence_len, lengths[0]), args.val_tokens, cfg.vocab_size)

    results = {"header": header(model, device, dtype, args, command), "full": [], "decode": [], "quality": {}, "skipped_timing": skipped}
    try:
        for length in lengths:
            results["full"] += full_forward(model, timed, length, device, dtype, args)
            print(f"full forward T={length}: done", file=sys.stderr)
        if not args.no_decode:
            for batch in args.decode_batches:
                # Swept plans are ranked by the full forward; decode rows are for the named plans.
                results["decode"] += decode_rows(model, [p for p in plans if p.method in DECODER_METHODS], batch, device, dtype, args)
                print(f"decode batch {batch}: done", file=sys.stderr)
        if args.runtimes:
            results["runtimes"] = runtime_rows(model, [p for p in plans if p.method in DECODER_METHODS], device, dtype, args)
            print("runtimes: done", file=sys.stderr)
        if windows is not None:
            results["quality"] = quality(model.float(), windows, list(dict.fromkeys(plans + swept)))
            results["quality_tokens"] = int(windows[:, 1:].numel())
    except torch.OutOfMemoryError:
        raise Fault(f"out of memory on {device}: use shorter --lengths, smaller --decode-batches or --dtype bfloat16") from None
    if swept:
        results["sweep"] = choose(results, swept, lengths[0], args.budget)
    report = markdown(results, cfg.n_layer)
    write_outputs(out, results, report, lengths[0])
    return report


def _check_decode(args, cfg, plans) -> None:
    """The decode section's lengths and drafting plan, checked before any timing."""
    room = args.prompt_len + args.decode_tokens + args.draft_len + 2
    if room > cfg.sequence_len:
        raise UserError(f"--prompt-len {args.prompt_len} + --decode-tokens {args.decode_tokens} + --draft-len {args.draft_len} "
                        f"+ 2 = {room} exceeds the model's sequence_len={cfg.sequence_len} (or pass --no-decode)")
    if args.speculative_plan:
        plan = SolverPlan.parse(args.speculative_plan).validate(cfg)
        if plan.method not in DECODER_METHODS:
            raise UserError(f"--speculative-plan {args.speculative_plan!r} cannot draft: the decoder serves methods "
                            f"{', '.join(DECODER_METHODS)}")


def write_outputs(out: Path, results: dict, report: str, length: int) -> None:
    """bench.md, speedup_vs_ppl.png (when there is quality) and bench.json, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.md", report + "\n")
    png = out / "speedup_vs_ppl.png"
    if results["quality"]:
        plot(results, length, png)
    else:
        png.unlink(missing_ok=True)  # an earlier run's plot would not belong to these results
    atomic_write_text(out / "bench.json", json.dumps(results, indent=2) + "\n")


def header(model, device, dtype, args, command: str) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    cfg = model.config
    return {
        "command": command,
        "device": f"{device.type}: {name}",
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "model": f"L={cfg.n_layer} d={cfg.n_embd} heads={cfg.n_head} mhc={cfg.use_mhc} vocab={cfg.vocab_size}",
        "source": args.checkpoint or f"random weights, preset {args.preset} {args.size or ''}".strip(),
        "warmup": args.warmup,
        "iters": args.iters,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _regional(device: torch.device) -> bool:
    """Regional compilation where steps replay as CUDA graphs; on a CPU each step is one graph, so
    the timings compare the plans' arithmetic, not the Python between regions (export.compiled)."""
    return device.type == "cuda"


def full_forward(model, plans, length, device, dtype, args) -> list[dict]:
    """(1, T) forward: the exact model (eager and compiled) and each plan's solver over all T positions.
    The compiled rows are timed round-robin (measure.interleaved_ms)."""
    make = lambda plan: LayerParallelDecoder(model, plan, batch_size=1, max_seq_len=length, dtype=dtype, device=device)  # noqa: E731
    seq = make("seq")
    decoders = {str(plan): make(plan) for plan in plans}
    with torch.inference_mode():  # inputs made here too: compiled graphs guard on inference-mode tensors
        inputs = example_inputs(seq, length)
        eager_ms = time_ms(partial(seq.prefill_exact, *inputs), device, max(args.warmup // 10, 1), max(args.iters // 5, 3))
        regional = _regional(device)
        steps = {"seq": (compile_step(seq, "prefill_exact", regional=regional), seq)}
        steps.update({name: (compile_step(d, "decode", regional=regional), d) for name, d in decoders.items()})
        for step, decoder in steps.values():
            warm_up(step, decoder, tokens=length)
        with no_recompiles():
            ms = interleaved_ms({name: partial(step, *inputs) for name, (step, _) in steps.items()}, device, args.warmup, args.iters)
    rows = [dict(plan="seq (eager)", T=length, ms=eager_ms, speedup=ms["seq"] / eager_ms, ideal=1.0)]
    rows.append(dict(plan="seq", T=length, ms=ms["seq"], speedup=1.0, ideal=1.0))
    for plan in plans:
        rows.append(dict(plan=str(plan), T=length, ms=ms[str(plan)], speedup=ms["seq"] / ms[str(plan)],
                         ideal=plan.ideal_speedup(model.config.n_layer)))
    del steps, decoders, seq
    _release()
    return rows


def decode_rows(model, plans, batch, device, dtype, args) -> list[dict]:
    """tokens/s of greedy generation (prefill of --prompt-len included, one per run); the compiled
    modes are timed round-robin, one generation of each per round, --repeats rounds."""
    new, prompt_len = args.decode_tokens, args.prompt_len
    room = prompt_len + new + args.draft_len + 2
    if room > model.config.sequence_len:
        raise UserError(f"--prompt-len {prompt_len} + --decode-tokens {new} + drafts exceed sequence_len={model.config.sequence_len}")
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(1, model.config.vocab_size, (batch, prompt_len), generator=g).tolist()
    make = lambda plan: LayerParallelDecoder(model, plan, batch_size=batch, max_seq_len=room, dtype=dtype, device=device)  # noqa: E731
    spec_plan = str(SolverPlan.parse(args.speculative_plan)) if args.speculative_plan else (str(plans[0]) if plans else None)
    decoders = {"seq": make("seq"), **{str(plan): make(plan) for plan in plans}}
    outputs: dict[str, object] = {}

    def keep(name: str, run):  # a timed run that also keeps what it generated
        return lambda: outputs.__setitem__(name, run())

    with torch.inference_mode():
        eager_ms = time_ms(keep("eager", partial(generate_tokens, decoders["seq"], prompts, new)), device, 0, args.repeats)
        compiled = {name: compile_steps(decoder, regional=_regional(device)) for name, decoder in decoders.items()}
        runs = {}
        for name, decoder in decoders.items():
            warm_up(compiled[name]["decode"], decoder)
            runs[name] = keep(name, partial(generate_tokens, decoder, prompts, new, steps=compiled[name]))
        if spec_plan:
            # A drafting plan that is also timed reuses that plan's decoder and compiled steps.
            drafter = decoders[spec_plan] if spec_plan in decoders else make(spec_plan)
            steps = compiled[spec_plan] if spec_plan in compiled else compile_steps(drafter, regional=_regional(device))
            if spec_plan not in compiled:
                warm_up(steps["decode"], drafter)
            warm_up(steps["verify"], drafter, tokens=args.draft_len + 1)
            runs["speculative"] = keep("speculative", partial(speculative_tokens, drafter, prompts, new, args.draft_len, steps=steps))
        with no_recompiles():
            ms = interleaved_ms(runs, device, 0, args.repeats, args.repeats)
    tps = {name: batch * new / (value / 1e3) for name, value in {**ms, "eager": eager_ms}.items()}
    rows = [dict(mode="seq (eager)", batch=batch, tokens_per_s=tps["eager"], vs_seq=tps["eager"] / tps["seq"], note="")]
    rows.append(dict(mode="seq (compiled)", batch=batch, tokens_per_s=tps["seq"], vs_seq=1.0, note=""))
    for plan in plans:
        rows.append(dict(mode=f"{plan} (compiled)", batch=batch, tokens_per_s=tps[str(plan)], vs_seq=tps[str(plan)] / tps["seq"], note=""))
    if spec_plan:
        tokens, stats = outputs["speculative"]
        same = exactness_note(tokens, outputs["eager"], dtype)
        note = f"drafts {spec_plan}, D={args.draft_len}, {stats.mean_accepted:.2f} accepted/round, {same}"
        rows.append(dict(mode="self-speculative (compiled)", batch=batch, tokens_per_s=tps["speculative"],
                         vs_seq=tps["speculative"] / tps["seq"], note=note))
    del runs, compiled, decoders
    _release()
    return rows


EXACT_DTYPES = (torch.float32, torch.float64)  # where K = C / exact verification reproduces sequential tokens


def exactness_note(tokens, reference, dtype: torch.dtype) -> str:
    """How greedy tokens (one list per row) compare with the sequential greedy ``reference``.

    float32 / float64: exact verification reproduces the sequential tokens, so the note is an
    identity check ("identical to seq greedy" or "DIFFERS from seq greedy"). Lower precisions
    (bfloat16, float16): the batched verification and the sequential step round differently, so
    equality is not expected; the note gives the agreement (the fraction of equal tokens, position
    by position; a missing token counts as unequal) and the first token index where any row differs.
    """
    if dtype in EXACT_DTYPES:
        return "identical to seq greedy" if tokens == reference else "DIFFERS from seq greedy"
    name = str(dtype).removeprefix("torch.")
    total = equal = 0
    first = None
    for row, ref in zip(tokens, reference):
        total += max(len(row), len(ref))
        for i in range(max(len(row), len(ref))):
            same = i < len(row) and i < len(ref) and row[i] == ref[i]
            equal += same
            if not same and (first is None or i < first):
                first = i
    agreement = equal / total if total else 1.0
    where = "no divergence" if first is None else f"first divergence at token {first}"
    return f"{name}: {agreement:.3f} agreement with seq greedy, {where} (agreement, not identity, in {name})"


def choose(results: dict, swept: list[SolverPlan], length: int, budget: float) -> dict:
    """Pareto front (speedup up, PPL down) over the swept plans and the fastest within the budget."""
    speed = {r["plan"]: r["speedup"] for r in results["full"] if r["T"] == length}
    qual = results["quality"]
    seq_ppl = qual.get("seq", {}).get("ppl")
    points = [(str(p), speed[str(p)], qual.get(str(p), {}).get("ppl")) for p in swept if str(p) in speed]
    if seq_ppl is None:
        return {"note": "no validation data: pass --data-dir to rank plans by PPL", "points": points}
    front = [a for a in points if not any(b[1] >= a[1] and b[2] <= a[2] and b != a for b in points)]
    within = [p for p in points if p[2] <= seq_ppl * (1 + budget)]
    best = max(within, key=lambda p: p[1]) if within else None
    return {"budget": budget, "seq_ppl": seq_ppl, "front": sorted(front, key=lambda p: -p[1]), "best": best}


def markdown(results: dict, n_layer: int) -> str:
    h = results["header"]
    lines = [
        "# snlp-bench", "",
        f"- command: `{h['command']}`", f"- device: {h['device']} ({h['cpu_count']} CPU cores, {h['threads']} torch threads)",
        f"- dtype {h['dtype']}, torch {h['torch']}, {h['date']}", f"- model: {h['model']} ({h['source']})",
        f"- timing: median of {h['iters']} runs after {h['warmup']} warm-ups; compiled = torch.compile fullgraph"
        + (" + CUDA graphs" if h["device"].startswith("cuda") else " (inductor C++)"), "",
        "## Full forward, batch 1", "",
        "| plan | T | ms | speedup vs seq compiled | ideal L/(S+K) | fraction of ideal |", "|---|---|---|---|---|---|",
    ]
    for r in results["full"]:
        frac = r["speedup"] / r["ideal"]
        lines.append(f"| {r['plan']} | {r['T']} | {r['ms']:.3f} | {r['speedup']:.2f}x | {r['ideal']:.2f}x | {100 * frac:.0f}% |")
    if results["decode"]:
        lines += ["", "## Decode (greedy generation, prefill included)", "", "| mode | batch | tokens/s | vs seq compiled | note |", "|---|---|---|---|---|"]
        for r in results["decode"]:
            lines.append(f"| {r['mode']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['vs_seq']:.2f}x | {r['note']} |")
    if results["quality"]:
        seq = results["quality"]["seq"]["ppl"]
        lines += ["", f"## Quality ({results['quality_tokens']} validation tokens)", "",
                  "| plan | PPL | vs seq | top-1 agree | logit cosine |", "|---|---|---|---|---|"]
        for plan, q in results["quality"].items():
            lines.append(f"| {plan} | {q['ppl']:.3f} | {100 * (q['ppl'] / seq - 1):+.1f}% | {q['top1']:.3f} | {q['cosine']:.4f} |")
    if results.get("skipped_timing"):
        lines += ["", f"Not timed (the decoder serves {', '.join(DECODER_METHODS)}): {', '.join(results['skipped_timing'])}"]
    if results.get("runtimes"):
        lines += ["", runtime_markdown(results["runtimes"])]
    sweep = results.get("sweep")
    if sweep:
        lines += ["", "## Plan search", ""]
        if "front" in sweep:
            lines.append(f"Pareto front (speedup at the first length vs PPL; sequential PPL {sweep['seq_ppl']:.3f}):")
            lines += [f"- `{p}`: {s:.2f}x, PPL {q:.3f}" for p, s, q in sweep["front"]]
            best = sweep["best"]
            lines.append("")
            lines.append(f"Fastest within +{100 * sweep['budget']:.0f}% PPL: " + (f"`{best[0]}` ({best[1]:.2f}x, PPL {best[2]:.3f})" if best else "none"))
        else:
            lines.append(sweep["note"])
    return "\n".join(lines)


def runtime_rows(model, plans, device, dtype, args) -> dict:
    """Batch-1 greedy decode of seq and every plan with each runtime (export/runtimes.py), interleaved
    per plan; speedups against the fastest sequential runtime of the same run."""
    from .runtimes import decode_runtimes

    names = ("eager", "compiled", "aot")
    rows = {}
    for plan in ["seq", *[str(p) for p in plans]]:
        rows[plan] = decode_runtimes(model, plan, batch_size=1, new_tokens=args.decode_tokens, prompt_len=args.prompt_len,
                                     rounds=args.repeats, runtimes=names, dtype=dtype, device=device)
    fastest = max(rows["seq"]["tokens_per_s"].values())
    return {"rows": rows, "fastest_seq_tokens_per_s": fastest, "floor_tokens_per_s": rows["seq"]["floor_tokens_per_s"]}


def runtime_markdown(runtimes: dict) -> str:
    """Tokens/s of every plan under every runtime, and its speedup against the fastest sequential runtime."""
    rows = runtimes["rows"]
    names = list(next(iter(rows.values()))["tokens_per_s"])
    fastest = runtimes["fastest_seq_tokens_per_s"]
    lines = [
        f"## Decode runtimes (batch 1; speedup vs the fastest sequential runtime, {fastest:.0f} tok/s; "
        f"weight-streaming floor {runtimes['floor_tokens_per_s']:.0f} tok/s)",
        "",
        "| plan | " + " | ".join(f"{n}: tok/s" for n in names) + " | best vs fastest seq | same tokens |",
        "|---|" + "---:|" * len(names) + "---:|---|",
    ]
    for plan, row in rows.items():
        best = max(row["tokens_per_s"].values())
        lines.append(f"| {plan} | " + " | ".join(f"{row['tokens_per_s'][n]:.0f}" for n in names)
                     + f" | {best / fastest:.2f}x | {'yes' if row['same_tokens'] else 'no'} |")
    return "\n".join(lines)


def plot(results: dict, length: int, path: Path) -> None:
    """Speedup (full forward at ``length``) against PPL, one point per plan."""
    if not results["quality"]:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = {r["plan"]: r["speedup"] for r in results["full"] if r["T"] == length}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for plan, q in results["quality"].items():
        if plan in speed:
            ax.scatter(q["ppl"], speed[plan], color="black" if plan == "seq" else "tab:blue")
            ax.annotate(plan, (q["ppl"], speed[plan]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("validation PPL")
    ax.set_ylabel(f"speedup vs sequential compiled (1 x {length} forward)")
    ax.set_title(results["header"]["device"], fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
