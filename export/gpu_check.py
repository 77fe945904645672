"""``snlp gpu-check``: everything a first, short GPU run must bring back, in order of value.

    python -m export.gpu_check --budget 480 --out gpu-check      # from the repository root
    snlp gpu-check --budget 480 --out gpu-check                   # the same, once installed
    python -m export.gpu_check --dry-run --out /tmp/gpu-check     # the CPU variant (also: no CUDA)

Stages (each with its own time budget, ``STAGES`` / ``DRY_STAGES``; a stage starts only when its
budget fits in what is left of ``--budget``, else it is recorded as skipped with the reason):

1. ``report``        torch / CUDA / cuDNN versions, device, memory, enabled SDPA backends, and for
                     the decoder's attention shapes (B, H, T, S, hd) in bf16 and fp32, with and
                     without a mask, which SDPA backend runs each (every backend forced in turn
                     with ``sdpa_kernel``: ok or its one-line error; the default's kernel by profiler);
2. ``cuda_tests``    the suite's CUDA-only tests (``CUDA_TESTS``) in a pytest subprocess with a
                     timeout; without CUDA only collected;
3. ``exactness``     a small random model: K = C against sequential (float64, float32: tokens
                     identical, logits max abs diff), compiled (+ CUDA-graph) decode against
                     eager, self-speculative against sequential greedy; bf16 judged by top-1
                     agreement and logit error, never by identity;
4. ``full_forward``  the paper's full forward (``export.bench.full_forward``): 0.5B plain, bf16,
                     T = 128 and 2048, the headline plans;
5. ``decode``        CUDA-graph decode at batch 1 and 8 (``export.bench.decode_rows``);
6. ``training``      a few bf16-mixed training steps of the 0.5B model (the paper's config, IDN
                     regularizer) under Lightning: step time, peak memory, attention kernels;
7. ``package``       the AOTInductor package (``export.package``) built, then loaded in a fresh
                     process that generates a few tokens (compared with the eager decoder).

Every stage runs under try/except (a failure is one line and the run goes on) and the files are
rewritten as each stage ends, so a run cut short still reports. ``--out`` receives at most four
files (the lent GPU machine returns at most eight): ``summary.md`` (a line per stage),
``checks.json`` (every check with its values), ``tables.md`` (the benchmark tables) and
``log.txt`` (subprocess output). Exit code 0 when no stage failed, 1 otherwise.

On a GPU machine with torch but no package index (docs/gpu.md has the details): run from the
repository root with the project on ``PYTHONPATH`` (``PYTHONPATH=. python -m export.gpu_check``) or
``pip install --no-deps --no-index -e .``; the check itself needs only torch, numpy, lightning,
torchmetrics and matplotlib (pytest for stage 2); other dependencies travel as wheels
(``pip download`` here, ``pip install --no-index --find-links wheels --no-deps ...`` there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from snlp_lightning.errors import ArgumentParser, UserError, at_least, atomic_write_text, check_writable_parent, first_line, path_kind, run_entry

PROG = "snlp gpu-check"
FORMAT = "snlp-gpu-check/1"
OUT_FILES = ("summary.md", "checks.json", "tables.md", "log.txt")
ROOT = Path(__file__).resolve().parent.parent

# Stage -> its time budget in seconds (estimates for one H200; docs/gpu.md). A stage starts only when
# its budget fits in what is left of --budget; inside, sub-steps stop early when the stage runs out.
STAGES: dict[str, float] = {
    "report": 20,
    "cuda_tests": 60,
    "exactness": 60,
    "full_forward": 150,
    "decode": 90,
    "training": 60,
    "package": 120,
}
# The CPU dry run (tiny model): budgets for 2 busy cores.
DRY_STAGES: dict[str, float] = {
    "report": 10,
    "cuda_tests": 30,
    "exactness": 30,
    "full_forward": 40,
    "decode": 40,
    "training": 30,
    "package": 60,
}
# The suite's CUDA-only tests (grep -n cuda tests/*.py: the skipif(not torch.cuda.is_available()) ones).
CUDA_TESTS = ("tests/test_solvers.py::test_cuda_bf16_solvers_track_the_sequential_model",)
HEADLINE_PLANS = ("idn:n24:4xF6:K2", "idn:n24:K2", "idn:n16:K1")
DRY_PLANS = ("idn:n4:2xF2:K2", "idn:n4:K1")
# The attention shapes of the decoder, (B, H, T, S, hd): full forwards (T = S), prefill of a prompt,
# decode over the cache (S = the cache capacity: bench's decode cache is 86, not a multiple of 8),
# verify of D + 1 = 5 tokens, batch 8 decode. The 0.5B model has H = 5 heads of hd = 128.
ATTENTION_SHAPES = ((1, 5, 128, 128, 128), (1, 5, 2048, 2048, 128), (1, 5, 16, 86, 128), (1, 5, 1, 86, 128),
                    (8, 5, 1, 86, 128), (1, 5, 5, 86, 128), (1, 5, 1, 2048, 128), (8, 5, 1, 2048, 128))
DRY_ATTENTION_SHAPES = ((1, 2, 16, 16, 16), (1, 2, 1, 22, 16), (2, 2, 5, 22, 16))
# Pass thresholds. float64 / float32: exactness; bf16: agreement, never identity.
TOL = {torch.float64: 1e-10, torch.float32: 1e-3}
BF16_MIN_TOP1 = 0.9


class StageSkipped(Exception):
    """A stage (or its remaining sub-steps) does not fit or cannot run here; the message says why."""


# -- the record ---------------------------------------------------------------------------------------
class Report:
    """Stages and checks, written to --out after every stage (and every check of a long stage)."""

    def __init__(self, out: Path, header: dict):
        self.out, self.header = out, header
        self.stages: list[dict] = []
        self.checks: list[dict] = []
        self.tables: list[str] = []
        self.log: list[str] = []
        self.stage: str | None = None

    def check(self, name: str, ok: bool | None, **values) -> bool | None:
        """One check of the current stage: ok True / False, or None (recorded, not judged)."""
        self.checks.append({"stage": self.stage, "name": name, "ok": ok, **_plain(values)})
        mark = {True: "ok", False: "FAILED", None: "info"}[ok]
        print(f"  [{self.stage}] {name}: {mark} {_short(values)}", file=sys.stderr, flush=True)
        return ok

    def table(self, title: str, markdown: str) -> None:
        self.tables.append(f"## {title}\n\n{markdown.strip()}\n")

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "header": self.header, "stages": self.stages, "checks": self.checks}
        atomic_write_text(self.out / "checks.json", json.dumps(data, indent=2) + "\n")
        atomic_write_text(self.out / "summary.md", self.summary() + "\n")
        atomic_write_text(self.out / "tables.md", "# snlp gpu-check: tables\n\n" + "\n".join(self.tables))
        atomic_write_text(self.out / "log.txt", "\n".join(self.log) + "\n")

    def summary(self) -> str:
        h = self.header
        lines = ["# snlp gpu-check", "", f"- command: `{h['command']}`", f"- device: {h['device']}, torch {h['torch']}, {h['date']}",
                 f"- mode: {h['mode']}, budget {h['budget']:.0f} s, torch.compile backend {h['compile_backend']}", "", "| stage | status | seconds | key numbers |", "|---|---|---|---|"]
        for s in self.stages:
            lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']:.1f} | {s['key']} |")
        failed = [c for c in self.checks if c["ok"] is False]
        if failed:
            lines += ["", "Failed checks:"] + [f"- {c['stage']}: {c['name']} ({_short(c)})" for c in failed]
        return "\n".join(lines)


def _plain(values):
    """JSON-safe values (tensors, dtypes, tuples)."""
    if isinstance(values, dict):
        return {str(k): _plain(v) for k, v in values.items()}
    if isinstance(values, (list, tuple)):
        return [_plain(v) for v in values]
    if isinstance(values, torch.Tensor):
        return values.tolist()
    if isinstance(values, torch.dtype):
        return str(values).removeprefix("torch.")
    if isinstance(values, float) and values != values:
        return "nan"
    if values is None or isinstance(values, (bool, int, float, str)):
        return values
    return str(values)


def _short(values: dict, limit: int = 160) -> str:
    keep = {k: v for k, v in values.items() if k not in ("stage", "name", "ok", "tokens", "output")}
    text = ", ".join(f"{k}={_fmt(v)}" for k, v in keep.items())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class Stage:
    """What a stage function sees: the device, the mode, its own clock, the report."""

    def __init__(self, report: Report, device: torch.device, dry: bool, budget: float, args, shared: dict):
        self.report, self.device, self.dry, self.args, self.shared = report, device, dry, args, shared
        self.start, self.budget = time.perf_counter(), budget
        self.key: list[str] = []

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def need(self, seconds: float, what: str) -> None:
        """Stop the stage's remaining sub-steps (recorded as skipped) when ``what`` no longer fits."""
        if self.left() < seconds:
            raise StageSkipped(f"{what} needs about {seconds:.0f} s, {max(self.left(), 0):.0f} s left of the stage's {self.budget:.0f} s")

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


