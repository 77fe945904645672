"""Hugging Face model folders in and out: Llama, Qwen2 and Gemma 3 text models (``models/llama.py``).

A folder holds ``config.json`` (``ModelConfig.from_hf`` reads it), the weights as
``model.safetensors``, sharded ``model-0000i-of-0000n.safetensors`` with their
``model.safetensors.index.json``, or ``pytorch_model.bin``, and usually the tokenizer files.
transformers' names map to ours by three prefixes; everything below them is the same:

    model.embed_tokens.*   <->  transformer.wte.*
    model.layers.{i}.*     <->  transformer.h.{i}.*
    model.norm.*           <->  transformer.ln_f.*
    lm_head.weight         <->  lm_head.weight        (absent from the folder when tied)

Nothing here imports transformers; ``save_hf`` writes a folder that
``AutoModelForCausalLM.from_pretrained`` loads with the same logits (tests/test_hf_families.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import CheckpointError, atomic_file, atomic_write_text, first_line, non_finite_entries
from .llama import Llama

_PREFIXES = (("model.embed_tokens.", "transformer.wte."), ("model.layers.", "transformer.h."), ("model.norm.", "transformer.ln_f."))
# Tokenizer and generation files copied along with a model (whichever the source folder has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "generation_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def to_ours(name: str) -> str:
    for theirs, ours in _PREFIXES:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return name


def to_hf(name: str) -> str:
    for theirs, ours in _PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def read_hf_state(folder: Path) -> dict[str, Tensor]:
    """Every tensor of the folder's weight files, by transformers' names."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(folder / shard))
            return state
        if (folder / "model.safetensors").is_file():
            return load_file(folder / "model.safetensors")
        if (folder / "pytorch_model.bin").is_file():
            return dict(torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"the weights of {folder} cannot be read: {type(err).__name__}: {first_line(err)}") from None
    raise CheckpointError(f"{folder} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")


def load_hf(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, **overrides) -> Llama:
    """Our model of a local Hugging Face folder (no network), weights in ``dtype``.

    ``overrides``: ModelConfig fields to change, e.g. ``sequence_len`` (the RoPE tables' and the
    KV cache's length; default the model's max_position_embeddings). Raises CheckpointError
    naming missing / unknown tensors, bad shapes or NaN weights."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: a Hugging Face model folder holds config.json and the weights")
    cfg = ModelConfig.from_hf(folder, **overrides)
    theirs = read_hf_state(folder)
    state = {to_ours(k): v for k, v in theirs.items() if not k.endswith("rotary_emb.inv_freq")}  # old files keep RoPE buffers
    bad = non_finite_entries(state)
    if bad:
        raise CheckpointError(f"{folder} holds NaN/inf weights ({', '.join(bad)}): it cannot be used")
    with torch.device("meta"):
        expected = Llama(cfg).state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)  # some tied checkpoints store it anyway: the table wins
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unknown:
        parts = [f"{what}: {', '.join(to_hf(k) for k in keys[:6])}{' ...' if len(keys) > 6 else ''}"
                 for what, keys in (("missing tensors", missing), ("unknown tensors", unknown)) if keys]
        raise CheckpointError(f"{folder} does not match its config.json ({'; '.join(parts)})")
    for name, value in state.items():
        if value.shape != expected[name].shape:
            raise CheckpointError(f"{folder}: tensor {to_hf(name)} has shape {tuple(value.shape)}, config.json needs {tuple(expected[name].shape)}")
    model = Llama(cfg).to(dtype)  # first: loading into float32 parameters would round float64 weights
    model.load_state_dict(state, strict=not cfg.tie_embeddings)
    return model


def save_hf(model: Llama, folder: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None,
            dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` as a Hugging Face folder: config.json, model.safetensors (weights in
    ``dtype``, default theirs) and the tokenizer files of ``tokenizer_from`` (a folder, or a
    tokenizer.json file), each
    atomically. A non-empty folder is refused unless ``overwrite``; even then only the files named
    here are replaced, and a folder holding sharded weights is refused (they would go stale)."""
    from safetensors.torch import save

    cfg = model.config
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is a file: give a folder for the Hugging Face model")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{folder} is not empty: pass overwrite=True (--overwrite) to replace its model files, or choose a new folder")
        if (folder / "model.safetensors.index.json").exists():
            raise CheckpointError(f"{folder} holds sharded weights that would go stale: choose a new folder")
    state = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        value = value.detach()[: cfg.vocab_size] if name in ("transformer.wte.weight", "lm_head.weight") else value.detach()
        state[to_hf(name)] = value.to(dtype or value.dtype).contiguous().cpu()
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / "model.safetensors") as f:
        f.write(save(state, metadata={"format": "pt"}))
    config = {**cfg.to_hf(), "torch_dtype": str(dtype or model.lm_head.weight.dtype).removeprefix("torch.")}
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    if tokenizer_from is not None:
        source = Path(tokenizer_from).expanduser()
        files = [(source / name, name) for name in TOKENIZER_FILES] if source.is_dir() else [(source, "tokenizer.json")]
        for path, name in files:
            if path.is_file() and path.resolve() != (folder / name).resolve():
                with atomic_file(folder / name) as f, open(path, "rb") as src:
                    shutil.copyfileobj(src, f)
    return folder


def is_hf_folder(path: str | os.PathLike) -> bool:
    """A folder with a config.json whose model_type one of the HF families reads."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, Mapping) and "model_type" in raw
