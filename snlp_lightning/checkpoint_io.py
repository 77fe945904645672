"""Checkpoints that never lose work: temp file + fsync + rename, and clear errors on bad files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .models.nanochat_io import CheckpointError


def _is_local(path) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but a local checkpoint is written to a temp file in the same
    folder, flushed to disk and renamed over the target, so a crash mid-write leaves the previous
    file intact. Loading a truncated or foreign file raises CheckpointError naming the file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None) -> dict[str, Any]:
        if _is_local(path) and not Path(str(path).removeprefix("file://")).is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except CheckpointError:
            raise
        except Exception as err:  # torch raises several types for truncated / foreign files
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated: torch.load failed with {type(err).__name__}") from None
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no 'state_dict' entry)")
        return checkpoint