# -- 1. environment and kernel report ------------------------------------------------------------------
def _sdpa_backends() -> dict:
    """SDPBackend name -> member (those this torch has)."""
    from torch.nn.attention import SDPBackend

    return {name.lower(): getattr(SDPBackend, name) for name in ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
            if hasattr(SDPBackend, name)}


_KERNEL = re.compile(r"scaled_dot_product|flash|efficient_attention|fmha|cudnn.*(attn|attention|sdpa)|sdpa", re.I)


def _profiled_kernels(fn: Callable[[], object], cuda: bool) -> list[str]:
    """Names of the attention ops and kernels ``fn`` runs (torch.profiler), most frequent first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    counts: dict[str, int] = {}
    for event in prof.events():
        if _KERNEL.search(event.name):
            counts[event.name] = counts.get(event.name, 0) + 1
    return [name for name, _ in sorted(counts.items(), key=lambda kv: -kv[1])]


def stage_report(ctx: Stage) -> None:
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads()}
    if torch.backends.cudnn.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count, driver_visible_devices=torch.cuda.device_count())
    enabled = {}
    for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled"):
        fn = getattr(torch.backends.cuda, name, None)
        if fn is not None:
            enabled[name.removesuffix("_enabled")] = bool(fn())
    env["sdpa_enabled"] = enabled
    ctx.report.check("environment", None, **env)
    ctx.key.append(f"{env.get('device', 'cpu')}, torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env.get('cudnn')}")

    from snlp_lightning.models.attention import sdpa as decoder_sdpa

    backends = _sdpa_backends()
    shapes = DRY_ATTENTION_SHAPES if ctx.dry or not ctx.cuda else ATTENTION_SHAPES
    rows = ["| B, H, T, S, hd | dtype | mask | default runs | " + " | ".join(backends) + " |", "|---" * (4 + len(backends)) + "|"]
    g = torch.Generator(device=ctx.device).manual_seed(0)
    failures = 0
    for shape in shapes:
        b, h, t, s, hd = shape
        for dtype in (torch.bfloat16, torch.float32):
            ctx.need(1.0, f"the kernel report at {shape}")
            q = torch.randn(b, h, t, hd, device=ctx.device, dtype=dtype, generator=g)
            k, v = (torch.randn(b, h, s, hd, device=ctx.device, dtype=dtype, generator=g) for _ in range(2))
            # The decoder's mask: (B, 1, T, S) booleans, query i (at position S - T + i) sees keys <= it.
            allowed = torch.arange(s, device=ctx.device) <= (s - t + torch.arange(t, device=ctx.device))[:, None]
            masks = {"none": None, "mask": allowed.expand(b, 1, t, s).contiguous()}
            for label, mask in masks.items():
                reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
                results = {}
                for name, backend in backends.items():
                    try:
                        with sdpa_kernel([backend]):
                            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                        ctx.sync()
                        err = float((y.double() - reference).abs().max())
                        results[name] = f"ok ({err:.1e})"
                    except Exception as e:  # noqa: BLE001 - a backend that cannot take the shape: recorded
                        results[name] = f"no: {first_line(e)[:120]}"
                try:
                    ran = _profiled_kernels(lambda: decoder_sdpa(q, k, v, mask=mask), ctx.cuda)
                    y = decoder_sdpa(q, k, v, mask=mask)
                    default_err = float((y.double() - reference).abs().max())
                    default = ", ".join(ran[:3]) or "(no attention op seen)"
                except Exception as e:  # noqa: BLE001
                    ran, default, default_err = [], f"FAILED: {first_line(e)[:120]}", float("nan")
                    failures += 1
                ok = None if default_err == default_err and default_err < (0.05 if dtype == torch.bfloat16 else 1e-3) else False
                ctx.report.check(f"sdpa {shape} {str(dtype)[6:]} {label}", ok, shape=shape, dtype=dtype, mask=label,
                                 default=ran, default_max_err=default_err, backends=results)
                if ok is False:
                    failures += 1
                rows.append(f"| {', '.join(map(str, shape))} | {str(dtype)[6:]} | {label} | {default} | "
                            + " | ".join(results[n] for n in backends) + " |")
    ctx.report.table("Attention kernels at the decoder's shapes (forced backend: ok (max error vs float64) or why not)", "\n".join(rows))
    ctx.key.append(f"{len(shapes) * 4} attention cases, {failures} failed through the decoder's sdpa")


# -- 2. the suite's CUDA tests -------------------------------------------------------------------------
def _subprocess(ctx: Stage, cmd: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        ctx.report.log.append(f"## {what} (timed out after {timeout:.0f} s)\n$ {' '.join(cmd)}\n{out[-20000:]}")
        raise TimeoutError(f"{what} did not finish within {timeout:.0f} s") from None
    ctx.report.log.append(f"## {what} (exit {done.returncode})\n$ {' '.join(cmd)}\n{(done.stdout + done.stderr)[-20000:]}")
    return done


def stage_cuda_tests(ctx: Stage) -> None:
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        raise StageSkipped("pytest is not installed (carry its wheels: docs/gpu.md)")
    files = sorted({t.split("::")[0] for t in CUDA_TESTS})
    collect = not ctx.cuda
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", *files] + (["--collect-only"] if collect else [])
    done = _subprocess(ctx, cmd, ctx.left(), "pytest -k cuda")
    text = done.stdout + done.stderr
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|tests? collected)", text)}
    if collect:
        collected = text.count("::")
        ok = done.returncode == 0 and collected >= len(CUDA_TESTS)
        ctx.report.check("CUDA tests collected (no CUDA here: not run)", ok, collected=collected, exit=done.returncode, tests=list(CUDA_TESTS))
        ctx.key.append(f"{collected} CUDA tests collected, not run (no CUDA)")
        return
    passed, failed = counts.get("passed", 0), counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    ctx.report.check("CUDA tests", done.returncode == 0 and passed > 0 and failed == 0, passed=passed, failed=failed,
                     skipped=counts.get("skipped", 0), exit=done.returncode, summary=text.strip().splitlines()[-1:] if text.strip() else [])
    ctx.key.append(f"{passed} passed, {failed} failed, {counts.get('skipped', 0)} skipped")


# -- 3. decoder exactness ------------------------------------------------------------------------------
@torch.no_grad()
def _randomize(model, seed: int = 0, scale: float = 0.5):
    """Random values of a sensible size for every parameter (as tests/conftest.randomize does):
    nanochat's zero-initialised output projections would make every block the identity and every
    solver trivially exact."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        if name.endswith(("resid_lambdas",)):
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith(("x0_lambdas", "smear_lambda", "backout_lambda")):
            p.copy_(0.3 * noise)
        elif p.dim() >= 2 and "wte" not in name:
            p.copy_(noise * scale * p.size(-1) ** -0.5)
    return model


