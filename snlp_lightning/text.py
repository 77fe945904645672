"""Text in, tokens out, for evaluation: tokenizers, evaluation token streams and bits per byte.

    tok = load_tokenizer("data/fwe")                      # tokenizer.json (HF) or nanochat's tokenizer.pkl
    tok = tokenizer_near("runs/x/checkpoints/last.ckpt")  # or None when none can be found
    stream = token_stream("val.parquet", tok, max_tokens=1_000_000, seq_len=2048)
    windows = fixed_contexts(stream, 2048, 1_000_000)     # (N, 2049): inputs [:, :-1], targets [:, 1:]
    bpb, nbytes = bits_per_byte(nll, windows[:, 1:], tok.token_bytes)

Two tokenizer files are read:

    tokenizer.json   a HF ``tokenizers`` file (what ``snlp prepare`` writes beside its data)
    tokenizer.pkl    nanochat's pickled ``tiktoken.Encoding`` (trained with rustbpe), with its
                     ``token_bytes.pt`` beside it when present. UNPICKLING RUNS CODE: load only
                     pickles you trust (nanochat itself loads the file the same way).

Special-token strings that occur inside a text ("<|bos|>" in a document about tokenizers) are
encoded as ordinary text by both, so BOS ids only ever come from ``token_stream``.

The module imports only torch and the standard library at import time; ``tokenizers``,
``tiktoken`` and ``pyarrow`` are imported when a file needs them.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .errors import UserError, first_line, path_kind

BOS_TOKENS = ("<|bos|>", "<|endoftext|>")  # nanochat's BOS, then tiktoken's name for the same role
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.pkl")
TOKENIZER_ALLOWED = "a tokenizer.json (HF tokenizers), a nanochat tokenizer.pkl (tiktoken), or a folder holding one"
SOURCE_ALLOWED = (
    "a prepared data folder (manifest.json, val/), a .txt file (documents split on blank lines), "
    "a .jsonl file (a 'text' field per line) or a .parquet file (a 'text' column)"
)
ENCODE_BATCH = 64  # documents per batch encode


class Tokenizer:
    """Text <-> token ids of one tokenizer file.

    ``encode(text)`` gives the ids of the text alone (no BOS); ``decode(ids)`` the text back (special
    tokens written out). ``bos_id`` is the id of ``<|bos|>`` (or ``<|endoftext|>``), None when it
    has neither; ``vocab_size`` is one past the largest id; ``token_bytes`` is a (vocab_size,) int64
    tensor, the UTF-8 byte length of every id's text, 0 for special tokens (and for unused ids).
    """

    path: Path
    bos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @property
    def token_bytes(self) -> Tensor:
        if getattr(self, "_token_bytes", None) is None:
            self._token_bytes = self._compute_token_bytes()
        return self._token_bytes

    def _compute_token_bytes(self) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id})"

    def __str__(self) -> str:
        return f"tokenizer {self.path}"


class HFTokenizer(Tokenizer):
    """A HF ``tokenizers`` tokenizer.json (byte-level BPE as ``snlp prepare`` trains, or any other)."""

    def __init__(self, path: Path, tokenizer) -> None:
        self.path, self.tokenizer = path, tokenizer
        tokenizer.encode_special_tokens = True  # special-token strings in a text are text (not stored in the file)
        self.vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(self.vocab.values(), default=-1) + 1
        self.bos_id = next((self.vocab[t] for t in BOS_TOKENS if t in self.vocab), None)
        self._token_bytes = None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _compute_token_bytes(self) -> Tensor:
        """Byte-level vocabularies map each byte to one symbol (GPT-2's table): a token's bytes are its
        symbols mapped back, exact also for tokens that hold part of a multi-byte character. Other
        vocabularies: the UTF-8 length of the token decoded alone."""
        added = self.tokenizer.get_added_tokens_decoder()
        to_byte = {ch: b for b, ch in _byte_symbols().items()}
        byte_level = self._byte_level
        out = torch.zeros(self.vocab_size, dtype=torch.int64)
        for token, i in self.vocab.items():
            if i in added:  # added tokens are stored as text; special ones count 0
                out[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            elif byte_level and all(ch in to_byte for ch in token):
                out[i] = len(token)
            else:
                out[i] = len(self.tokenizer.decode([i], skip_special_tokens=False).encode("utf-8", "surrogatepass"))
        return out

    @property
    def _byte_level(self) -> bool:
        decoder = self.tokenizer.decoder
        return decoder is not None and "ByteLevel" in repr(decoder)


class TiktokenTokenizer(Tokenizer):
    """nanochat's tokenizer: a ``tiktoken.Encoding`` (ids of the text alone via ``encode_ordinary``)."""

    def __init__(self, path: Path, encoding, token_bytes_path: Path | None = None) -> None:
        self.path, self.encoding, self.token_bytes_path = path, encoding, token_bytes_path
        self.vocab_size = int(encoding.n_vocab)
        specials = encoding.special_tokens_set
        self.special_ids = {encoding.encode_single_token(s) for s in specials}
        self.bos_id = next((encoding.encode_single_token(t) for t in BOS_TOKENS if t in specials), None)
        self._token_bytes = None

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def _compute_token_bytes(self) -> Tensor:
        """token_bytes.pt beside the pickle when there is one (so bits per byte matches nanochat's own
        numbers: nanochat counts a token holding part of a character by its decoded text, U+FFFD = 3
        bytes); else each id's own bytes (``decode_single_token_bytes``), 0 for special tokens."""
        if self.token_bytes_path is not None:
            return _load_token_bytes(self.token_bytes_path, self.vocab_size)
        out = torch.zeros(self.vocab_size, dtype=torch.int64)
        for i in range(self.vocab_size):
            if i in self.special_ids:
                continue
            try:
                out[i] = len(self.encoding.decode_single_token_bytes(i))
            except KeyError:  # an unused id
                pass
        return out


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable symbol table, used by byte-level BPE vocabularies."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in kept}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _load_token_bytes(path: Path, vocab_size: int) -> Tensor:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        raise UserError(f"token bytes {path} cannot be read ({first_line(err)}); delete it to compute them from the tokenizer") from None
    if not isinstance(value, Tensor) or value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
        raise UserError(f"token bytes {path} is not a 1-D integer tensor; delete it to compute them from the tokenizer")
    if value.numel() != vocab_size:
        raise UserError(
            f"token bytes {path} has {value.numel()} entries but its tokenizer {vocab_size} ids; "
            "delete it to compute them from the tokenizer"
        )
    return value.to(torch.int64)


# -- loading ------------------------------------------------------------------------------------------------
def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A ``tokenizer.json``, a nanochat ``tokenizer.pkl``, or a folder holding one of them (tokenizer.json
    first: it needs no unpickling). Anything else is a one-line UserError naming the path.

    A tokenizer.pkl is unpickled, which runs code: load only files you trust.
    """
    p = Path(path).expanduser()
    kind = path_kind(p)
    if kind == "missing":
        raise UserError(f"tokenizer {p} does not exist: give {TOKENIZER_ALLOWED}")
    if kind == "a folder":
        found = [p / name for name in TOKENIZER_FILES if (p / name).is_file()]
        if not found:
            raise UserError(f"tokenizer folder {p} holds no {' or '.join(TOKENIZER_FILES)}: give {TOKENIZER_ALLOWED}")
        p = found[0]
    elif kind != "a file":
        raise UserError(f"tokenizer {p} is {kind}, not a file: give {TOKENIZER_ALLOWED}")
    if not os.access(p, os.R_OK):
        raise UserError(f"tokenizer {p} is not readable (permission denied)")
    if p.suffix == ".json":
        return _load_hf(p)
    if p.suffix == ".pkl":
        return _load_tiktoken(p)
    raise UserError(f"tokenizer {p} is neither a .json nor a .pkl file: give {TOKENIZER_ALLOWED}")


def _load_hf(path: Path) -> HFTokenizer:
    try:
        from tokenizers import Tokenizer as HF
    except ImportError:
        raise UserError(f"reading tokenizer {path} needs the 'tokenizers' package: pip install tokenizers") from None
    try:
        tok = HF.from_file(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001  (malformed JSON: a bare Exception; a pyo3 panic is a BaseException)
        reason = "it is empty" if path.stat().st_size == 0 else first_line(err)
        raise UserError(f"tokenizer {path} is not a valid tokenizers JSON file ({reason}): give {TOKENIZER_ALLOWED}") from None
    return HFTokenizer(path, tok)


def _load_tiktoken(path: Path) -> TiktokenTokenizer:
    try:
        import tiktoken
    except ImportError:
        raise UserError(f"reading tokenizer {path} needs the 'tiktoken' package: pip install tiktoken") from None
    try:
        with open(path, "rb") as f:
            encoding = pickle.load(f)  # runs code from the file: trusted files only (see the module docstring)
    except OSError as err:
        raise UserError(f"tokenizer {path} cannot be read ({err.strerror or first_line(err)})") from None
    except ImportError as err:
        raise UserError(f"tokenizer {path} needs a module that is not installed ({first_line(err)})") from None
    except Exception as err:  # UnpicklingError, EOFError, ValueError, ... for damaged files
        reason = "it is empty" if path.stat().st_size == 0 else f"{type(err).__name__}: {first_line(err)}"
        raise UserError(f"tokenizer {path} is not a readable pickle (corrupt or truncated: {reason})") from None
    if not isinstance(encoding, tiktoken.Encoding):
        raise UserError(
            f"tokenizer {path} holds a pickled {type(encoding).__module__}.{type(encoding).__qualname__}, "
            "not a tiktoken Encoding (nanochat's tokenizer.pkl)"
        )
    beside = path.with_name("token_bytes.pt")
    return TiktokenTokenizer(path, encoding, beside if beside.is_file() else None)


# -- finding the tokenizer of a checkpoint ----------------------------------------------------------------
def tokenizer_file_near(checkpoint_path: str | os.PathLike) -> Path | None:
    """The tokenizer file of a checkpoint, or None. Looked for, in order:

    1. a Lightning ``.ckpt`` of ``snlp fit``: ``tokenizer.json`` in its ``datamodule_hyper_parameters.data_dir``;
    2. beside the checkpoint and in the two folders above (``tokenizer.json`` / ``tokenizer.pkl``, also in
       a ``tokenizer/`` subfolder: nanochat's ``BASE/base_checkpoints/d20/model_*.pt`` finds ``BASE/tokenizer/``);
    3. for a nanochat checkpoint (``model_*.pt`` or a folder of them): ``$NANOCHAT_BASE_DIR/tokenizer/``,
       or ``~/.cache/nanochat/tokenizer/`` when the variable is unset (nanochat's own default).
    """
    path = Path(checkpoint_path).expanduser()
    candidates: list[Path] = []
    nanochat = (path.is_dir() and any(path.glob("model_*.pt"))) or (path.name.startswith("model_") and path.suffix == ".pt")
    if path.suffix == ".ckpt" and path.is_file():
        data_dir = _ckpt_data_dir(path)
        if data_dir:
            candidates.append(Path(data_dir).expanduser() / "tokenizer.json")
    start = path if path.is_dir() else path.parent
    for folder in (start, start.parent, start.parent.parent):
        for sub in (folder, folder / "tokenizer"):
            candidates.extend(sub / name for name in TOKENIZER_FILES)
    if nanochat:
        base = os.environ.get("NANOCHAT_BASE_DIR") or str(Path.home() / ".cache" / "nanochat")
        candidates.extend(Path(base).expanduser() / "tokenizer" / name for name in TOKENIZER_FILES)
    return next((c for c in candidates if c.is_file()), None)


def _ckpt_data_dir(path: Path) -> str | None:
    try:  # tensors are mapped, not read; only plain containers are unpickled
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a damaged or foreign file: the checkpoint loader reports it, not this lookup
        return None
    data = checkpoint.get("datamodule_hyper_parameters") if isinstance(checkpoint, dict) else None
    data_dir = data.get("data_dir") if isinstance(data, dict) else None
    return data_dir if isinstance(data_dir, str) and data_dir and "://" not in data_dir else None


def tokenizer_near(checkpoint_path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer of a checkpoint (see ``tokenizer_file_near`` for where it is looked for), loaded;
    None when none is found. A found file that cannot be loaded is a UserError naming it."""
    found = tokenizer_file_near(checkpoint_path)
    return None if found is None else load_tokenizer(found)


# -- evaluation token streams -----------------------------------------------------------------------------
def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} {value!r} is not allowed: a positive integer")
    return value


def token_stream(source: str | os.PathLike, tokenizer: Tokenizer, max_tokens: int, seq_len: int) -> Tensor:
    """A 1-D int64 token stream for evaluation, long enough for ``fixed_contexts(stream, seq_len, max_tokens)``.

    ``source``:
        a prepared folder   its val split, the tokens as stored (``BOS doc BOS doc ...``); its manifest's
                            vocab_size / bos_id (and its tokenizer.json, for a HF tokenizer) must match ``tokenizer``
        ``.txt``            UTF-8; a document is a run of non-blank lines (as ``snlp prepare`` reads it)
        ``.jsonl``          one JSON object per line with a string ``text`` (blank lines and nulls skipped)
        ``.parquet``        the ``text`` column, rows in order (nanochat's shards; needs pyarrow)
    Text documents are encoded one by one, each with BOS first when the tokenizer has one, and
    concatenated (the layout of nanochat's evaluation); whitespace-only documents of .txt / .jsonl are
    skipped, as ``snlp prepare`` does.

    Reading stops once ``ceil(max_tokens / seq_len) * seq_len + 1`` tokens (>= max_tokens + 1) are there
    and the stream is cut to that length; a shorter source gives all its tokens (fewer than asked for:
    ``fixed_contexts`` then makes fewer windows, and raises when not even one fits). A missing, empty or
    unreadable source is a one-line UserError naming it.
    """
    _positive(max_tokens, "max_tokens")
    _positive(seq_len, "seq_len")
    need = math.ceil(max_tokens / seq_len) * seq_len + 1
    text = str(source)
    if "://" in text and not text.startswith("file://"):
        stream = _prepared_stream(text, tokenizer, need)
    else:
        path = Path(text.removeprefix("file://")).expanduser()
        kind = path_kind(path)
        if kind == "missing":
            raise UserError(f"evaluation data {path} does not exist: give {SOURCE_ALLOWED}")
        if kind == "a folder":
            if not (path / "manifest.json").is_file():
                raise UserError(f"evaluation data {path} is a folder without manifest.json: give {SOURCE_ALLOWED}")
            stream = _prepared_stream(str(path), tokenizer, need)
        elif kind != "a file":
            raise UserError(f"evaluation data {path} is {kind}, not a file or folder: give {SOURCE_ALLOWED}")
        else:
            readers = {".txt": _txt_documents, ".jsonl": _jsonl_documents, ".parquet": _parquet_documents}
            reader = readers.get(path.suffix.lower())
            if reader is None:
                raise UserError(f"evaluation data {path} has suffix {path.suffix or '(none)'!r}: give {SOURCE_ALLOWED}")
            if not os.access(path, os.R_OK):
                raise UserError(f"evaluation data {path} is not readable (permission denied)")
            stream = _encode_documents(reader(path), tokenizer, need)
            if stream.numel() == 0:
                raise UserError(f"evaluation data {path} holds no text (no non-empty document)")
    return stream[:need]


def _encode_documents(documents: Iterator[str], tokenizer: Tokenizer, need: int) -> Tensor:
    parts: list[Tensor] = []
    total, batch = 0, []

    def flush() -> int:
        added = 0
        for ids in tokenizer.encode_batch(batch):
            row = ids if tokenizer.bos_id is None else [tokenizer.bos_id, *ids]
            parts.append(torch.tensor(row, dtype=torch.int64))
            added += len(row)
        batch.clear()
        return added

    for doc in documents:
        batch.append(doc)
        if len(batch) == ENCODE_BATCH:
            total += flush()
            if total >= need:
                break
    if batch and total < need:
        total += flush()
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8", newline="")
    except OSError as err:
        raise UserError(f"evaluation data {path} cannot be read ({err.strerror or first_line(err)})") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with _open_text(path) as f:
        line_no = 0
        try:
            for line_no, line in enumerate(f, start=1):
                yield line_no, line
        except UnicodeDecodeError:
            raise UserError(f"evaluation data {path} is not UTF-8 text (line {line_no + 1})") from None
        except OSError as err:
            raise UserError(f"evaluation data {path} cannot be read ({err.strerror or first_line(err)})") from None


def _txt_documents(path: Path) -> Iterator[str]:
    paragraph: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph).rstrip("\r\n")
            paragraph = []
    if paragraph:
        yield "".join(paragraph).rstrip("\r\n")


def _jsonl_documents(path: Path, field: str = "text") -> Iterator[str]:
    for line_no, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise UserError(f"{path}:{line_no} is not valid JSON ({first_line(err)})") from None
        if not isinstance(obj, dict) or field not in obj:
            found = ", ".join(map(str, obj)) if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
            raise UserError(f"{path}:{line_no} has no {field!r} field (found: {found or 'nothing'})")
        value = obj[field]
        if value is not None and not isinstance(value, str):
            raise UserError(f"{path}:{line_no}: field {field!r} is a {type(value).__name__}, not a string")
        if value and value.strip():
            yield value


def _parquet_documents(path: Path, column: str = "text") -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading evaluation data {path} needs the 'pyarrow' package: pip install pyarrow") from None
    try:
        file = pq.ParquetFile(str(path))
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise UserError(f"evaluation data {path} is not a readable parquet file ({first_line(err)})") from None
    names = file.schema_arrow.names
    if column not in names:
        raise UserError(f"evaluation data {path} has no {column!r} column (found: {', '.join(names) or 'none'})")
    try:
        for group in range(file.num_row_groups):
            for value in file.read_row_group(group, columns=[column]).column(column).to_pylist():
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise UserError(f"evaluation data {path}: column {column!r} holds {type(value).__name__}, not text")
                yield value
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"evaluation data {path} cannot be read ({first_line(err)})") from None


