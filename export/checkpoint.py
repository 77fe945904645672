"""Load a trained model for export: a Lightning checkpoint of ``snlp fit`` or a nanochat checkpoint.

    model, tokenizer_path = load_model("runs/quickstart/checkpoints/last.ckpt")
"""

from __future__ import annotations

from pathlib import Path

import torch

from snlp_lightning.checkpoint_io import AtomicCheckpointIO
from snlp_lightning.config import ModelConfig
from snlp_lightning.models.gpt import GPT
from snlp_lightning.models.nanochat_io import CheckpointError, load_nanochat

MODEL_PREFIX = "model."


def load_model(path: str | Path) -> tuple[GPT, Path | None]:
    """(the model in eval mode on the CPU, the tokenizer.json of its training data if it can be found).

    ``path``: a ``.ckpt`` written by ``snlp fit``, or a nanochat ``model_*.pt`` / checkpoint folder.
    """
    path = Path(path)
    if path.suffix != ".ckpt":
        return load_nanochat(path).eval(), _tokenizer_near(path)
    checkpoint = AtomicCheckpointIO().load_checkpoint(path, map_location="cpu", weights_only=False)
    fields = checkpoint.get("hyper_parameters", {}).get("config")
    if not isinstance(fields, dict):
        raise CheckpointError(f"checkpoint {path} has no model config in its hyper_parameters (was it written by snlp fit?)")
    model = GPT(ModelConfig(**fields))
    state = {k[len(MODEL_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit its config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    data_dir = checkpoint.get("datamodule_hyper_parameters", {}).get("data_dir")
    tokenizer = Path(data_dir) / "tokenizer.json" if data_dir else None
    return model.eval(), tokenizer if tokenizer is not None and tokenizer.is_file() else None


def _tokenizer_near(path: Path) -> Path | None:
    for folder in (path if path.is_dir() else path.parent, path.parent.parent):
        candidate = folder / "tokenizer.json"
        if candidate.is_file():
            return candidate
    return None


def parse_dtype(name: str) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' | 'float64' (or their short names) -> torch dtype."""
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}
    if name not in names:
        raise ValueError(f"dtype {name!r} is not allowed: one of {', '.join(names)}")
    return names[name]
