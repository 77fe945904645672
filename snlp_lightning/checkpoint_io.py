"""Checkpoints that never lose work: atomic writes, never a NaN weight, clear errors on bad files.

- A local checkpoint is written to a temporary beside the target (``errors.atomic_file``: host and
  pid in its name), flushed, fsynced and renamed over the target: a kill or a full disk mid-write
  leaves the previous checkpoint intact. The first save of a run removes temporaries that a killed
  earlier run left in that folder (never a live writer's).
- A checkpoint whose weights hold NaN / inf is refused before anything is written (TrainingDiverged
  names the step), so every saved checkpoint can be resumed.
- A write that fails (full disk, permissions) is a Fault naming the file and saying the previous
  checkpoints are kept; loading a missing, truncated or foreign file is a CheckpointError naming it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .errors import CheckpointError, Fault, atomic_file, clean_stale_temps, non_finite_entries, os_error_line, path_kind


class NonFiniteWeights(Fault, FloatingPointError):
    """Weights about to be saved hold NaN or inf."""


def _is_local(path) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class _Recording:
    """A binary file that remembers the OSError of a failed write (torch.save hides it)."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self._f.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with atomic local writes, a finiteness check on the weights
    and one-line errors (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        bad = non_finite_entries(checkpoint.get("state_dict", {}))
        if bad:
            step = checkpoint.get("global_step", "?")
            raise NonFiniteWeights(
                f"not saving {path}: the weights hold NaN/inf at step {step} ({', '.join(bad)}); "
                "training diverged, the last saved checkpoint is kept"
            )
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(str(path).removeprefix("file://"))
        if target.parent not in self._cleaned:
            clean_stale_temps(target.parent)  # leftovers of a run killed mid-write
            self._cleaned.add(target.parent)
        writer = None
        try:
            with atomic_file(target) as f:
                writer = _Recording(f)
                torch.save(checkpoint, writer)
        except (OSError, RuntimeError) as err:
            # torch's zip writer turns a failed write (full disk) into a RuntimeError ("unexpected
            # pos"); the file wrapper kept the OSError that caused it.
            cause = writer.error if writer is not None and writer.error is not None else err
            if not isinstance(cause, OSError):
                raise
            cause.filename = cause.filename or str(target)
            raise Fault(f"{os_error_line(cause, 'cannot write checkpoint')}; earlier checkpoints are kept as they were") from err

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None) -> dict[str, Any]:
        if _is_local(path):
            local = Path(str(path).removeprefix("file://"))
            kind = path_kind(local)
            if kind == "missing":
                raise CheckpointError(f"checkpoint {path} does not exist")
            if kind != "a file":
                raise CheckpointError(f"checkpoint {path} is {kind}, not a .ckpt file")
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except CheckpointError:
            raise
        except pickle.UnpicklingError as err:
            # an intact (zip) file holding other objects; a damaged file also fails the weights-only unpickler
            intact = _is_local(path) and zipfile.is_zipfile(str(path).removeprefix("file://"))
            if weights_only and intact and "weights only" in str(err).lower():
                raise CheckpointError(
                    f"checkpoint {path} holds Python objects other than tensors, numbers, strings, lists and dicts, "
                    "which are not loaded (weights_only): was it written by snlp fit?"
                ) from None
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated: torch.load failed with {type(err).__name__}") from None
        except Exception as err:  # torch raises several types for truncated / foreign files
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated: torch.load failed with {type(err).__name__}") from None
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no 'state_dict' entry)")
        bad = non_finite_entries(checkpoint["state_dict"])
        if bad:  # never written by this project; resuming or scoring it would fail later, less clearly
            raise CheckpointError(f"checkpoint {path} holds NaN/inf weights ({', '.join(bad)}): use an earlier checkpoint")
        return checkpoint