def small_model(dry: bool):
    """The exactness model: nanochat (windows, value embeddings, smear, backout), random weights, float32."""
    from snlp_lightning import build_model

    torch.manual_seed(0)
    size = dict(n_layer=8, n_embd=64, n_head=4, n_kv_head=2, vocab_size=128, sequence_len=64, short_window=8) if dry else \
        dict(n_layer=8, n_embd=128, n_head=4, n_kv_head=2, vocab_size=512, sequence_len=256, short_window=32)
    return _randomize(build_model("nanochat", **size)).float().eval()


def teacher_forced(decoder, tokens: torch.Tensor, prompt_len: int, decode=None) -> torch.Tensor:
    """Logits (B, T - prompt_len, V) of decode steps over given ``tokens`` (B, T): prefill of the
    prompt, then one decode step per later token (``decode``: a compiled step instead of the eager one).
    Row t predicts token prompt_len + t + 1."""
    decode = decode or decoder.decode
    decoder.reset_cache()
    b, t = tokens.shape
    pos = torch.arange(t, device=tokens.device).expand(b, t).contiguous()
    out = [decoder.prefill(tokens[:, :prompt_len], pos[:, :prompt_len].contiguous(), torch.zeros(b, dtype=torch.long, device=tokens.device))[:, -1:]]
    for i in range(prompt_len, t - 1):
        out.append(decode(tokens[:, i : i + 1].contiguous(), pos[:, i : i + 1].contiguous(), tokens[:, i - 1].contiguous()))
    return torch.cat(out, 1).float()


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"max_abs_diff": float((a.double() - b.double()).abs().max()), "top1_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "logit_scale": float(b.abs().max())}