def _prepared_stream(data_dir: str, tokenizer: Tokenizer, need: int) -> Tensor:
    from .prepared import read_manifest, read_split_index

    manifest = read_manifest(data_dir)
    vocab, bos = manifest["vocab_size"], manifest["bos_id"]
    if (vocab, bos) != (tokenizer.vocab_size, tokenizer.bos_id):
        raise UserError(
            f"prepared data {data_dir} was tokenized with vocab_size {vocab}, bos_id {bos}, but {tokenizer} has "
            f"vocab_size {tokenizer.vocab_size}, bos_id {tokenizer.bos_id}: give the tokenizer the data was prepared with"
        )
    own = Path(data_dir) / "tokenizer.json"
    if isinstance(tokenizer, HFTokenizer) and "://" not in data_dir and own.is_file():
        try:
            same = _load_hf(own).vocab == tokenizer.vocab
        except UserError:
            same = True  # an unreadable copy does not decide; the manifest's numbers matched
        if not same:
            raise UserError(
                f"prepared data {data_dir} was tokenized with {own}, whose vocabulary differs from {tokenizer}: "
                f"give --tokenizer {own}"
            )
    index = read_split_index(data_dir, "val")
    stream = _read_local_chunks(Path(data_dir), index, manifest, need) if index is not None else None
    if stream is None:
        stream = _read_with_litdata(data_dir, need)
    if stream.numel() == 0:
        raise UserError(f"the val split of {data_dir} holds no tokens")
    return stream


