"""Every decode runtime of one plan side by side, measured interleaved in one run, with the
weight-streaming floor of the same machine (for ``snlp bench``'s decode section).

    result = decode_runtimes(model, "seq", batch_size=1, new_tokens=64)
    result["tokens_per_s"]   # {"eager": ..., "compiled": ..., "aot": ...}
    result["floor_tokens_per_s"], result["same_tokens"]

Rounds are interleaved (one generation of every runtime per round, medians over rounds), so a slow
spell of a shared machine lands on every runtime. ``aot`` is an AOTInductor package of the decoder
(export.package) built into a temporary folder (or ``cache_dir``'s runtime cache) and loaded
in-process; on CUDA ``compiled`` is the CUDA-graph replay.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from .decoder import LayerParallelDecoder


def weight_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the weights one decode step reads, in ``dtype``: every parameter but the token
    embedding tables (``wte`` and value embeddings: a step gathers one row of them)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() * size for name, p in model.named_parameters() if "wte" not in name and "value_embeds" not in name)


def copy_bandwidth(device: torch.device | str = "cpu", mbytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write counted), the best of ``repeats``."""
    n = mbytes * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n * 4 / best


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def decode_runtimes(
    model: torch.nn.Module,
    plan: str = "seq",
    *,
    batch_size: int = 1,
    new_tokens: int = 64,
    prompt_len: int = 16,
    rounds: int = 5,
    runtimes: tuple[str, ...] = ("eager", "compiled", "aot"),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_seq_len: int | None = None,
    cache_dir: str | Path | None = None,
    log=None,
) -> dict:
    """Greedy generation of ``new_tokens`` after ``prompt_len``-token prompts (prefill included)
    with each runtime, timed interleaved over ``rounds``; returns {"tokens_per_s": {runtime: ...},
    "seconds": {runtime: [per round]}, "floor_tokens_per_s", "weight_bytes", "bandwidth_bytes_per_s",
    "same_tokens" (every runtime gave the eager tokens; exact only in float32 / float64),
    "build_s": {runtime: compile or build seconds}}."""
    from .compiled import compile_steps, warm_up
    from .generate import generate_tokens

    seq_len = max_seq_len or prompt_len + new_tokens
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (batch_size, prompt_len), generator=g).tolist()
    fns, build = {}, {}
    with torch.inference_mode():
        for name in runtimes:
            start = time.perf_counter()
            decoder = LayerParallelDecoder(model, plan, batch_size=batch_size, max_seq_len=seq_len, dtype=dtype, device=device)
            if name == "eager":
                fns[name] = lambda d=decoder: generate_tokens(d, prompts, new_tokens)
            elif name == "compiled":
                steps = compile_steps(decoder)
                warm_up(steps["decode"], decoder)
                fns[name] = lambda d=decoder, s=steps: generate_tokens(d, prompts, new_tokens, steps=s)
            elif name == "aot":
                from .package import cached_package, export_package
                from .standalone import load_package

                if cache_dir is not None:
                    folder, _ = cached_package(decoder, _stand_in(model, Path(cache_dir)), cache_dir)
                else:
                    folder = export_package(decoder, Path(tempfile.mkdtemp(prefix="snlp-runtimes-")) / "pkg")
                package = load_package(folder)
                del decoder
                fns[name] = lambda p=package: p.generate(prompts, new_tokens)
            else:
                raise ValueError(f"runtime {name!r}: one of eager, compiled, aot")
            build[name] = time.perf_counter() - start
            if log is not None:
                log(f"{name}: ready in {build[name]:.1f} s")
        outputs = {name: fn() for name, fn in fns.items()}  # warm-up round (not timed)
        seconds = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                seconds[name].append(time.perf_counter() - start)
    tokens = batch_size * new_tokens
    wbytes = weight_bytes(model, dtype)
    bandwidth = copy_bandwidth(device)
    reference = outputs.get("eager", next(iter(outputs.values())))
    return {
        "plan": plan,
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "tokens_per_s": {name: tokens / statistics.median(s) for name, s in seconds.items()},
        "seconds": seconds,
        "build_s": build,
        "weight_bytes": wbytes,
        "bandwidth_bytes_per_s": bandwidth,
        # one decode step must stream the weights once; batch_size tokens per step
        "floor_tokens_per_s": batch_size * bandwidth / max(wbytes, 1),
        "same_tokens": all(out == reference for out in outputs.values()),
    }


def _stand_in(model: torch.nn.Module, cache_dir: Path) -> Path:
    """A file standing for ``model``'s weights in the runtime cache key (a checksum of them)."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"weights-{digest.hexdigest()[:16]}.id"
    if not path.exists():
        path.write_text("stands for the weights of a benchmarked model\n")
    return path
