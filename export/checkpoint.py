"""Load a trained model for export: a Lightning checkpoint of ``snlp fit``, a nanochat checkpoint or
a Hugging Face folder (Llama, Qwen2, Gemma 3), and the settings every export command parses the same way (dtype, device).

    model, tokenizer_path = load_model("runs/quickstart/checkpoints/last.ckpt")
"""

from __future__ import annotations

from pathlib import Path

import torch

from snlp_lightning.checkpoint_io import AtomicCheckpointIO
from snlp_lightning.config import ModelConfig
from snlp_lightning.errors import UserError, path_kind
from snlp_lightning.models import GPT, build
from snlp_lightning.models.nanochat_io import CheckpointError
from snlp_lightning.models.pretrained import hf_source, load_pretrained
from snlp_lightning.regularizer import fold_spectral_norm
from snlp_lightning.text import tokenizer_file_near

MODEL_PREFIX = "model."
NANOCHAT_HINT = ("a .ckpt written by snlp fit, a nanochat model_*.pt (meta_*.json beside it) or a folder holding one, "
                 "or a Hugging Face model folder (config.json)")


def check_checkpoint_path(path: str | Path) -> Path:
    """``path`` must be a .ckpt file, a nanochat ``model_*.pt`` file, or a folder holding one; else a
    CheckpointError saying what it is instead."""
    folder = hf_source(path)
    if folder is not None:
        if not folder.is_dir():
            raise CheckpointError(f"Hugging Face model folder {folder} is {path_kind(folder)}: give a folder holding config.json")
        return folder
    path = Path(path).expanduser()
    kind = path_kind(path)
    if kind == "missing":
        raise CheckpointError(f"checkpoint {path} does not exist")
    if kind == "something else":
        raise CheckpointError(f"checkpoint {path} is not a regular file or folder: give {NANOCHAT_HINT}")
    if kind == "a folder":
        if path.suffix == ".ckpt" or not any(path.glob("model_*.pt")):
            raise CheckpointError(f"checkpoint {path} is a folder, not a file (and holds no nanochat model_*.pt): give {NANOCHAT_HINT}")
        return path
    if path.suffix != ".ckpt" and not (path.name.startswith("model_") and path.suffix == ".pt"):
        raise CheckpointError(f"checkpoint {path} is neither a .ckpt nor a nanochat model_*.pt file: give {NANOCHAT_HINT}")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise CheckpointError(f"checkpoint {path} is not readable (permission denied)") from None
    return path


def load_model(path: str | Path) -> tuple[GPT, Path | None]:
    """(the model in eval mode on the CPU, the tokenizer.json of its training data if it can be found).

    ``path``: a ``.ckpt`` written by ``snlp fit``, or a nanochat ``model_*.pt`` / checkpoint folder.
    Only tensors and plain containers are unpickled (``weights_only=True``).
    """
    path = check_checkpoint_path(path)
    if hf_source(path) is not None:  # its own tokenizer.json, when it has one
        found = path / "tokenizer.json"
        return load_pretrained(path).eval(), found if found.is_file() else None
    if path.suffix != ".ckpt" or path.is_dir():
        found = tokenizer_file_near(path)  # generation reads tokenizer.json; snlp eval also nanochat's tokenizer.pkl
        return load_pretrained(path).eval(), found if found is not None and found.suffix == ".json" else None
    checkpoint = AtomicCheckpointIO().load_checkpoint(path, map_location="cpu", weights_only=True)
    model = build(ModelConfig.from_checkpoint(path, checkpoint))
    state = {k[len(MODEL_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    state = fold_spectral_norm(state)  # a run trained with spectral_norm: its normalised weights, as plain ones
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensor shapes that do not fit the config
        raise CheckpointError(f"checkpoint {path} does not fit its config: {str(err).strip().splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit its config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    data = checkpoint.get("datamodule_hyper_parameters")
    data_dir = data.get("data_dir") if isinstance(data, dict) else None
    tokenizer = Path(data_dir) / "tokenizer.json" if isinstance(data_dir, str) and data_dir else None
    return model.eval(), tokenizer if tokenizer is not None and tokenizer.is_file() else None


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def parse_dtype(name: str) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' | 'float64' (or their short names) -> torch dtype."""
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not allowed: one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    """A device this torch and machine can run on ('cpu', 'cuda', 'cuda:1', 'mps', ...); else a UserError."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {name!r} is not a device: one of {', '.join(DEVICE_TYPES)} (e.g. cuda:0)") from None
    if device.type not in DEVICE_TYPES:
        raise UserError(f"--device {name!r} is not supported: one of {', '.join(DEVICE_TYPES)}")
    if device.type == "cpu":
        return device
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        build = "a CPU-only build" if device.type == "cuda" and torch.version.cuda is None else "a build without it or no such device"
        raise UserError(f"--device {name!r} is not available: torch {torch.__version__} is {build} here (use --device cpu)")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise UserError(f"--device {name!r} is not available: this machine has {count} {device.type} device(s), 0..{count - 1}")
    return device