def _read_local_chunks(data_dir: Path, index: dict, manifest: dict, need: int) -> Tensor | None:
    """The val tokens straight from litdata's uncompressed token chunks (a header of uint32 counts,
    then the tokens back to back); None when the chunks are not laid out that way (then litdata reads them)."""
    import numpy as np

    if index["config"].get("compression") is not None:
        return None
    parts, total = [], 0
    for chunk in index["chunks"]:
        items, dim = chunk.get("chunk_size"), chunk["dim"]
        if not isinstance(items, int):
            return None
        if dim == 0:
            continue
        header = (items + 2) * 4
        itemsize, rest = divmod(chunk["chunk_bytes"] - header, dim)
        dtype = np.dtype(manifest.get("token_dtype") or {2: "uint16", 4: "int32"}.get(itemsize, "V"))
        if rest or itemsize != dtype.itemsize:
            return None
        path = data_dir / "val" / chunk["filename"]
        take = min(dim, need - total)
        try:
            with open(path, "rb") as f:
                if int(np.frombuffer(f.read(4), dtype=np.uint32)[0]) != items:
                    return None
                f.seek(header)
                tokens = np.frombuffer(f.read(take * itemsize), dtype=dtype)
        except (OSError, IndexError) as err:
            raise UserError(f"chunk file {path} cannot be read ({first_line(err)})") from None
        parts.append(torch.from_numpy(tokens.astype(np.int64)))
        total += take
        if total >= need:
            break
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def _read_with_litdata(data_dir: str, need: int, block: int = 1024) -> Tensor:
    """Remote or compressed splits: litdata's reader in blocks (the tail of each chunk shorter than a block is not read)."""
    from litdata import StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    from .prepared import data_uri

    dataset = StreamingDataset(data_uri(data_dir, "val"), item_loader=TokensLoader(block_size=block))
    count = min(len(dataset), math.ceil(need / block))
    if count == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.as_tensor(dataset[i]).long() for i in range(count)])