def stage_exactness(ctx: Stage) -> None:
    from .compiled import compile_steps, warm_up
    from .decoder import LayerParallelDecoder
    from .generate import generate_tokens, speculative_tokens
    from .quality import greedy_match

    dev, dry = ctx.device, ctx.dry
    model = small_model(dry).to(dev)
    L, V = model.config.n_layer, model.config.vocab_size
    exact_plan, approx_plan, draft_plan = f"idn:n{L - 2}:K{L - 2}", "idn:n4:2xF2:K1", "idn:n4:K1"
    batch, prompt_len, new = (2, 6, 12) if dry else (4, 16, 48)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, V, (batch, prompt_len), generator=g).tolist()
    room = prompt_len + new + 4 + 2
    make = lambda m, plan, dtype: LayerParallelDecoder(m, plan, batch_size=batch, max_seq_len=room, dtype=dtype, device=dev)  # noqa: E731

    with torch.inference_mode():
        # The sequential greedy continuation (float64 cached decoder) gives the teacher-forced tokens.
        seq64 = make(model.double(), "seq", torch.float64)
        cont = generate_tokens(seq64, prompts, new)
        tokens = torch.tensor([p + c for p, c in zip(prompts, cont)], device=dev)
        ref64 = teacher_forced(seq64, tokens, prompt_len)
        full = model(tokens)[:, prompt_len - 1 : -1].float()  # the cache-free model
        ctx.report.check("seq decoder (cached) vs cache-free model, float64", _compare(ref64, full)["max_abs_diff"] < TOL[torch.float64],
                         **_compare(ref64, full))
        refs = {}
        for dtype in (torch.float64, torch.float32):
            ctx.need(3, f"K = C in {dtype}")
            m = model.to(dtype)
            seq = make(m, "seq", dtype)
            refs[dtype] = teacher_forced(seq, tokens, prompt_len)
            got = teacher_forced(make(m, exact_plan, dtype), tokens, prompt_len)
            cmp = _compare(got, refs[dtype])
            name = str(dtype).removeprefix("torch.")
            ctx.report.check(f"K = C ({exact_plan}) vs sequential decode logits, {name}", cmp["max_abs_diff"] < TOL[dtype], tol=TOL[dtype], **cmp)
            match = greedy_match(m, exact_plan, prompts, lengths=(new,), dtype=dtype, device=dev)
            ctx.report.check(f"K = C greedy tokens identical to sequential, {name}", match["match"][new] == 1.0,
                             match=match["match"][new], first_divergence=match["first_divergence"])
            if dtype == torch.float64:
                ctx.key.append(f"K=C f64 max diff {cmp['max_abs_diff']:.1e}")

        # bf16: agreement and logit error against float32 sequential, never identity.
        ctx.need(3, "bf16 K = C")
        m = model.to(torch.bfloat16)
        # The bf16 sequential model's own agreement is the baseline: K = C in bf16 may not be much worse.
        base = _compare(teacher_forced(make(m, "seq", torch.bfloat16), tokens, prompt_len), refs[torch.float32])
        ctx.report.check("bf16 seq vs float32 sequential (teacher-forced; the baseline, not judged)", None, **base)
        cmp = _compare(teacher_forced(make(m, exact_plan, torch.bfloat16), tokens, prompt_len), refs[torch.float32])
        floor = min(BF16_MIN_TOP1, base["top1_agree"] - 0.05)
        ctx.report.check(f"bf16 K = C ({exact_plan}) vs float32 sequential (teacher-forced top-1 agreement)", cmp["top1_agree"] >= floor,
                         min_top1=floor, **cmp)
        ctx.key.append(f"bf16 K=C top-1 {cmp['top1_agree']:.3f} (bf16 seq {base['top1_agree']:.3f})")
        match = greedy_match(m, exact_plan, prompts, lengths=(new,), dtype=torch.bfloat16, device=dev)
        ctx.report.check("bf16 K = C greedy agreement with bf16 sequential (not judged)", None, match=match["match"][new],
                         first_divergence=match["first_divergence"])

        # Compiled (+ CUDA graphs on CUDA) decode against eager, float32 (bf16 too on CUDA).
        m = model.float()
        for dtype in (torch.float32,) + ((torch.bfloat16,) if ctx.cuda else ()):
            m = model.to(dtype)
            for plan in ("seq", approx_plan):
                ctx.need(15, f"compiled decode of {plan}")
                eager = teacher_forced(make(m, plan, dtype), tokens, prompt_len)
                compiled = make(m, plan, dtype)
                steps = compile_steps(compiled)
                warm_up(steps["decode"], compiled)
                got = teacher_forced(compiled, tokens, prompt_len, decode=steps["decode"])
                cmp = _compare(got, eager)
                what = "compiled + CUDA graphs" if ctx.cuda else "compiled"
                if dtype == torch.float32:
                    ok = cmp["max_abs_diff"] < TOL[torch.float32]
                else:
                    ok = cmp["top1_agree"] >= BF16_MIN_TOP1
                ctx.report.check(f"{what} decode vs eager, {plan}, {str(dtype)[6:]}", ok, **cmp)

        # Self-speculative (compiled drafter and verifier) against sequential greedy.
        for dtype in (torch.float32,) + ((torch.bfloat16,) if ctx.cuda else ()):
            ctx.need(15, f"self-speculative in {dtype}")
            m = model.to(dtype)
            want = generate_tokens(make(m, "seq", dtype), prompts, new)
            drafter = make(m, draft_plan, dtype)
            steps = compile_steps(drafter)
            warm_up(steps["decode"], drafter)
            warm_up(steps["verify"], drafter, tokens=4)
            got, stats = speculative_tokens(drafter, prompts, new, draft_len=3, steps=steps)
            agree = sum(a == b for x, y in zip(got, want) for a, b in zip(x, y)) / (batch * new)
            name = str(dtype).removeprefix("torch.")
            if dtype == torch.float32:
                ctx.report.check(f"self-speculative ({draft_plan}, D=3, compiled) == sequential greedy, {name}", got == want,
                                 agreement=agree, accepted_per_round=stats.mean_accepted)
            else:
                ctx.report.check(f"self-speculative vs sequential greedy, {name} (agreement, not judged)", None,
                                 agreement=agree, accepted_per_round=stats.mean_accepted)
    model.float()


