"""``snlp generate`` (alias ``snlp-generate``): stream text from a checkpoint (any plan, eager or
compiled) or an exported package.

    snlp generate --checkpoint runs/quickstart/checkpoints/last.ckpt --plan idn:n6:3xF2:K2 --prompt "The"
    snlp generate --checkpoint last.ckpt --plan idn:n4:K1 --speculative 4 --prompt "The"
    snlp generate --package exported/idn_n6_K2 --prompt "The" --temperature 0.8 --top-k 50
    snlp generate --checkpoint last.ckpt --plan idn:n6:3xF2:K1 --runtime aot --prompt "The"   # AOTInductor, cached

Runtimes (``--runtime``): ``eager``; ``compile`` (torch.compile, CUDA graphs on CUDA); ``aot`` (an
AOTInductor package of the prefill and decode graphs built in-process once, about 40 s for the
quickstart model on a 2-core CPU, then kept in the runtime cache, ``--cache-dir`` /
$SNLP_CACHE_DIR / ~/.cache/snlp, keyed by checkpoint file, plan, dtype, device and cache shape).
The default (``auto``): CUDA -> compile; CPU -> aot when a current package is already cached, else
eager (a one-off 64-token generation would wait ~40 s for a build that saves milliseconds).

A row ends at the end token (``--no-stop`` goes on): nanochat's end-of-document ``<|bos|>``, or a
Hugging Face model's EOS (``text.eos_id_near``); special tokens are never printed.
"""

from __future__ import annotations

import argparse
import sys
import time

from snlp_lightning import compat
from snlp_lightning.errors import ArgumentParser, Fault, UserError, at_least, run_entry

