"""``snlp generate`` (alias ``snlp-generate``): stream text from a checkpoint (any plan, eager or
compiled) or an exported package.

    snlp generate --checkpoint runs/quickstart/checkpoints/last.ckpt --plan idn:n6:3xF2:K2 --prompt "The"
    snlp generate --checkpoint last.ckpt --plan idn:n4:K1 --speculative 4 --prompt "The"
    snlp generate --package exported/idn_n6_K2 --prompt "The" --temperature 0.8 --top-k 50
"""

from __future__ import annotations

import argparse
import sys
import time

from snlp_lightning import compat
from snlp_lightning.errors import ArgumentParser, Fault, UserError, at_least, run_entry

PROG = "snlp-generate"
# Settings an exported package fixed at export time (snlp export takes them instead).
CHECKPOINT_ONLY = ("plan", "dtype", "device", "compile", "speculative", "max_seq_len")


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
                   help="torch.compile the decode step (CUDA: + CUDA graphs; checkpoint only)")
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
    if args.compile:
        compat.raise_dynamo_limits()  # global dynamo settings: set here, at the command's entry
    return _run_checkpoint(args)


def _run_package(args) -> int:
    from .standalone import generate_text

    codec, new, seconds, _ = generate_text(args)
    return _report(codec, args.prompt, new, seconds)


def _run_checkpoint(args) -> int:
    import torch

    from .checkpoint import load_model, parse_device, parse_dtype
    from .decoder import LayerParallelDecoder
    from .generate import generate_tokens, speculative_tokens
    from .runtime import check_tokenizer_size
    from .text import Streamer, TextCodec

    # Settings first (no model is loaded for a bad one).
    device = parse_device(args.device or "cpu")
    dtype = parse_dtype(args.dtype or "float32")
    draft_len = args.speculative or 0
    model, tokenizer = load_model(args.checkpoint)
    codec = TextCodec(args.tokenizer or tokenizer or "")
    limit = check_tokenizer_size(codec.size, model.config.vocab_size, codec)
    prompts = [codec.encode(p) for p in args.prompt]
    decoder = LayerParallelDecoder(model, args.plan or "seq", batch_size=len(prompts), max_seq_len=args.max_seq_len,
                                   dtype=dtype, device=device)
    steps = None
    try:
        with torch.inference_mode():  # compile under the grad mode the steps run in (no recompile)
            if args.compile:
                steps = _compile(decoder, draft_len)
            start = time.perf_counter()
            if draft_len:
                new, stats = speculative_tokens(decoder, prompts, args.max_new_tokens, draft_len, args.temperature,
                                                args.top_k, args.seed, steps, vocab_limit=limit)
                print(f"\n[self-speculative: {stats.mean_accepted:.2f} draft tokens accepted per round]", file=sys.stderr)
                print(codec.decode(new[0]))
            else:
                new = generate_tokens(decoder, prompts, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                                      steps, on_tokens=Streamer(codec), vocab_limit=limit)
    except torch.OutOfMemoryError:
        raise Fault(f"out of memory on {device}: use fewer or shorter prompts, --max-seq-len, or --dtype bfloat16") from None
    return _report(codec, args.prompt, new, time.perf_counter() - start)


def _compile(decoder, draft_len: int):
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