# -- 4, 5. the paper's full forward and decode (export.bench) -------------------------------------------
def _bench_args(ctx: Stage, extra: list[str]):
    from . import bench

    return bench.build_parser().parse_args(["--preset", "plain", "--no-quality", *extra])


def _bench_model(ctx: Stage):
    """The 0.5B plain model in bf16 (random weights, seeded as export.bench does), or a tiny one for
    the dry run; built once and shared by the full-forward and decode stages."""
    if "bench_model" not in ctx.shared:
        from snlp_lightning import build_model

        torch.manual_seed(0)
        if ctx.dry:
            model = build_model("plain", n_layer=6, n_embd=64, n_head=4, n_kv_head=4, vocab_size=256, sequence_len=64)
        else:
            model = build_model("plain", "0.5b")
        dtype = torch.bfloat16 if ctx.cuda else torch.float32
        ctx.shared["bench_model"] = (model.to(ctx.device).eval(), dtype)
    return ctx.shared["bench_model"]


def _bench_markdown(model, rows_full, rows_decode, ctx: Stage, args, dtype) -> str:
    from . import bench

    results = {"header": bench.header(model, ctx.device, dtype, args, ctx.report.header["command"]), "full": rows_full,
               "decode": rows_decode, "quality": {}}
    return bench.markdown(results, model.config.n_layer).split("\n## ", 1)[-1]


