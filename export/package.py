"""``snlp-export``: a trained checkpoint + a plan -> one AOTInductor ``.pt2`` and a manifest.

    snlp-export --checkpoint runs/quickstart/checkpoints/last.ckpt --plan idn:n6:3xF2:K2 --out exported/idn6

The folder holds ``model.pt2`` with two compiled graphs (``prefill``: T tokens, T dynamic in
1..max_seq_len; ``decode``: one token per row), ``manifest.json`` (model config, plan, dtype,
device, cache shape, tokenizer), ``tokenizer.json`` and ``snlp_runtime/``, the torch-only loader
(``python <folder>/generate.py --prompt "..."`` runs it without this project installed).

The KV caches are plain inputs of both graphs, mutated in place, so the two graphs share one
cache that the caller owns. Each graph embeds its own copy of the weights (the package is about
twice the weight size): the public ``package_aoti`` route has no shared-weights option that the
public loader can read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .decoder import LayerParallelDecoder, example_inputs

FORMAT = "snlp-export/1"
RUNTIME_FILES = ("__init__.py", "runtime.py", "text.py", "standalone.py")
LAUNCHER = '''"""Generate text with this exported package: python generate.py --prompt "Once upon a time"."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from snlp_runtime.standalone import main  # noqa: E402

raise SystemExit(main([str(Path(__file__).resolve().parent)] + sys.argv[1:]))
'''


class ExportError(ValueError):
    """Export settings or an output folder that cannot be used."""


class _Entry(nn.Module):
    """One entry point of the decoder with the KV caches as explicit inputs."""

    def __init__(self, decoder: LayerParallelDecoder, entry: str):
        super().__init__()
        self.decoder, self.entry = decoder, entry

    def forward(self, tokens: Tensor, positions: Tensor, prev: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        step = self.decoder.prefill if self.entry == "prefill" else self.decoder.decode
        return step(tokens, positions, prev, caches=(k_cache, v_cache))


def _compile_entry(decoder: LayerParallelDecoder, entry: str, tokens: int, dynamic: bool) -> list[str]:
    args = (*example_inputs(decoder, tokens), torch.zeros_like(decoder.k_cache), torch.zeros_like(decoder.v_cache))
    shapes = None
    if dynamic:
        t = torch.export.Dim("T", min=1, max=decoder.max_seq_len)
        shapes = ({1: t}, {1: t}, None, None, None)
    program = torch.export.export(_Entry(decoder, entry), args, dynamic_shapes=shapes, strict=False)
    return torch._inductor.aot_compile(program.module(), args, options={"aot_inductor.package": True})


def export_package(
    decoder: LayerParallelDecoder, out: str | Path, tokenizer: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Compile both entry points, write the package folder atomically (temp dir + rename); returns it."""
    from torch._inductor.package import package_aoti

    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"output folder {out} exists: pass --overwrite to replace it")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ExportError(f"tokenizer {tokenizer} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        with torch.no_grad():
            files = {
                "prefill": _compile_entry(decoder, "prefill", min(8, decoder.max_seq_len), dynamic=decoder.max_seq_len > 1),
                "decode": _compile_entry(decoder, "decode", 1, dynamic=False),
            }
        package_aoti(str(staging / "model.pt2"), files)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, staging / "tokenizer.json")
        runtime = staging / "snlp_runtime"
        runtime.mkdir()
        here = Path(__file__).parent
        for name in RUNTIME_FILES:
            source = here / name if name != "__init__.py" else None
            (runtime / name).write_text(source.read_text() if source else '"""The torch-only runtime of an exported SNLP package."""\n')
        (staging / "generate.py").write_text(LAUNCHER)
        (staging / "manifest.json").write_text(json.dumps(manifest(decoder, tokenizer is not None), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def manifest(decoder: LayerParallelDecoder, has_tokenizer: bool) -> dict:
    return {
        "format": FORMAT,
        "plan": str(decoder.plan),
        "config": dataclasses.asdict(decoder.config),
        "dtype": str(decoder.dtype).removeprefix("torch."),
        "device": decoder.k_cache.device.type,
        "batch_size": decoder.batch_size,
        "max_seq_len": decoder.max_seq_len,
        "cache_shape": list(decoder.k_cache.shape),
        "entries": {"prefill": "T tokens, 1 <= T <= max_seq_len", "decode": "1 token per row"},
        "step_signature": "(tokens (B, T) int64, positions (B, T) int64, prev (B,) int64, k_cache, v_cache) -> logits (B, T, V) float32",
        "tokenizer": "tokenizer.json" if has_tokenizer else None,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="snlp-export", description="Export a checkpoint + plan to an AOTInductor package.")
    p.add_argument("--checkpoint", required=True, help="a .ckpt from snlp fit, or a nanochat checkpoint")
    p.add_argument("--plan", default="seq", help="solver plan, e.g. idn:n6:3xF2:K2")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=1, help="KV cache rows")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache positions (default: the model's sequence_len)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's training tokenizer)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    from .checkpoint import load_model, parse_dtype

    try:
        model, tokenizer = load_model(args.checkpoint)
        decoder = LayerParallelDecoder(model, args.plan, args.batch_size, args.max_seq_len, parse_dtype(args.dtype), torch.device(args.device))
        start = time.perf_counter()
        out = export_package(decoder, args.out, args.tokenizer or tokenizer, args.overwrite)
    except (ValueError, FileNotFoundError) as err:
        print(f"snlp-export: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    size = (out / "model.pt2").stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB, plan {decoder.plan}, {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
