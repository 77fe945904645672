"""Load and run an exported SNLP package with only torch (and ``tokenizers`` for text).

    package = load_package("exported/idn6")
    new_tokens = package.generate([[0, 512, 17]], max_new_tokens=32)

This file, ``runtime.py`` and ``text.py`` are copied into every package (``snlp_runtime/``); none
of them imports the training code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .runtime import generate

FORMAT = "snlp-export/1"


class ExportedDecoder:
    """The two graphs of a package and the KV cache they share (owned here, mutated in place)."""

    def __init__(self, folder: str | Path):
        from torch._inductor.package import load_package as load_graph

        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not an exported package: no manifest.json")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"package format {self.manifest.get('format')!r} is not supported: expected {FORMAT!r}")
        self.device = torch.device(self.manifest["device"])
        self.batch_size, self.max_seq_len = self.manifest["batch_size"], self.manifest["max_seq_len"]
        self.vocab_size = self.manifest["config"]["vocab_size"]
        dtype = getattr(torch, self.manifest["dtype"])
        self.k_cache = torch.zeros(self.manifest["cache_shape"], dtype=dtype, device=self.device)
        self.v_cache = torch.zeros_like(self.k_cache)
        graphs = str(self.folder / "model.pt2")
        self._prefill, self._decode = load_graph(graphs, "prefill"), load_graph(graphs, "decode")
        tokenizer = self.manifest.get("tokenizer")
        self.tokenizer_path = self.folder / tokenizer if tokenizer else None

    def _check(self, tokens, positions) -> None:
        # The compiled graphs do not check their inputs; an out-of-range position aborts the process.
        if tokens.dim() != 2 or tokens.size(0) != self.batch_size:
            raise ValueError(f"tokens must have shape ({self.batch_size}, T), got {tuple(tokens.shape)}")
        if int(positions.max()) >= self.max_seq_len or int(positions.min()) < 0:
            raise ValueError(f"position {int(positions.max())} is outside the KV cache of {self.max_seq_len} positions")
        if int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0:
            raise ValueError(f"token id {int(tokens.max())} is out of the vocabulary: allowed 0..{self.vocab_size - 1}")

    def prefill(self, tokens, positions, prev):
        """(B, T) tokens at (B, T) positions -> logits (B, T, V); fills the cache."""
        self._check(tokens, positions)
        # The graphs were compiled for contiguous inputs: an expanded (stride 0) tensor reads wrongly.
        return self._prefill(tokens.contiguous(), positions.contiguous(), prev.contiguous(), self.k_cache, self.v_cache)

    def decode(self, tokens, positions, prev):
        """(B, 1) tokens -> logits (B, 1, V), one step of the exported plan."""
        self._check(tokens, positions)
        return self._decode(tokens.contiguous(), positions.contiguous(), prev.contiguous(), self.k_cache, self.v_cache)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, **sampling) -> list[list[int]]:
        return generate(self.prefill, self.decode, prompts, max_new_tokens, rows=self.batch_size,
                        max_seq_len=self.max_seq_len, device=self.device, **sampling)


def load_package(folder: str | Path) -> ExportedDecoder:
    return ExportedDecoder(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="generate.py", description="Generate text with an exported SNLP package.")
    p.add_argument("package", help="the package folder")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--print-tokens", action="store_true", help="also print the new token ids (one line per prompt)")
    args = p.parse_args(argv)
    from .text import Streamer, TextCodec

    try:
        package = load_package(args.package)
        codec = TextCodec(args.tokenizer or package.tokenizer_path or "")
        prompts = [codec.encode(text) for text in args.prompt]
        start = time.perf_counter()
        with torch.inference_mode():
            new = package.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                   seed=args.seed, on_tokens=Streamer(codec))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print()
    if args.print_tokens:
        for tokens in new:
            print(" ".join(map(str, tokens)))
    total = sum(len(t) for t in new)
    print(f"[{total} tokens in {time.perf_counter() - start:.2f} s, plan {package.manifest['plan']}]", file=sys.stderr)
    return 0