PROG = "snlp-generate"
# Settings an exported package fixed at export time (snlp export takes them instead).
CHECKPOINT_ONLY = ("plan", "dtype", "device", "compile", "runtime", "cache_dir", "speculative", "max_seq_len")
RUNTIMES = ("auto", "eager", "compile", "aot")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description="Stream text from a checkpoint (any plan, eager or compiled) or an exported package.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a .ckpt from snlp fit, or a nanochat checkpoint")
    src.add_argument("--package", help="a folder written by snlp export (runs without the training code)")
    p.add_argument("--plan", default=None, help="solver plan, e.g. idn:n6:3xF2:K2 (checkpoint only; default seq)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=at_least(1), default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=at_least(1), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", type=at_least(0), default=None, metavar="D",
                   help="self-speculative: D draft tokens per round (checkpoint only; default 0 = off)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the decode step (CUDA: + CUDA graphs; checkpoint only): --runtime compile")
    p.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help="eager | compile (torch.compile; CUDA graphs on CUDA) | aot (AOTInductor package built once and "
                        "cached) | auto (default: CUDA compile; CPU aot if already cached, else eager); checkpoint only")
    p.add_argument("--cache-dir", default=None,
                   help="where --runtime aot keeps built packages (default $SNLP_CACHE_DIR or ~/.cache/snlp; checkpoint only)")
    p.add_argument("--no-stop", action="store_true",
                   help="go on after the end token (<|bos|>, or a Hugging Face model's EOS; default: a row ends there)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one the checkpoint was trained with)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 | float64 (checkpoint only; default float32)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (checkpoint only; default cpu)")
    p.add_argument("--max-seq-len", type=at_least(1), default=None,
                   help="KV cache length (checkpoint only; default: the model's sequence_len)")
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command (``prog`` names it in --help and error lines: ``snlp generate`` under ``snlp``)."""
    args = build_parser(prog).parse_args(argv)
    from .runtime import GenerationError
    from .standalone import PackageError
    from .text import TokenizerError

    return run_entry(prog, _run, args, user_errors=(GenerationError, PackageError, TokenizerError))


def _run(args) -> int:
    if args.package:
        given = [name for name in CHECKPOINT_ONLY if getattr(args, name) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UserError(f"{flag} cannot be used with --package: the package fixed it at export time "
                            f"(pass it to snlp export, or use --checkpoint)")
        return _run_package(args)
    if args.compile and args.runtime not in (None, "compile"):
        raise UserError(f"--compile and --runtime {args.runtime} contradict each other: pass one of them")
    if args.compile:
        args.runtime = "compile"
    if args.runtime == "compile" or (args.runtime in (None, "auto") and str(args.device or "").startswith("cuda")):
        compat.raise_dynamo_limits()  # global dynamo settings: set here, at the command's entry
    return _run_checkpoint(args)


def _run_package(args) -> int:
    from .standalone import generate_text

    codec, new, seconds, _ = generate_text(args)
    return _report(codec, args.prompt, new, seconds)


def _run_checkpoint(args) -> int:
    import torch

    from .checkpoint import check_checkpoint_path, load_model, parse_device, parse_dtype
    from .decoder import LayerParallelDecoder
    from .generate import generate_tokens, speculative_tokens
    from .runtime import check_generation, check_tokenizer_size
    from .text import Streamer, TextCodec

    # Settings first (no model is loaded and nothing is built for a bad one).
    device = parse_device(args.device or "cpu")
    dtype = parse_dtype(args.dtype or "float32")
    draft_len = args.speculative or 0
    check_generation(args.temperature, args.top_k, args.seed, args.max_new_tokens)
    requested = args.runtime or "auto"
    if requested == "aot" and draft_len:
        raise UserError("--speculative needs --runtime eager or compile: the AOTInductor package has no verify graph")
    model, tokenizer = load_model(args.checkpoint)
    codec = TextCodec(args.tokenizer or tokenizer or "")
    limit = check_tokenizer_size(codec.size, model.config.vocab_size, codec)
    prompts = [codec.encode(p) for p in args.prompt]
    stop = None if args.no_stop else codec.stop
    decoder = LayerParallelDecoder(model, args.plan or "seq", batch_size=len(prompts), max_seq_len=args.max_seq_len,
                                   dtype=dtype, device=device)
    runtime, package = _choose_runtime(requested, decoder, check_checkpoint_path(args.checkpoint), args.cache_dir, draft_len)
    steps = None
    try:
        with torch.inference_mode():  # compile under the grad mode the steps run in (no recompile)
            if runtime == "compile":
                steps = _compile(decoder, draft_len, fallback=requested == "auto")
                runtime = "compile" if steps is not None else "eager"
            print(f"[runtime: {runtime}]", file=sys.stderr)
            start = time.perf_counter()
            if draft_len:
                new, stats = speculative_tokens(decoder, prompts, args.max_new_tokens, draft_len, args.temperature,
                                                args.top_k, args.seed, steps, vocab_limit=limit, stop_token=stop)
                print(f"\n[self-speculative: {stats.mean_accepted:.2f} draft tokens accepted per round]", file=sys.stderr)
                print(codec.decode(new[0]))
            elif package is not None:
                new = package.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                       seed=args.seed, on_tokens=Streamer(codec), vocab_limit=limit, stop_token=stop)
            else:
                new = generate_tokens(decoder, prompts, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                                      steps, on_tokens=Streamer(codec), vocab_limit=limit, stop_token=stop)
    except torch.OutOfMemoryError:
        raise Fault(f"out of memory on {device}: use fewer or shorter prompts, --max-seq-len, or --dtype bfloat16") from None
    return _report(codec, args.prompt, new, time.perf_counter() - start)


def default_runtime(device, draft_len: int, cached: bool) -> str:
    """What ``--runtime auto`` serves: CUDA -> compile (CUDA-graph replays); CPU -> the AOTInductor
    package when a current one is cached (no build), else eager; speculative decoding never aot."""
    if device.type == "cuda":
        return "compile"
    if device.type == "cpu" and cached and not draft_len:
        return "aot"
    return "eager"


def _choose_runtime(requested: str, decoder, checkpoint, cache_dir, draft_len: int):
    """(runtime, loaded package or None) for ``requested``; ``aot`` builds the package if needed."""
    from .package import cached_package, find_cached_package
    from .standalone import PackageError, load_package

    device = decoder.k_cache.device
    if requested == "auto":
        cached = find_cached_package(decoder, checkpoint, cache_dir) if device.type == "cpu" and not draft_len else None
        runtime = default_runtime(device, draft_len, cached is not None)
        if runtime != "aot":
            if device.type == "cpu" and not draft_len:
                print("[hint: --runtime aot builds an AOTInductor package once (cached) and decodes faster]", file=sys.stderr)
            return runtime, None
        try:
            return "aot", load_package(cached)
        except PackageError as err:
            print(f"[cached package unusable ({err}): running eager]", file=sys.stderr)
            return "eager", None
    if requested != "aot":
        return requested, None
    try:
        folder, _ = cached_package(decoder, checkpoint, cache_dir, log=lambda line: print(line, file=sys.stderr))
    except compat.backend_compiler_failed() as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise Fault(f"--runtime aot failed ({lines[-1].strip() if lines else type(err).__name__}): use --runtime eager") from None
    return "aot", load_package(folder)


def _compile(decoder, draft_len: int, fallback: bool = False):
    """Compiled steps, warmed up; None when compiling fails and ``fallback`` (then eager serves)."""
    from .compiled import compile_steps, warm_up

    compile_failed = compat.backend_compiler_failed()
    steps = compile_steps(decoder)
    print(f"compiling the decode step of {decoder.plan} ...", file=sys.stderr)
    try:
        warm_up(steps["decode"], decoder)
        if draft_len:
            warm_up(steps["verify"], decoder, tokens=draft_len + 1)
    except compile_failed as err:  # no C++ compiler, or one that fails
        lines = [line for line in str(err).splitlines() if line.strip()]
        if fallback:
            print(f"[compiling failed ({lines[-1].strip() if lines else type(err).__name__}): running eager]", file=sys.stderr)
            decoder.reset_cache()
            return None
        raise Fault(f"--compile failed ({lines[-1].strip() if lines else type(err).__name__}): run without --compile") from None
    return steps


def _report(codec, prompts: list[str], new: list[list[int]], seconds: float) -> int:
    print()
    for prompt, tokens in list(zip(prompts, new))[1:]:  # row 0 was streamed
        print(f"--- {prompt!r}\n{codec.decode(tokens)}")
    total = sum(len(t) for t in new)
    print(f"[{total} tokens in {seconds:.2f} s: {total / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
