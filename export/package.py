"""``snlp export`` (alias ``snlp-export``): a trained checkpoint + a plan -> one AOTInductor ``.pt2``
and a manifest.

    snlp export --checkpoint runs/quickstart/checkpoints/last.ckpt --plan idn:n6:3xF2:K2 --out exported/idn6

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
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from snlp_lightning.errors import (
    ArgumentParser, UserError, at_least, check_output_dir, clean_stale_temps, earlier_output_problem, install_dir, make_temp_dir,
    require_file, run_entry,
)

from .decoder import LayerParallelDecoder, example_inputs

PROG = "snlp-export"
FORMAT = "snlp-export/1"
RUNTIME_FILES = ("__init__.py", "runtime.py", "text.py", "standalone.py")
# Everything a package folder holds: --overwrite replaces only a folder with nothing else in it.
PACKAGE_ENTRIES = ("model.pt2", "manifest.json", "tokenizer.json", "generation_config.json", "snlp_runtime", "generate.py")
LAUNCHER = '''"""Generate text with this exported package: python generate.py --prompt "Once upon a time"."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from snlp_runtime.standalone import main  # noqa: E402

raise SystemExit(main([str(Path(__file__).resolve().parent)] + sys.argv[1:]))
'''


class ExportError(UserError):
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


def package_problem(folder: Path) -> str | None:
    """None when ``folder`` is an earlier snlp-export package (a manifest of this format and nothing but
    a package's own entries); else why it is not (``--overwrite`` replaces only packages)."""
    return earlier_output_problem(folder, FORMAT, PACKAGE_ENTRIES)


def check_package_dir(out: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """``out`` may become (or replace) a package folder: new, empty, or with ``overwrite`` an earlier
    package that holds none of ``inputs``. Raises ExportError naming the problem."""
    out = Path(out).expanduser()
    try:
        return check_output_dir(out, what="output folder", overwrite=overwrite, is_own_output=package_problem, inputs=inputs)
    except UserError as err:
        if not overwrite and "already exists" in str(err):
            if package_problem(out) is None:
                raise ExportError(f"output folder {out} exists: pass --overwrite to replace it") from None
            raise ExportError(f"output folder {out} exists and is not an snlp-export package ({package_problem(out)}): "
                              "choose a new folder") from None
        raise ExportError(str(err)) from None


def export_package(
    decoder: LayerParallelDecoder,
    out: str | Path,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
    source: dict | None = None,
) -> Path:
    """Compile both entry points and write the package folder all or nothing (built in a temporary
    folder beside ``out``, then renamed over it); returns it.

    ``out`` must be new, empty, or (with ``overwrite``) an earlier package holding neither the
    tokenizer nor any of ``inputs`` (e.g. the checkpoint). ``source``: recorded in the manifest
    (what the package was built from; the runtime cache compares it, see ``cached_package``).
    """
    from torch._inductor.package import package_aoti

    out = Path(out).expanduser()
    if tokenizer is not None:
        tokenizer = Path(tokenizer).expanduser()
        try:
            require_file(tokenizer, "tokenizer")
        except UserError as err:
            raise ExportError(str(err)) from None
    clean_stale_temps(out.parent)  # the leftovers of an export that died
    out = check_package_dir(out, overwrite, [*inputs, *([tokenizer] if tokenizer is not None else [])])
    staging = make_temp_dir(out)
    try:
        with torch.no_grad():
            files = {
                "prefill": _compile_entry(decoder, "prefill", min(8, decoder.max_seq_len), dynamic=decoder.max_seq_len > 1),
                "decode": _compile_entry(decoder, "decode", 1, dynamic=False),
            }
        package_aoti(str(staging / "model.pt2"), files)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, staging / "tokenizer.json")
            if (tokenizer.parent / "generation_config.json").is_file():  # a Hugging Face model's EOS (text.eos_id_near)
                shutil.copyfile(tokenizer.parent / "generation_config.json", staging / "generation_config.json")
        runtime = staging / "snlp_runtime"
        runtime.mkdir()
        here = Path(__file__).parent
        for name in RUNTIME_FILES:
            original = here / name if name != "__init__.py" else None
            (runtime / name).write_text(original.read_text() if original else '"""The torch-only runtime of an exported SNLP package."""\n')
        (staging / "generate.py").write_text(LAUNCHER)
        (staging / "manifest.json").write_text(json.dumps(manifest(decoder, tokenizer is not None, source), indent=2) + "\n")
        _sync_tree(staging)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # a temporary folder is private (0700); a package is not
        install_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _sync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` to disk before it is renamed into place."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def manifest(decoder: LayerParallelDecoder, has_tokenizer: bool, source: dict | None = None) -> dict:
    extra = {"source": source} if source is not None else {}
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
        **extra,
    }


# -- the runtime cache: packages built in-process for ``snlp generate --runtime aot`` -----------------
def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where built packages are kept: ``cache_dir``, else $SNLP_CACHE_DIR, else $XDG_CACHE_HOME/snlp
    (~/.cache/snlp); packages go to ``<root>/aot/<key>``."""
    if cache_dir is None:
        cache_dir = os.environ.get("SNLP_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "snlp"
    return Path(cache_dir).expanduser()


def package_source(decoder: LayerParallelDecoder, checkpoint: str | Path) -> dict:
    """Everything a built package depends on: the checkpoint file (path, size, modification time),
    the plan, dtype, device, cache shape and torch version. A package is reused only for an equal one."""
    path = Path(checkpoint).expanduser().resolve()
    files = [path] if path.is_file() else sorted([*path.glob("model_*.pt"), *path.glob("meta_*.json")])  # nanochat folder
    return {
        "format": FORMAT,
        "checkpoint": str(path),
        "checkpoint_files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "plan": str(decoder.plan),
        "dtype": str(decoder.dtype).removeprefix("torch."),
        "device": str(decoder.k_cache.device),
        "batch_size": decoder.batch_size,
        "max_seq_len": decoder.max_seq_len,
        "cache_shape": list(decoder.k_cache.shape),
        "torch": torch.__version__,
    }


def cache_key(source: dict) -> str:
    import hashlib

    digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    plan = "".join(c if c.isalnum() else "_" for c in source["plan"])
    return f"{Path(source['checkpoint']).stem}-{plan}-{source['dtype']}-b{source['batch_size']}-t{source['max_seq_len']}-{digest}"


def cached_source(folder: Path) -> dict | None:
    """The ``source`` a cached package was built from (None when the folder is no usable package)."""
    try:
        data = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not (folder / "model.pt2").is_file():
        return None
    return data.get("source")


def find_cached_package(decoder: LayerParallelDecoder, checkpoint: str | Path, cache_dir: str | Path | None = None) -> Path | None:
    """The cached package of ``decoder`` built from ``checkpoint`` if one is there and current, else None."""
    source = package_source(decoder, checkpoint)
    folder = cache_root(cache_dir) / "aot" / cache_key(source)
    return folder if cached_source(folder) == source else None


def cached_package(
    decoder: LayerParallelDecoder, checkpoint: str | Path, cache_dir: str | Path | None = None, log=None
) -> tuple[Path, bool]:
    """The AOTInductor package of ``decoder`` (built from ``checkpoint``) in the runtime cache:
    reused when its recorded source equals this one (same checkpoint file, plan, dtype, device,
    cache shape, torch), else built (about 40 s for the quickstart model on the 2-core CPU of
    docs/benchmarks.md) and installed. Returns (folder, whether it was built now)."""
    source = package_source(decoder, checkpoint)
    root = cache_root(cache_dir) / "aot"
    folder = root / cache_key(source)
    if cached_source(folder) == source:
        return folder, False
    if log is not None:
        log(f"building the AOTInductor package of {decoder.plan} (once; cached in {folder}) ...")
    root.mkdir(parents=True, exist_ok=True)
    stale = folder.exists() and package_problem(folder) is None
    export_package(decoder, folder, overwrite=stale, source=source)
    return folder, True


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description="Export a checkpoint + plan to an AOTInductor package, or a Llama / Qwen2 / "
                       "Gemma 3 checkpoint to a Hugging Face folder (--format hf).")
    p.add_argument("--checkpoint", required=True, help="a .ckpt from snlp fit, a nanochat checkpoint, or a Hugging Face folder")
    p.add_argument("--format", choices=("package", "hf"), default="package",
                   help="package: the compiled layer-parallel decoder; hf: a folder transformers loads (HF families only)")
    p.add_argument("--plan", default="seq", help="solver plan, e.g. idn:n6:3xF2:K2")
    p.add_argument("--out", required=True, help="output folder (new, or an earlier package with --overwrite)")
    p.add_argument("--batch-size", type=at_least(1), default=1, help="KV cache rows")
    p.add_argument("--max-seq-len", type=at_least(1), default=None, help="KV cache positions (default: the model's sequence_len)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's training tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is an earlier snlp-export package (hf: its model files)")
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command (``prog`` names it in --help and error lines: ``snlp export`` under ``snlp``)."""
    args = build_parser(prog).parse_args(argv)
    from .runtime import GenerationError
    from .text import TokenizerError

    return run_entry(prog, _run, args, user_errors=(GenerationError, TokenizerError))


def _run(args) -> int:
    from .checkpoint import check_checkpoint_path, load_model, parse_device, parse_dtype

    # Every check that needs no model first: a bad --out or setting costs no checkpoint load.
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    checkpoint = check_checkpoint_path(args.checkpoint)
    if args.format == "hf":
        return _run_hf(args, checkpoint, dtype)
    check_package_dir(args.out, args.overwrite, [checkpoint, *([args.tokenizer] if args.tokenizer else [])])
    model, tokenizer = load_model(checkpoint)
    tokenizer = args.tokenizer or tokenizer
    if tokenizer is not None:  # a package whose tokenizer cannot serve its model would fail only when used
        from .runtime import check_tokenizer_size
        from .text import TextCodec

        codec = TextCodec(tokenizer)
        check_tokenizer_size(codec.size, model.config.vocab_size, codec)
    decoder = LayerParallelDecoder(model, args.plan, args.batch_size, args.max_seq_len, dtype, device)
    start = time.perf_counter()
    out = export_package(decoder, args.out, tokenizer, args.overwrite, inputs=[checkpoint])
    size = (out / "model.pt2").stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB, plan {decoder.plan}, {time.perf_counter() - start:.0f} s)")
    return 0


def _run_hf(args, checkpoint, dtype) -> int:
    """``--format hf``: the model as a Hugging Face folder (config.json, model.safetensors, tokenizer)."""
    from snlp_lightning.models.hf_io import save_hf

    from .checkpoint import load_model

    model, tokenizer = load_model(checkpoint)
    if not model.config.is_hf:
        raise UserError(f"--format hf writes Llama / Qwen2 / Gemma 3 models; {checkpoint} is a {model.config.family} model "
                        "(nanochat checkpoints: snlp_lightning.models.nanochat_io.save_nanochat)")
    out = save_hf(model, args.out, tokenizer_from=args.tokenizer or tokenizer, dtype=dtype, overwrite=args.overwrite)
    print(f"wrote {out} (Hugging Face {model.config.family} folder, {dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
