"""Input files: finding them, reading documents out of them, and the deterministic train/val split.

Formats (chosen by the file's extension):

    .txt      UTF-8 text; a document is a run of non-blank lines (txt_split="blank-line", default),
              one line ("line") or the whole file ("file")
    .jsonl    one JSON object per line with a string field (text_field, default "text");
              blank lines and null values are skipped
    .parquet  a string column (text_field), read with pyarrow one row group at a time; the shape of
              FineWeb / FineWeb-Edu shards

Documents that are empty or only whitespace are skipped everywhere. A document's text is kept as
it is (no stripping, no normalization) so that token counts and round trips are exact.

Shards: the unit of work for the tokenizing workers is ``(source, start, stop)``; for .txt and
.jsonl, start / stop are byte offsets at record starts (workers seek, no re-reading from the top),
for .parquet they are row-group indices.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from snlp_lightning.errors import path_kind

from .errors import PrepareError

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
TXT_SPLITS = ("blank-line", "line", "file")
SUPPORTED = ", ".join(FORMATS)


@dataclass(frozen=True)
class Source:
    """One input file. path is absolute; fmt is txt | jsonl | parquet."""

    path: str
    fmt: str
    size: int


@dataclass(frozen=True)
class Shard:
    """Documents of one source between two record boundaries (see the module docstring)."""

    source: int
    start: int
    stop: int


# -- finding files ------------------------------------------------------------------------------------
def find_sources(inputs: Sequence[str | Path]) -> list[Source]:
    """Resolve files and folders (recursive; hidden entries skipped) into a sorted, de-duplicated list.

    A file named explicitly must have a supported extension; inside folders, other files are ignored
    (READMEs, .gitattributes, ...). Missing paths, empty files and folders without input files raise.
    """
    found: dict[str, Source] = {}
    for raw in inputs:
        path = Path(raw).expanduser()
        kind = path_kind(path)
        if kind == "missing":
            raise PrepareError(f"input {raw} does not exist")
        if kind == "something else":
            what = "a broken link" if path.is_symlink() and not path.exists() else "not a file or folder"
            raise PrepareError(f"input {raw} is {what}; give .txt / .jsonl / .parquet files or folders holding them")
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*")
                if p.suffix in FORMATS and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                raise PrepareError(f"input folder {raw} has no {SUPPORTED} files")
        else:
            if path.suffix not in FORMATS:
                kind = path.suffix or "(none)"
                raise PrepareError(f"input {raw}: unsupported file type {kind!r} (supported: {SUPPORTED})")
            files = [path]
        for f in files:
            size = f.stat().st_size
            if size == 0:
                raise PrepareError(f"input {f} is empty")
            key = str(f.resolve())
            found[key] = Source(path=key, fmt=FORMATS[f.suffix], size=size)
    return [found[k] for k in sorted(found)]


def file_sha256(path: str | Path, progress: Callable[[int], object] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    return digest.hexdigest()


# -- the split ----------------------------------------------------------------------------------------
HASH_SPACE = 1 << 64


def doc_hash(text: str) -> int:
    """A 64-bit hash of the document's UTF-8 text: the split depends on content only, not on order,
    file names or the number of workers, and exact duplicates always land in the same split."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def val_threshold(val_fraction: float) -> int:
    """Documents with doc_hash < threshold go to val."""
    return min(HASH_SPACE, max(1, math.floor(val_fraction * HASH_SPACE)))


# -- reading ------------------------------------------------------------------------------------------
@dataclass
class Record:
    """One record of a source: its text (None if it holds no document) and where the next one starts."""

    text: str | None
    end: int  # byte offset after this record (txt / jsonl) or row-group index + 1 (parquet)


