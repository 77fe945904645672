"""Tokenize shards in worker processes and write litdata token chunks (``litdata.optimize``).

Each split is one ``optimize`` call over the same shard list; a worker keeps the documents of its
split (by doc_hash, see corpus.py), encodes them in batches, prepends BOS and yields one 1-D tensor
per document. With ``TokensLoader`` the documents of a chunk are stored back to back, so the chunk
is the token stream ``BOS doc BOS doc ...`` and ``TokensLoader(block_size=T + 1)`` reads windows of it.

Token ids are stored as uint16 when the vocabulary fits (ids < 65536; litdata maps torch.uint16 to
its own dtype code and reads it back as uint16), else int32.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .corpus import Shard, Source, doc_hash, iter_documents
from .tokenizer import load_tokenizer

ENCODE_BATCH = 256  # documents per encode_batch call


def token_dtype(vocab_size: int) -> tuple[torch.dtype, np.dtype]:
    return (torch.uint16, np.dtype(np.uint16)) if vocab_size <= 1 << 16 else (torch.int32, np.dtype(np.int32))


@dataclass
class TokenizeShards:
    """The ``fn`` of ``litdata.optimize``: shard index -> token tensors of one split's documents.

    Picklable (plain fields), so litdata can send it to spawned workers; the tokenizer is loaded
    lazily once per worker.
    """

    sources: Sequence[Source]
    shards: Sequence[Shard]
    tokenizer_path: str
    bos_token: str
    vocab_size: int
    split: str  # "train" | "val"
    threshold: int  # doc_hash < threshold -> val
    text_field: str
    txt_split: str

    def __post_init__(self) -> None:
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_tokenizer"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tokenizer = None

    def __call__(self, index: int) -> Iterator[torch.Tensor]:
        if self._tokenizer is None:
            # One process per worker already; rayon threads on top would oversubscribe the cores.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            self._tokenizer, self._bos_id = load_tokenizer(self.tokenizer_path, self.bos_token)
        shard = self.shards[index]
        want_val = self.split == "val"
        batch: list[str] = []
        source = self.sources[shard.source]
        for text in iter_documents(source, self.text_field, self.txt_split, shard.start, shard.stop):
            if (doc_hash(text) < self.threshold) == want_val:
                batch.append(text)
                if len(batch) == ENCODE_BATCH:
                    yield from self._encode(batch)
                    batch = []
        if batch:
            yield from self._encode(batch)

    def _encode(self, texts: list[str]) -> Iterator[torch.Tensor]:
        _, np_dtype = token_dtype(self.vocab_size)
        for enc in self._tokenizer.encode_batch(texts, add_special_tokens=False):
            ids = np.empty(len(enc.ids) + 1, dtype=np_dtype)
            ids[0] = self._bos_id
            ids[1:] = enc.ids
            yield torch.from_numpy(ids)


@dataclass(frozen=True)
class SplitStats:
    documents: int
    tokens: int
    chunks: int
    fingerprint: str  # sha256 of the chunk layout (index.json without its timestamp)


def write_split(
    fn: TokenizeShards, output_dir: Path, workers: int, chunk_bytes: int, progress: bool, start_method: str = "spawn"
) -> SplitStats:
    """Run ``litdata.optimize`` for one split into ``output_dir`` (must not exist yet)."""
    from litdata import TokensLoader, optimize

    # optimize() calls multiprocessing.set_start_method(start_method, force=True) for the whole process;
    # put back what the caller had so later DataLoader workers keep their usual start method.
    previous = multiprocessing.get_start_method(allow_none=True)
    chatter = io.StringIO()  # litdata prints setup / worker lines to stdout; its progress bar is on stderr
    try:
        with contextlib.redirect_stdout(chatter):
            optimize(
                fn=fn,
                inputs=list(range(len(fn.shards))),  # plain ints: litdata must not treat anything as a file path
                output_dir=str(output_dir),
                chunk_bytes=chunk_bytes,
                item_loader=TokensLoader(),
                num_workers=max(1, min(workers, len(fn.shards))),
                keep_data_ordered=True,  # worker k gets the k-th contiguous slice: the same chunks every run
                reorder_files=False,
                start_method=start_method,
                verbose=progress,
            )
    finally:
        multiprocessing.set_start_method(previous, force=True)
    return read_split_stats(output_dir)


def read_split_stats(split_dir: Path) -> SplitStats:
    index = json.loads((Path(split_dir) / "index.json").read_text())
    chunks = index["chunks"]
    layout = json.dumps({"chunks": chunks, "config": index["config"]}, sort_keys=True)
    return SplitStats(
        documents=sum(c["chunk_size"] for c in chunks),
        tokens=sum(c["dim"] for c in chunks),
        chunks=len(chunks),
        fingerprint=hashlib.sha256(layout.encode()).hexdigest(),
    )
