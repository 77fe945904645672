"""TokenDataModule: (inputs, targets) windows from a folder written by ``snlp-prepare``.

    dm = TokenDataModule("data/bundled", seq_len=128, batch_size=16)
    dm.setup("fit")
    inputs, targets = next(iter(dm.train_dataloader()))   # (16, 128) int64 each, targets = inputs shifted by 1
    dm.vocab_size, dm.bos_id                             # from data/bundled/manifest.json

A batch is B windows of seq_len + 1 consecutive tokens of the packed stream ``BOS doc BOS doc ...``
(litdata ``TokensLoader(block_size=seq_len + 1)``; windows do not overlap and may span documents;
the last partial window of each chunk is never read). Train windows are shuffled with ``seed``,
val windows come in storage order; both drop the last incomplete batch, so every DDP rank sees
the same number of batches (uneven counts have hung litdata's loaders).

Exact mid-epoch resume: Lightning stores ``state_dict()`` of a DataModule in checkpoints; ours holds
the train StreamingDataLoader's state and ``load_state_dict()`` gives it back to the next train
loader before its first batch. We do this ourselves because Lightning's own restore of stateful
loaders is skipped when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``
(which builds the train loader before the checkpoint's loop state is loaded; Lightning issue
#20550, litdata issue #775).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

# Older litdata releases ask PyPI for a newer version whenever a dataset is built; we run offline.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import lightning as L  # noqa: E402
from lightning.pytorch.utilities import rank_zero_warn  # noqa: E402
from litdata import StreamingDataLoader, StreamingDataset, TokensLoader  # noqa: E402

from .config import ConfigError  # noqa: E402
from .prepared import SPLITS, DataError, _is_remote, data_uri, read_manifest, read_split_index  # noqa: E402, F401 (DataError: re-exported)

STATE_FORMAT = 1

def collate_windows(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """B windows of T + 1 tokens (stored as uint16 / int32) -> (inputs, targets), each (B, T) int64."""
    windows = torch.stack([torch.as_tensor(w) for w in items]).to(torch.int64)  # (B, T + 1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class _TrainLoader(StreamingDataLoader):
    """The train StreamingDataLoader, restored by TokenDataModule only.

    Once the DataModule has restored this loader (or decided not to, because the data changed),
    later ``load_state_dict`` calls are ignored: Lightning may hand the same checkpoint state in
    again, and litdata's load is not idempotent (each call advances the worker round-robin, which
    would skew which worker serves the next batch and every later checkpoint).
    """

    owner_decided: bool = False

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        if not self.owner_decided:
            super().load_state_dict(obj)

    def apply_checkpoint_state(self, obj: dict[str, Any] | None) -> None:
        if obj is not None:
            super().load_state_dict(obj)
        self.owner_decided = True


class TokenDataModule(L.LightningDataModule):
    """Token windows for training and validation, from an ``snlp-prepare`` output folder.

    Args:
        data_dir: folder (or remote URI litdata reads, e.g. ``s3://bucket/path``) holding
            manifest.json, train/ and val/ as written by ``snlp-prepare``. Local folders are read
            in place; remote ones are cached under ``cache_dir``.
        seq_len: T, tokens per training sequence; each window holds T + 1 tokens.
        batch_size: B, windows per train batch (per device).
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: shuffle seed for the train windows (same seed, same data -> same batches).
        shuffle: shuffle the train windows (val is never shuffled).
        val_batch_size: windows per val batch; None = batch_size. The number of val batches is
            capped by the Trainer's ``limit_val_batches``.
        cache_dir: where litdata caches chunks of a remote data_dir; None = litdata's default.
    """

    def __init__(
        self,
        data_dir: str,
        seq_len: int,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 42,
        shuffle: bool = True,
        val_batch_size: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"data.{name}={value!r} must be an integer >= {low}")
        if val_batch_size is not None and (not isinstance(val_batch_size, int) or val_batch_size < 1):
            raise ConfigError(f"data.val_batch_size={val_batch_size!r} must be an integer >= 1 or null")
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.val_batch_size = val_batch_size or batch_size
        self.cache_dir = cache_dir
        self._manifest: dict[str, Any] | None = None
        self._train_loader: _TrainLoader | None = None
        self._pending_state: dict[str, Any] | None = None
        self._indexes: dict[str, dict[str, Any] | None] = {}
        if not _is_remote(self.data_dir):
            # A local folder is checked now, so a wrong path fails before the Trainer starts (and
            # before it prints its banner); a remote one is read in setup().
            self._manifest = read_manifest(self.data_dir)

    # -- the manifest ---------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        """manifest.json of data_dir (read once; raises DataError when missing or malformed)."""
        if self._manifest is None:
            self._manifest = self._read_manifest()
        return self._manifest

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer vocabulary the data was written with (every id is below it)."""
        return int(self.manifest["vocab_size"])

    @property
    def bos_id(self) -> int:
        """Id of the BOS token that starts every document in the stream."""
        return int(self.manifest["bos_id"])

    def _uri(self, *parts: str) -> str:
        return data_uri(self.data_dir, *parts)

    def _read_manifest(self) -> dict[str, Any]:
        return read_manifest(self.data_dir)

    def _check_split(self, split: str) -> dict[str, Any] | None:
        """index.json and chunk files of ``split`` (checked once per DataModule); None for remote data."""
        if split not in self._indexes:
            self._indexes[split] = read_split_index(self.data_dir, split)
        return self._indexes[split]

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.manifest  # noqa: B018  (reads and checks manifest.json)
        needed = {"validate": ("val",), "test": (), "predict": ()}.get(stage or "fit", SPLITS)
        for split in needed:
            self._check_split(split)

    def _dataset(self, split: str, shuffle: bool) -> StreamingDataset:
        self._check_split(split)
        return StreamingDataset(
            input_dir=self._uri(split),
            cache_dir=self.cache_dir,
            item_loader=TokensLoader(block_size=self.seq_len + 1),
            shuffle=shuffle,
            seed=self.seed,
            drop_last=True,
        )

    def _require_batches(self, loader: StreamingDataLoader, split: str, batch_size: int) -> None:
        if len(loader) == 0:
            tokens = self.manifest["splits"].get(split, {}).get("tokens", "?")
            raise DataError(
                f"the {split} split of {self.data_dir} ({tokens} tokens) holds fewer windows of seq_len + 1 = "
                f"{self.seq_len + 1} tokens than one batch ({batch_size}); use a smaller seq_len / batch size or more data"
            )

    def train_dataloader(self) -> StreamingDataLoader:
        loader = _TrainLoader(
            self._dataset("train", shuffle=self.shuffle),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            drop_last=True,
            collate_fn=collate_windows,
            pin_memory=torch.cuda.is_available(),
        )
        self._require_batches(loader, "train", self.batch_size)
        self._train_loader = loader
        if self._pending_state is not None:
            self._restore(loader)
        return loader

    def val_dataloader(self) -> StreamingDataLoader:
        loader = StreamingDataLoader(
            self._dataset("val", shuffle=False),
            batch_size=self.val_batch_size,
            num_workers=self.num_workers,
            drop_last=True,
            collate_fn=collate_windows,
            pin_memory=torch.cuda.is_available(),
        )
        self._require_batches(loader, "val", self.val_batch_size)
        return loader

    # -- exact resume ---------------------------------------------------------------------------
    def _fingerprint(self) -> str | None:
        return self.manifest["splits"].get("train", {}).get("fingerprint")

    def state_dict(self) -> dict[str, Any]:
        """The train loader's position (litdata state) plus the data it refers to; {} before the loader exists."""
        if self._train_loader is None:
            return copy.deepcopy(self._pending_state) if self._pending_state else {}
        return {
            "format": STATE_FORMAT,
            "data_fingerprint": self._fingerprint(),
            "train_loader": self._train_loader.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the state for the next train loader (or apply it now if one exists and has not started)."""
        if not state_dict:
            return
        self._pending_state = copy.deepcopy(state_dict)  # litdata mutates the dict it is given
        if self._train_loader is not None:
            self._restore(self._train_loader)

    def _restore(self, loader: _TrainLoader) -> None:
        state, self._pending_state = self._pending_state, None
        assert state is not None
        if state.get("format") != STATE_FORMAT or "train_loader" not in state:
            rank_zero_warn(
                f"ignoring an unknown data state in the checkpoint (format {state.get('format')!r}); "
                "the train stream starts over"
            )
            return loader.apply_checkpoint_state(None)
        if state.get("data_fingerprint") != self._fingerprint():
            rank_zero_warn(
                f"the checkpoint's train stream was over different data than {self.data_dir} now holds; "
                "the train stream starts from the beginning of an epoch"
            )
            return loader.apply_checkpoint_state(None)
        loader_state = state["train_loader"]
        saved = loader_state["dataset"]
        changed = [
            f"{name} {saved.get(key)!r} -> {now!r}"
            for name, key, now in (
                ("seed", "seed", self.seed),
                ("shuffle", "shuffle", self.shuffle),
                ("window", "item_loader", {"block_size": self.seq_len + 1}),
            )
            if saved.get(key) != now
        ]
        if changed:
            rank_zero_warn(
                f"data settings changed since the checkpoint ({'; '.join(changed)}); the train stream starts over"
            )
            return loader.apply_checkpoint_state(None)
        dataset = loader.dataset
        if dataset.input_dir.url is None:
            # Same data (fingerprint) in another place (moved folder, other working directory):
            # litdata compares absolute paths, so point the state at where the data is now.
            saved["input_dir_path"] = dataset.input_dir.path
        loader.apply_checkpoint_state(loader_state)
