"""Load and run an exported SNLP package with only torch (and ``tokenizers`` for text).

    package = load_package("exported/idn6")
    new_tokens = package.generate([[0, 512, 17]], max_new_tokens=32)

This file, ``runtime.py`` and ``text.py`` are copied into every package (``snlp_runtime/``); none
of them imports the training code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .runtime import GenerationError, check_tokenizer_size, generate

FORMAT = "snlp-export/1"


class PackageError(ValueError):
    """A package folder, manifest or model.pt2 that cannot be used; the message names the file."""


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def read_manifest(folder: str | Path) -> dict:
    """The checked ``manifest.json`` of a package folder (PackageError naming the file otherwise)."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise PackageError(f"package {folder} does not exist")
    if not folder.is_dir():
        raise PackageError(f"package {folder} is not a folder: give the folder written by snlp-export")
    path = folder / "manifest.json"
    if not path.is_file():
        raise PackageError(f"{folder} is not an exported package: no manifest.json")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PackageError(f"package manifest {path} is not UTF-8 text: export the package again") from None
    except json.JSONDecodeError as err:
        raise PackageError(f"package manifest {path} is not valid JSON ({err}): export the package again") from None
    if not isinstance(manifest, dict):
        raise PackageError(f"package manifest {path} holds a {type(manifest).__name__}, not a JSON object")
    if manifest.get("format") != FORMAT:
        raise PackageError(f"package manifest {path} has format {manifest.get('format')!r}: expected {FORMAT!r}")
    checks = {
        "plan": (lambda v: isinstance(v, str) and v, "a plan string"),
        "config": (lambda v: isinstance(v, dict) and _is_count(v.get("vocab_size")), "the model config with a positive vocab_size"),
        "dtype": (lambda v: isinstance(v, str) and isinstance(getattr(torch, v, None), torch.dtype), "a torch dtype name"),
        "device": (lambda v: isinstance(v, str) and v, "a device name"),
        "batch_size": (_is_count, "a positive integer"),
        "max_seq_len": (_is_count, "a positive integer"),
        "cache_shape": (lambda v: isinstance(v, list) and v and all(_is_count(x) for x in v), "a list of positive integers"),
    }
    for field, (ok, expected) in checks.items():
        if field not in manifest:
            raise PackageError(f"package manifest {path} lacks the field {field!r}: export the package again")
        if not ok(manifest[field]):
            raise PackageError(f"package manifest {path}: field {field!r} is {manifest[field]!r}, expected {expected}")
    tokenizer = manifest.get("tokenizer")
    if tokenizer is not None and not (isinstance(tokenizer, str) and tokenizer and Path(tokenizer).name == tokenizer):
        raise PackageError(f"package manifest {path}: field 'tokenizer' is {tokenizer!r}, expected a file name in the package or null")
    return manifest