def iter_records(
    src: Source, text_field: str, txt_split: str, start: int = 0, stop: int | None = None
) -> Iterator[Record]:
    """Every record of ``src`` between ``start`` and ``stop`` (offsets or row groups, see Shard)."""
    if src.fmt == "parquet":
        yield from _parquet_records(src, text_field, start, stop)
    elif src.fmt == "jsonl":
        yield from _jsonl_records(src, text_field, start, stop)
    elif txt_split == "file":
        yield from _whole_file(src, start)
    else:
        yield from _txt_records(src, txt_split, start, stop)


def iter_documents(
    src: Source, text_field: str, txt_split: str, start: int = 0, stop: int | None = None
) -> Iterator[str]:
    for rec in iter_records(src, text_field, txt_split, start, stop):
        if rec.text is not None and rec.text.strip():
            yield rec.text


def _lines(src: Source, start: int, stop: int | None) -> Iterator[tuple[int, bytes]]:
    """(offset of the line, raw line) for lines starting in [start, stop)."""
    with open(src.path, "rb") as f:
        f.seek(start)
        offset = start
        for line in f:
            if stop is not None and offset >= stop:
                return
            yield offset, line
            offset += len(line)


def _decode(src: Source, raw: bytes, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PrepareError(f"{src.path} is not UTF-8 text (bad byte at offset {offset + err.start})") from None


def _whole_file(src: Source, start: int) -> Iterator[Record]:
    if start == 0:
        with open(src.path, "rb") as f:
            yield Record(_decode(src, f.read(), 0), src.size)


def _txt_records(src: Source, txt_split: str, start: int, stop: int | None) -> Iterator[Record]:
    if txt_split == "line":
        for offset, raw in _lines(src, start, stop):
            yield Record(_decode(src, raw, offset).rstrip("\r\n"), offset + len(raw))
        return
    paragraph: list[str] = []
    end = start
    for offset, raw in _lines(src, start, stop):
        line = _decode(src, raw, offset)
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield Record("".join(paragraph).rstrip("\r\n"), end)
            paragraph = []
        end = offset + len(raw)
    if paragraph:
        yield Record("".join(paragraph).rstrip("\r\n"), end)


def _jsonl_records(src: Source, text_field: str, start: int, stop: int | None) -> Iterator[Record]:
    for line_no, (offset, raw) in enumerate(_lines(src, start, stop), start=1):
        end = offset + len(raw)
        if not raw.strip():
            yield Record(None, end)
            continue
        where = f"{src.path}:{line_no}" if start == 0 else f"{src.path} (byte {offset})"
        try:
            obj = json.loads(raw)
        except ValueError as err:
            raise PrepareError(f"{where} is not valid JSON ({err})") from None
        if not isinstance(obj, dict) or text_field not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise PrepareError(
                f"{where} has no {text_field!r} field (found: {keys}); choose the field with --text-field"
            )
        value = obj[text_field]
        if value is not None and not isinstance(value, str):
            raise PrepareError(f"{where}: field {text_field!r} is a {type(value).__name__}, not a string")
        yield Record(value, end)


def _open_parquet(src: Source, text_field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.path)
    except (pa.ArrowException, OSError) as err:
        raise PrepareError(f"{src.path} is not a readable parquet file ({str(err).splitlines()[0]})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise PrepareError(
            f"{src.path} has no {text_field!r} column (columns: {', '.join(schema.names)}); choose it with --text-field"
        )
    kind = schema.field(text_field).type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
        raise PrepareError(f"{src.path}: column {text_field!r} has type {kind}, not a string")
    return pf


def parquet_row_groups(src: Source, text_field: str) -> int:
    return _open_parquet(src, text_field).metadata.num_row_groups


def _parquet_records(src: Source, text_field: str, start: int, stop: int | None) -> Iterator[Record]:
    pf = _open_parquet(src, text_field)
    stop = pf.metadata.num_row_groups if stop is None else stop
    for group in range(start, stop):
        for batch in pf.iter_batches(batch_size=4096, row_groups=[group], columns=[text_field]):
            for value in batch.column(0).to_pylist():
                yield Record(value, group + 1)
