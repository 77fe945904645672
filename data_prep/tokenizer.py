"""Byte-level BPE tokenizer (HF ``tokenizers``): training, loading and the special tokens.

Layout of a trained vocabulary: the special tokens first (``<|bos|>`` = id 0, then the chat tokens
in SPECIAL_TOKENS order), then the 256 byte symbols, then the learned merges. Every string
round-trips: ``decode(encode(s)) == s`` (no normalizer, byte-level pre-tokenizer and decoder).

Text is split with a GPT-4-style pattern (numbers in groups of at most two digits, as nanochat
does) before the byte-level mapping, so merges never cross word / number / punctuation borders.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from snlp_lightning.errors import UserError, first_line, require_file

from .errors import PrepareError

BOS_TOKEN = "<|bos|>"
# nanochat's special tokens, in its order: a tokenizer trained here can later format chats.
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN,
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
)
BYTE_ALPHABET = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET + len(SPECIAL_TOKENS)

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise PrepareError(
            f"--vocab-size {vocab_size} is below the byte alphabet: it must be at least {MIN_VOCAB_SIZE} "
            f"({BYTE_ALPHABET} byte symbols + {len(SPECIAL_TOKENS)} special tokens)"
        )


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with this project's pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """Train on ``texts`` (an iterable of documents). Deterministic for the same texts in the same order.

    The result can have fewer than ``vocab_size`` entries when the corpus runs out of pairs seen
    at least twice (small corpora); read the real size with ``get_vocab_size()``.
    """
    check_vocab_size(vocab_size)
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,  # a pair seen once is noise, not a token
        show_progress=show_progress,
    )
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    if tok.token_to_id(BOS_TOKEN) != 0:  # the trainer puts special tokens first; keep that promise checked
        raise RuntimeError(f"tokenizer training put {BOS_TOKEN} at id {tok.token_to_id(BOS_TOKEN)}, expected 0")
    return tok


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    return (t for t in texts if t)


def load_tokenizer(
    path: str | Path, bos_token: str = BOS_TOKEN, split_special: bool = True, what: str = "--tokenizer"
) -> tuple[Tokenizer, int]:
    """Load ``tokenizer.json``; returns (tokenizer, bos id). A missing, corrupt or unsuitable file is a
    PrepareError naming it (``what`` says where the path came from, for the message).

    split_special=True makes special-token strings that occur in the text ("<|bos|>" in a
    document about tokenizers) encode as ordinary text, so BOS ids only ever come from us. The flag
    is not stored in tokenizer.json, so it is set here on every load.
    """
    path = Path(path).expanduser()
    hint = "give the tokenizer.json that snlp-prepare wrote into its --out folder"
    try:
        require_file(path, what, hint)
    except UserError as err:
        raise PrepareError(str(err)) from None
    try:
        tok = Tokenizer.from_file(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001  (a bare Exception on malformed JSON; a pyo3 PanicException is a BaseException)
        reason = "it is empty" if path.stat().st_size == 0 else first_line(err)
        raise PrepareError(f"{what} {path} is not a valid tokenizer.json (corrupt or truncated: {reason}); {hint}") from None
    bos_id = tok.token_to_id(bos_token)
    if bos_id is None:
        raise PrepareError(f"{what} {path} has no {bos_token!r} token; pass --bos-token with one it has")
    tok.encode_special_tokens = split_special
    return tok, bos_id


def special_tokens_of(tok: Tokenizer) -> dict[str, int]:
    """Special tokens of a tokenizer: {token: id}, sorted by id."""
    found = {added.content: i for i, added in tok.get_added_tokens_decoder().items() if added.special}
    return dict(sorted(found.items(), key=lambda kv: kv[1]))
