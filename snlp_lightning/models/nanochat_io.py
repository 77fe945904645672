"""Import and export of nanochat / nanochat-SNLP checkpoints.

A nanochat checkpoint is a state dict (``model_000100.pt``, keys such as ``transformer.h.0.attn.c_q.weight``,
maybe prefixed ``_orig_mod.`` by torch.compile) plus a config (``meta_000100.json`` -> "model_config").
Our module names equal nanochat's, so the mapping is: strip prefixes, pad the vocabulary rows to a
multiple of 64 if needed, check every key and shape, load. Multi-token prediction heads
(``mtp_projs.*``, config ``num_mtp_steps``) come in and go out with the rest. Config fields we add (smear, backout, mhc_variant, short_window, ...) may be present.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..config import ModelConfig, nanochat_files, nanochat_meta_config
from ..errors import CheckpointError, atomic_file, atomic_write_text, first_line, non_finite_entries
from . import build
from .nanochat import GPT

VOCAB_ROW_KEYS = ("transformer.wte.weight", "lm_head.weight")


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _read_checkpoint(path: Path) -> tuple[dict, ModelConfig]:
    """A model_*.pt file (meta_*.json beside it) or a folder holding one -> (state dict, config)."""
    path, meta = nanochat_files(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file: {type(err).__name__}: {first_line(err)}") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return dict(state), nanochat_meta_config(meta)


def load_nanochat(source: Mapping | str | os.PathLike, config: Mapping | ModelConfig | None = None) -> GPT:
    """Build our model from a nanochat state dict + config, or from a checkpoint path.

    The result gives the same logits as the original (vocab padded to a multiple of 64, logits
    cropped to ``vocab_size``). Raises CheckpointError listing unknown / missing keys or bad shapes.
    """
    where = ""
    if isinstance(source, (str, os.PathLike)):
        state, file_config = _read_checkpoint(Path(source))
        config = config if config is not None else file_config
        where = f"checkpoint {source} "
    elif isinstance(source, Mapping):
        state = dict(source)
        if config is None:
            raise CheckpointError("a state dict needs its model config (nanochat's GPTConfig fields)")
    else:
        raise CheckpointError(f"load_nanochat takes a checkpoint path or a state dict, got {type(source).__name__}")
    if not isinstance(config, (ModelConfig, Mapping)):
        raise CheckpointError(f"config must be a ModelConfig or a mapping of GPTConfig fields, got {type(config).__name__}")
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_nanochat(config)
    bad = non_finite_entries(state)
    if bad:
        raise CheckpointError(f"{where or 'the state dict '}holds NaN/inf weights ({', '.join(bad)}): it cannot be used")
    model = build(cfg)
    expected = model.state_dict()

    cleaned: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key.replace("_orig_mod.", "")
        if not isinstance(value, Tensor):
            raise CheckpointError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        cleaned[name] = value
    missing = sorted(set(expected) - set(cleaned))
    unknown = sorted(set(cleaned) - set(expected))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unknown:
            parts.append(f"unknown keys: {_listing(unknown)}")
        raise CheckpointError(f"{where or 'the state dict '}does not match its {cfg.n_layer}-layer config ({'; '.join(parts)})")

    for name, value in cleaned.items():
        want = expected[name].shape
        if value.shape != want and _is_vocab_table(name) and value.dim() == 2 and value.size(0) == cfg.vocab_size:
            value = torch.cat([value, value.new_zeros(want[0] - value.size(0), value.size(1))])
        if value.shape != want:
            raise CheckpointError(f"checkpoint tensor {name!r} has shape {tuple(value.shape)}, the config needs {tuple(want)}")
        cleaned[name] = value.to(expected[name].dtype)
    model.load_state_dict(cleaned, strict=True)
    return model


def _is_vocab_table(name: str) -> bool:
    return name in VOCAB_ROW_KEYS or (name.startswith("value_embeds.") and name.endswith(".weight"))


def export_nanochat(model: GPT) -> tuple[dict[str, Tensor], dict]:
    """(state dict in nanochat's layout, nanochat-style config dict incl. our extension fields)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, dataclasses.asdict(model.config)


def save_nanochat(model: GPT, folder: str | os.PathLike, step: int = 0) -> Path:
    """Write model_{step:06d}.pt and meta_{step:06d}.json, each atomically (errors.atomic_file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, config = export_nanochat(model)
    target = folder / f"model_{step:06d}.pt"
    # meta first: a model file is only ever read next to its config.
    atomic_write_text(folder / f"meta_{step:06d}.json", json.dumps({"step": step, "model_config": config}, indent=2))
    with atomic_file(target) as f:
        torch.save(state, f)
    return target