# -- windows and bits per byte --------------------------------------------------------------------------------
def fixed_contexts(stream: Tensor, seq_len: int, max_tokens: int) -> Tensor:
    """(N, seq_len + 1) windows of a 1-D stream, window i = stream[i * seq_len : i * seq_len + seq_len + 1]
    (stride seq_len: a window's last token is the next one's first; inputs [:, :-1], targets [:, 1:],
    every stream token after the first is a target exactly once).

    N = min(floor((len - 1) / seq_len), ceil(max_tokens / seq_len)); fewer than one window is a UserError.
    """
    _positive(seq_len, "seq_len")
    _positive(max_tokens, "max_tokens")
    if stream.dim() != 1:
        raise ValueError(f"fixed_contexts takes a 1-D token stream, got shape {tuple(stream.shape)}")
    n = min(max(stream.numel() - 1, 0) // seq_len, math.ceil(max_tokens / seq_len))
    if n < 1:
        raise UserError(
            f"the evaluation data holds {stream.numel()} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}: "
            "use a smaller seq_len or more text"
        )
    return stream.unfold(0, seq_len + 1, seq_len)[:n].contiguous()


def bits_per_byte(nll_nats: Tensor, targets: Tensor, token_bytes: Tensor) -> tuple[float, int]:
    """(bits per byte, bytes counted), nanochat's ``evaluate_bpb``.

    ``nll_nats``: per-target negative log likelihood in nats, any shape (e.g. (B, T));
    ``targets``: the target ids, the same shape (ids < 0 are ignored); ``token_bytes``: (vocab,) UTF-8
    byte length per id, 0 for special tokens. Sums the nll of targets with > 0 bytes and divides by
    ln 2 x their total bytes: special tokens count in neither sum. No counted byte gives inf.
    """
    if nll_nats.shape != targets.shape:
        raise ValueError(f"nll_nats {tuple(nll_nats.shape)} and targets {tuple(targets.shape)} differ in shape")
    targets = targets.reshape(-1).long()
    nll = nll_nats.reshape(-1).double()
    table = token_bytes.to(device=targets.device, dtype=torch.int64)
    valid = targets >= 0
    nbytes = torch.where(valid, table[targets.clamp(min=0)], torch.zeros_like(targets))
    counted = nbytes > 0
    total_bytes = int(nbytes.sum())
    if total_bytes == 0:
        return float("inf"), 0
    total_nats = float(torch.where(counted, nll, torch.zeros_like(nll)).sum())
    return total_nats / (math.log(2) * total_bytes), total_bytes