def package_device(name: str, folder: Path) -> torch.device:
    """The device a package was exported for, if this torch can use it."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise PackageError(f"package {folder} names device {name!r}, which this torch does not know ({err})") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None) if device.type != "mps" else getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise PackageError(f"package {folder} was exported for device {name!r}, which this machine or torch "
                           f"{torch.__version__} does not have: export it again with --device cpu")
    return device


class ExportedDecoder:
    """The two graphs of a package and the KV cache they share (owned here, mutated in place)."""

    def __init__(self, folder: str | Path):
        from torch._inductor.package import load_package as load_graph

        self.folder = Path(folder).expanduser()
        self.manifest = read_manifest(self.folder)
        self.device = package_device(self.manifest["device"], self.folder)
        self.batch_size, self.max_seq_len = self.manifest["batch_size"], self.manifest["max_seq_len"]
        self.vocab_size = self.manifest["config"]["vocab_size"]
        dtype = getattr(torch, self.manifest["dtype"])
        self.k_cache = torch.zeros(self.manifest["cache_shape"], dtype=dtype, device=self.device)
        self.v_cache = torch.zeros_like(self.k_cache)
        graphs = self.folder / "model.pt2"
        if not graphs.is_file():
            raise PackageError(f"package {self.folder} has no model.pt2 (a file): export the package again")
        try:
            self._prefill, self._decode = load_graph(str(graphs), "prefill"), load_graph(str(graphs), "decode")
        except OSError:
            raise
        except Exception as err:  # a truncated or foreign archive: torch raises several types
            built = self.manifest.get("torch")
            why = (f"it is truncated or corrupt, or torch {torch.__version__} cannot read what torch {built} wrote"
                   if built and built != torch.__version__ else "it is truncated or corrupt")
            raise PackageError(f"{graphs} cannot be loaded: {why}; export the package again "
                               f"({type(err).__name__}: {_first_line(err)})") from None
        tokenizer = self.manifest.get("tokenizer")
        self.tokenizer_path = self.folder / tokenizer if tokenizer else None

    def _check(self, tokens, positions) -> None:
        # The compiled graphs do not check their inputs; an out-of-range position aborts the process.
        if tokens.dim() != 2 or tokens.size(0) != self.batch_size:
            raise GenerationError(f"tokens must have shape ({self.batch_size}, T), got {tuple(tokens.shape)}")
        if int(positions.max()) >= self.max_seq_len or int(positions.min()) < 0:
            raise GenerationError(f"position {int(positions.max())} is outside the KV cache of {self.max_seq_len} positions")
        if int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0:
            raise GenerationError(f"token id {int(tokens.max())} is out of the vocabulary: allowed 0..{self.vocab_size - 1}")

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
        """New tokens per prompt; ``sampling``: temperature, top_k, seed, on_tokens, vocab_limit and
        stop_token (a row ends at it, e.g. the tokenizer's ``<|bos|>``), as in ``runtime.generate``."""
        return generate(self.prefill, self.decode, prompts, max_new_tokens, rows=self.batch_size,
                        max_seq_len=self.max_seq_len, device=self.device, **sampling)


def load_package(folder: str | Path) -> ExportedDecoder:
    return ExportedDecoder(folder)


def _first_line(message: object) -> str:
    text = str(message).strip()
    return text.splitlines()[0] if text else type(message).__name__


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: must be >= 1")
    return value


class _OneLineParser(argparse.ArgumentParser):
    """A bad argument is one line, exit code 2 (this runtime cannot import the project's own parser)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {' '.join(message.split())} (all options: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    p = _OneLineParser(prog="generate.py", description="Generate text with an exported SNLP package.")
    p.add_argument("package", help="the package folder")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--print-tokens", action="store_true", help="also print the new token ids (one line per prompt)")
    p.add_argument("--no-stop", action="store_true",
                   help="go on after the end token (<|bos|>, or a Hugging Face model's EOS; default: a row ends there)")
    args = p.parse_args(argv)
    # This file runs without the training code, so it has its own copy of the commands' error policy:
    # bad input is one line and exit code 2, a failed read or write one line and exit code 1.
    try:
        return _generate(args)
    except KeyboardInterrupt:
        if os.environ.get("SNLP_TRACEBACK"):
            raise
        print(f"\n{p.prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        if os.environ.get("SNLP_TRACEBACK"):
            raise
        if isinstance(err, OSError):
            where = f"{err.filename}: " if err.filename else ""
            print(f"{p.prog}: error: {where}{err.strerror or _first_line(err)}", file=sys.stderr)
            return 1
        print(f"{p.prog}: error: {_first_line(err)}", file=sys.stderr)
        return 2


def generate_text(args) -> tuple:
    """Prompts in ``args`` (package, tokenizer, prompt, max_new_tokens, temperature, top_k, seed,
    no_stop) -> (codec, new token ids per prompt, seconds, plan), row 0 streamed to stdout (special
    tokens left out); a row ends at the end-of-document token ``<|bos|>`` (kept in its ids) unless
    ``args.no_stop``; shared with snlp-generate."""
    from .text import Streamer, TextCodec

    package = load_package(args.package)
    codec = TextCodec(args.tokenizer or package.tokenizer_path or "")
    limit = check_tokenizer_size(codec.size, package.vocab_size, codec)
    prompts = [codec.encode(text) for text in args.prompt]
    start = time.perf_counter()
    with torch.inference_mode():
        new = package.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               seed=args.seed, on_tokens=Streamer(codec), vocab_limit=limit,
                               stop_token=None if getattr(args, "no_stop", False) else codec.stop)
    return codec, new, time.perf_counter() - start, package.manifest["plan"]


def _generate(args) -> int:
    codec, new, seconds, plan = generate_text(args)
    print()
    if args.print_tokens:
        for tokens in new:
            print(" ".join(map(str, tokens)))
    total = sum(len(t) for t in new)
    print(f"[{total} tokens in {seconds:.2f} s, plan {plan}]", file=sys.stderr)
    return 0
