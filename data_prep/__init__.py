"""Data preparation for snlp-lightning: corpus readers, the BPE tokenizer and litdata token chunks.

    snlp-prepare --bundled --out data/bundled          # the CLI (data_prep.prepare:main)

    from data_prep import PrepareOptions, prepare, load_tokenizer
    manifest = prepare(PrepareOptions(out="data/mine", inputs=["corpus/"], vocab_size=32768))
    tok, bos_id = load_tokenizer("data/mine/tokenizer.json")
"""

from __future__ import annotations

import os

# Older litdata releases ask PyPI for a newer version on every optimize / StreamingDataset; this
# project runs offline. Must be set before litdata is imported.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

from .errors import PrepareError  # noqa: E402
from .prepare import PrepareOptions, main, prepare  # noqa: E402
from .tokenizer import BOS_TOKEN, MIN_VOCAB_SIZE, SPECIAL_TOKENS, load_tokenizer, train_tokenizer  # noqa: E402

__all__ = [
    "BOS_TOKEN", "MIN_VOCAB_SIZE", "SPECIAL_TOKENS", "PrepareError", "PrepareOptions", "load_tokenizer", "main",
    "prepare", "train_tokenizer",
]
