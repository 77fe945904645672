"""``snlp-generate``: stream text from a checkpoint (any plan, eager or compiled) or an exported package.

    snlp-generate --checkpoint runs/quickstart/checkpoints/last.ckpt --plan idn:n6:3xF2:K2 --prompt "The"
    snlp-generate --checkpoint last.ckpt --plan idn:n4:K1 --speculative 4 --prompt "The"
    snlp-generate --package exported/idn_n6_K2 --prompt "The" --temperature 0.8 --top-k 50
"""

from __future__ import annotations

import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snlp-generate", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a .ckpt from snlp fit, or a nanochat checkpoint")
    src.add_argument("--package", help="a folder written by snlp-export (runs without the training code)")
    p.add_argument("--plan", default="seq", help="solver plan, e.g. idn:n6:3xF2:K2 (checkpoint only; default seq)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", type=int, default=0, metavar="D", help="self-speculative: D draft tokens per round")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA: + CUDA graphs)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one the checkpoint was trained with)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default: the model's sequence_len)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"snlp-generate: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from .text import Streamer, TextCodec

    if args.package:
        from .standalone import load_package

        package = load_package(args.package)
        codec = TextCodec(args.tokenizer or package.tokenizer_path)
        prompts = [codec.encode(p) for p in args.prompt]
        start = time.perf_counter()
        new = package.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               seed=args.seed, on_tokens=Streamer(codec))
        return _report(codec, args.prompt, new, time.perf_counter() - start)

    import torch

    from .checkpoint import load_model, parse_dtype
    from .compiled import compile_steps, warm_up
    from .decoder import LayerParallelDecoder
    from .generate import generate_tokens, speculative_tokens

    model, tokenizer = load_model(args.checkpoint)
    codec = TextCodec(args.tokenizer or tokenizer or "")
    prompts = [codec.encode(p) for p in args.prompt]
    decoder = LayerParallelDecoder(model, args.plan, batch_size=len(prompts), max_seq_len=args.max_seq_len,
                                   dtype=parse_dtype(args.dtype), device=torch.device(args.device))
    steps = None
    with torch.inference_mode():  # compile under the grad mode the steps run in (no recompile)
        if args.compile:
            steps = compile_steps(decoder)
            print(f"compiling the decode step of {decoder.plan} ...", file=sys.stderr)
            warm_up(steps["decode"], decoder)
            if args.speculative:
                warm_up(steps["verify"], decoder, tokens=args.speculative + 1)
        start = time.perf_counter()
        if args.speculative:
            new, stats = speculative_tokens(decoder, prompts, args.max_new_tokens, args.speculative, args.temperature,
                                            args.top_k, args.seed, steps)
            print(f"\n[self-speculative: {stats.mean_accepted:.2f} draft tokens accepted per round]", file=sys.stderr)
            print(codec.decode(new[0]))
        else:
            new = generate_tokens(decoder, prompts, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                                  steps, on_tokens=Streamer(codec))
    return _report(codec, args.prompt, new, time.perf_counter() - start)


def _report(codec, prompts: list[str], new: list[list[int]], seconds: float) -> int:
    print()
    for prompt, tokens in list(zip(prompts, new))[1:]:  # row 0 was streamed
        print(f"--- {prompt!r}\n{codec.decode(tokens)}")
    total = sum(len(t) for t in new)
    print(f"[{total} tokens in {seconds:.2f} s: {total / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