def stage_full_forward(ctx: Stage) -> None:
    from . import bench
    from snlp_lightning.solvers import SolverPlan

    model, dtype = _bench_model(ctx)
    plans = [SolverPlan.parse(p).validate(model.config) for p in (DRY_PLANS if ctx.dry else HEADLINE_PLANS)]
    lengths = (16,) if ctx.dry else (128, 2048)
    args = _bench_args(ctx, ["--warmup", "1" if ctx.dry else "10", "--iters", "2" if ctx.dry else "30"])
    rows = []
    took = 0.0
    try:
        for length in lengths:
            ctx.need(1.5 * took, f"the full forward at T={length}")
            start = time.perf_counter()
            new = bench.full_forward(model, plans, length, ctx.device, dtype, args)
            took = time.perf_counter() - start
            rows += new
            for r in new:
                ctx.report.check(f"full forward T={r['T']} {r['plan']}", None, ms=r["ms"], speedup=r["speedup"], ideal=r["ideal"], seconds=took)
            best = max((r for r in new if r["plan"] in map(str, plans)), key=lambda r: r["speedup"])
            ctx.key.append(f"T={length}: best {best['plan']} {best['speedup']:.2f}x")
    finally:
        if rows:
            ctx.report.table(f"Full forward ({'dry run, tiny model' if ctx.dry else '0.5B plain'}, {str(dtype)[6:]})",
                             _bench_markdown(model, rows, [], ctx, args, dtype))


def stage_decode(ctx: Stage) -> None:
    from . import bench
    from snlp_lightning.solvers import SolverPlan

    model, dtype = _bench_model(ctx)
    plans = [SolverPlan.parse(p).validate(model.config) for p in (DRY_PLANS[:1] if ctx.dry else HEADLINE_PLANS)]
    batches = (1, 2) if ctx.dry else (1, 8)
    extra = ["--decode-tokens", "4", "--prompt-len", "4", "--repeats", "1"] if ctx.dry else ["--decode-tokens", "64", "--repeats", "3"]
    args = _bench_args(ctx, extra)
    rows = []
    took = 0.0
    try:
        for batch in batches:
            ctx.need(took, f"decode at batch {batch}")
            start = time.perf_counter()
            new = bench.decode_rows(model, plans, batch, ctx.device, dtype, args)
            took = time.perf_counter() - start
            rows += new
            for r in new:
                ctx.report.check(f"decode batch {batch} {r['mode']}", None, tokens_per_s=r["tokens_per_s"], vs_seq=r["vs_seq"], note=r["note"])
            best = max(new, key=lambda r: r["vs_seq"])
            ctx.key.append(f"B={batch}: seq {new[1]['tokens_per_s']:.0f} tok/s, best {best['mode']} {best['vs_seq']:.2f}x")
    finally:
        if rows:
            ctx.report.table(f"Decode ({'dry run' if ctx.dry else '0.5B plain'}, {str(dtype)[6:]}; bf16 speculative output is "
                             "judged by agreement, a 'DIFFERS' note is expected in bf16)", _bench_markdown(model, [], rows, ctx, args, dtype))


