"""Where a pretrained model comes from: a nanochat checkpoint or a Hugging Face folder.

    model = load_pretrained("hf:models/TinyLlama")          # or any folder with config.json
    model = load_pretrained("nanochat/base_checkpoints/d20") # model_*.pt with meta_*.json

``--model.init_from`` of ``snlp fit`` and every export command's ``--checkpoint`` read it here.
"""

from __future__ import annotations

import os
from pathlib import Path

from .family import FamilyModel
from .hf_io import is_hf_folder, load_hf
from .nanochat_io import load_nanochat

HF_SCHEME = "hf:"


def hf_source(source: str | os.PathLike) -> Path | None:
    """The folder of a Hugging Face source ("hf:PATH", or a folder holding a config.json), else None."""
    text = os.fspath(source)
    if text.startswith(HF_SCHEME):
        return Path(text[len(HF_SCHEME):]).expanduser()
    return Path(text).expanduser() if is_hf_folder(text) else None


def load_pretrained(source: str | os.PathLike) -> FamilyModel:
    """Our model of ``source`` (float32, CPU): a Hugging Face folder (``hf_source``) or a nanochat checkpoint."""
    folder = hf_source(source)
    return load_hf(folder) if folder is not None else load_nanochat(source)