# -- 6. training steps ---------------------------------------------------------------------------------
def stage_training(ctx: Stage) -> None:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from snlp_lightning import ModelConfig
    from snlp_lightning.module import SNLPModule
    from snlp_lightning.regularizer import RegularizerConfig

    if ctx.dry:
        config = ModelConfig.from_name("nanochat", n_layer=4, n_embd=32, n_head=2, n_kv_head=2, vocab_size=128, sequence_len=32)
        batch, length, steps = 2, 32, 2
    else:
        config = ModelConfig.from_name("paper-0.5b")  # configs/paper-0.5b.yaml's model (nanochat, windows, value embeddings)
        batch, length, steps = 8, 2048, 4  # the paper's 8 sequences per GPU
    # The paper's IDN v2 settings, on from step 0 (the dry run's 4 layers need their own N).
    reg = RegularizerConfig(lambda_idn=0.0625, stride=3 if not ctx.dry else 1, warmup_fraction=0.0, n_par_configs=[2] if ctx.dry else None)
    L.seed_everything(0, verbose=False)
    module = SNLPModule(config=config, regularizer=reg)
    rows = torch.randint(0, config.vocab_size, (batch * steps, length + 1), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(rows[:, :-1], rows[:, 1:]), batch_size=batch)
    times: list[float] = []
    losses: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            ctx.sync()
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ctx.sync()
            times.append(time.perf_counter() - self.t)
            losses.append(float(outputs["loss"]))

    precision = "bf16-mixed"
    trainer = L.Trainer(accelerator="cuda" if ctx.cuda else "cpu", devices=1, precision=precision, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()],
                        limit_val_batches=0, num_sanity_val_steps=0)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    def fit() -> None:
        trainer.fit(module, train_dataloaders=loader)

    kernels = _profiled_kernels(fit, ctx.cuda)
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None
    finite = all(x == x and abs(x) != float("inf") for x in losses)
    steady = times[1:] or times
    tps = batch * length / (sorted(steady)[len(steady) // 2])
    ctx.report.check("bf16-mixed training steps", len(losses) == steps and finite, steps=len(losses), losses=losses, step_seconds=times,
                     tokens_per_s=tps, peak_memory_gib=peak, precision=precision, batch=batch, length=length,
                     params_m=sum(p.numel() for p in module.parameters()) / 1e6)
    ctx.report.check("attention kernels used in training (profiler)", bool(kernels), kernels=kernels[:12])
    ctx.key.append(f"{len(losses)} steps, {tps:.0f} tok/s" + (f", peak {peak:.1f} GiB" if peak is not None else "")
                   + f", attention: {', '.join(k for k in kernels[:2])}")


# -- 7. the AOTInductor package ------------------------------------------------------------------------
_LOAD_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])  # the package's own torch-only runtime, not this project
from snlp_runtime.standalone import load_package
decoder = load_package(sys.argv[1])
print("TOKENS " + json.dumps(decoder.generate(json.loads(sys.argv[2]), int(sys.argv[3]))))
"""


def stage_package(ctx: Stage) -> None:
    from .decoder import LayerParallelDecoder
    from .generate import generate_tokens
    from .package import export_package

    if not ctx.cuda and not ctx.args.package_on_cpu:
        raise StageSkipped("the AOTInductor build on a CPU takes minutes (C++ compile of two graphs): skipped in the dry run; "
                           "--package-on-cpu runs it")
    model = small_model(ctx.dry).to(ctx.device)
    plan, new = "idn:n4:K1", 8
    prompts = [[3, 14, 15, 92, 65]]
    decoder = LayerParallelDecoder(model, plan, batch_size=1, max_seq_len=32, dtype=torch.float32, device=ctx.device)
    with tempfile.TemporaryDirectory(prefix="snlp-gpu-check-") as tmp:
        start = time.perf_counter()
        folder = export_package(decoder, Path(tmp) / "package")
        built = time.perf_counter() - start
        size = (folder / "model.pt2").stat().st_size / 2**20
        ctx.report.check("package built", True, plan=plan, seconds=built, size_mib=size, device=ctx.device.type)
        ctx.need(10, "loading the package in a fresh process")
        start = time.perf_counter()
        done = _subprocess(ctx, [sys.executable, "-c", _LOAD_SCRIPT, str(folder), json.dumps(prompts), str(new)], ctx.left(), "package load")
        loaded = time.perf_counter() - start
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("TOKENS ")), None)
    if done.returncode != 0 or line is None:
        ctx.report.check("package loaded in a fresh process", False, exit=done.returncode, output=first_line((done.stderr or done.stdout)[-2000:]))
        return
    got = json.loads(line[len("TOKENS "):])
    with torch.inference_mode():
        want = generate_tokens(LayerParallelDecoder(model, plan, batch_size=1, max_seq_len=32, dtype=torch.float32, device=ctx.device),
                               prompts, new)
    ctx.report.check("package generates the eager decoder's tokens (float32, fresh process)", got == want, tokens=got, eager=want,
                     seconds=loaded)
    ctx.key.append(f"built in {built:.0f} s ({size:.1f} MiB), loaded + {new} tokens in {loaded:.0f} s, " + ("same tokens" if got == want else "tokens DIFFER"))


STAGE_FUNCTIONS: dict[str, Callable[[Stage], None]] = {
    "report": stage_report, "cuda_tests": stage_cuda_tests, "exactness": stage_exactness, "full_forward": stage_full_forward,
    "decode": stage_decode, "training": stage_training, "package": stage_package,
}


# -- the command -------------------------------------------------------------------------------------
def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description="Run every GPU check that fits in --budget seconds; results land in --out as each stage ends.")
    p.add_argument("--out", default="gpu-check", help="output folder (summary.md, checks.json, tables.md, log.txt)")
    p.add_argument("--budget", type=at_least(1.0, float), default=480.0, help="seconds for all stages together")
    p.add_argument("--dry-run", action="store_true", help="tiny models, the CPU variant of every stage (automatic without CUDA)")
    p.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES), metavar="STAGE",
                   help=f"stages to run, in this order: {', '.join(STAGES)} (default: all)")
    p.add_argument("--package-on-cpu", action="store_true", help="build the AOTInductor package on a CPU too (minutes)")
    p.add_argument("--compile-backend", default=None, choices=("inductor", "aot_eager", "eager"),
                   help="torch.compile backend of the compiled steps (default: inductor; the dry run: eager, which traces the same "
                        "full graphs but skips the C++ code generation that takes minutes on a small CPU)")
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command (``prog`` names it in --help and error lines)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(prog).parse_args(argv)
    return run_entry(prog, run, args, f"{prog} " + " ".join(argv))


def check_out(path: str | Path) -> Path:
    """--out is a folder (or can be made); files of ours there are replaced, a foreign checks.json is not."""
    out = Path(path).expanduser()
    kind = path_kind(out)
    if kind == "missing":
        check_writable_parent(out, "--out")
        return out
    if kind != "a folder":
        raise UserError(f"--out {out} is {kind}, not a folder: give a folder for {', '.join(OUT_FILES)}")
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out} is not writable (permission denied)")
    checks = out / "checks.json"
    if checks.exists():
        try:
            ours = json.loads(checks.read_text(encoding="utf-8")).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UserError(f"--out {out} holds a checks.json that {PROG} did not write: choose another folder (nothing was replaced)")
    return out


@contextlib.contextmanager
def compile_backend(backend: str):
    """Every ``torch.compile`` call made inside uses ``backend`` (export.compiled and export.bench call
    torch.compile directly and take no backend; patched here for the dry run, restored on exit)."""
    if backend == "inductor":
        yield
        return
    import functools

    from . import compiled

    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)
    compiled._compiled.cache_clear()  # its cached wrappers were made with the default backend
    try:
        yield
    finally:
        torch.compile = original
        compiled._compiled.cache_clear()


def run(args, command: str = "(python API)") -> int:
    from .checkpoint import parse_device

    out = check_out(args.out)
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dry = args.dry_run or device.type != "cuda"
    budgets = DRY_STAGES if dry else STAGES
    backend = args.compile_backend or ("eager" if dry else "inductor")
    threads = torch.get_num_threads()
    if dry and device.type == "cpu":
        torch.set_num_threads(1)  # tiny models are bound by per-op overhead; idle OpenMP workers steal busy cores
    try:
        with compile_backend(backend):
            return _run_stages(args, out, device, dry, budgets, backend, command)
    finally:
        torch.set_num_threads(threads)


def _run_stages(args, out: Path, device: torch.device, dry: bool, budgets: dict, backend: str, command: str) -> int:
    from snlp_lightning import compat

    compat.raise_dynamo_limits()  # many plans and shapes compile the same region code
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    header = {"command": command, "device": f"{device.type}: {name}", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "mode": "dry run (tiny models, CPU variants)" if dry else "full", "budget": args.budget, "stage_budgets": budgets,
              "compile_backend": backend}
    report = Report(out, header)
    report.write()
    shared: dict = {}
    t0 = time.perf_counter()
    for stage in [s for s in STAGES if s in args.stages]:
        left = args.budget - (time.perf_counter() - t0)
        report.stage = stage
        entry = {"stage": stage, "status": "skipped", "seconds": 0.0, "budget": budgets[stage], "key": "", "reason": None}
        if budgets[stage] > left:
            entry["reason"] = entry["key"] = f"its budget of {budgets[stage]:.0f} s does not fit in the {max(left, 0):.0f} s left"
        else:
            print(f"{PROG}: stage {stage} (budget {budgets[stage]:.0f} s)", file=sys.stderr, flush=True)
            ctx = Stage(report, device, dry, budgets[stage], args, shared)
            before = len(report.checks)
            try:
                STAGE_FUNCTIONS[stage](ctx)
                entry["status"] = "ok"
            except StageSkipped as why:
                entry["status"] = "ok" if len(report.checks) > before else "skipped"
                entry["reason"] = str(why)
                ctx.key.append(f"{'rest skipped' if entry['status'] == 'ok' else 'skipped'}: {why}")
            except Exception as err:  # noqa: BLE001 - one failing stage must not stop the others
                entry["status"], entry["reason"] = "failed", f"{type(err).__name__}: {first_line(err)}"
                ctx.key.append(entry["reason"])
                report.log.append(f"## {stage}: traceback\n{traceback.format_exc()}")
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            failed = [c["name"] for c in report.checks[before:] if c["ok"] is False]
            if failed and entry["status"] == "ok":
                entry["status"], entry["reason"] = "failed", f"{len(failed)} check(s) failed: {failed[0]}"
                ctx.key.insert(0, entry["reason"])
            entry["seconds"] = time.perf_counter() - ctx.start
            entry["key"] = "; ".join(ctx.key)
        report.stages.append(entry)
        report.write()
        print(f"{PROG}: {stage}: {entry['status']} ({entry['seconds']:.1f} s) {entry['key']}", file=sys.stderr, flush=True)
    report.stage = None
    print(report.summary())
    return 1 if any(s["status"] == "failed" for s in report.stages) else 0


if __name__ == "__main__":
    raise SystemExit(main())
