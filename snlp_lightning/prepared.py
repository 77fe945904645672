"""The prepared-data format written by ``snlp-prepare``, read and checked in one place.

    OUT/manifest.json         format snlp-tokens/1: vocab_size, bos_id, splits (see data_prep/README.md)
    OUT/train/, OUT/val/      litdata chunks: index.json lists every chunk file and its size

Every check here is cheap (JSON reads and one stat per chunk) and raises DataError, one line that
names the file and how to re-create it, so damaged data fails before training starts rather than
inside litdata mid-epoch. Used by TokenDataModule and by the benchmark's validation windows.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import UserError, path_kind

SPLITS = ("train", "val")
# The manifest format snlp-prepare writes (data_prep.prepare.MANIFEST_FORMAT; not imported from there
# because data_prep pulls in the tokenizer libraries).
MANIFEST_FORMAT = "snlp-tokens/1"
MANIFEST_FIELDS = ("vocab_size", "bos_id", "splits")


class DataError(UserError):
    """Prepared data that is missing or unusable; the message names the path and how to create it."""


def _how_to_create(data_dir: str) -> str:
    return f"create it with: snlp-prepare --bundled --out {data_dir}  (or: snlp-prepare FILES_OR_FOLDERS --out {data_dir})"


def _recreate(data_dir: str, overwritable: bool = True) -> str:
    """How to get a usable folder back. --overwrite replaces only a folder whose manifest.json still
    says it is an snlp-prepare output; otherwise the data must go to a new folder."""
    if overwritable:
        return f"re-create it with snlp-prepare --out {data_dir} --overwrite (same inputs and options)"
    return (
        "re-create the data with snlp-prepare --out NEW_FOLDER "
        "(--overwrite cannot recognise this folder without a valid manifest.json)"
    )


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def data_uri(data_dir: str | os.PathLike, *parts: str) -> str:
    """``data_dir`` joined with ``parts``: a local path, or a remote URI joined with '/'."""
    data_dir = str(data_dir)
    if _is_remote(data_dir):
        return "/".join([data_dir.rstrip("/"), *parts])
    return str(Path(data_dir.removeprefix("file://"), *parts))


# -- the checks (shared with export/measure.py) ---------------------------------------------------------
# Local folders are checked completely and cheaply (two small JSON files per split, one stat per
# chunk), so damaged data fails with one line before any training starts instead of with a litdata
# timeout or traceback mid-epoch. Remote folders get the checks their provider can answer.
def check_data_dir(data_dir: str | os.PathLike) -> None:
    """A local ``data_dir`` must be an existing folder (a remote URI is left to the provider)."""
    data_dir = str(data_dir)
    if _is_remote(data_dir):
        return
    root = Path(data_uri(data_dir))
    kind = path_kind(root)
    if kind == "missing":
        raise DataError(f"data_dir {data_dir} does not exist; {_how_to_create(data_dir)}")
    if kind != "a folder":
        hint = (
            f"give its folder {root.parent}" if root.name == "manifest.json"
            else "give the folder snlp-prepare wrote (it holds manifest.json, train/, val/)"
        )
        raise DataError(f"data_dir {data_dir} is {kind}, not a folder; {hint}")


def _load_json(path: Path, what: str, hint: str) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 JSON (damaged {what}); {hint}") from None
    except ValueError as err:
        reason = "it is empty" if not path.stat().st_size else str(err)
        raise DataError(f"{path} is not valid JSON ({reason}); {hint}") from None


def _is_count(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """manifest.json of an snlp-prepare folder (local or remote), checked; raises DataError naming the file."""
    data_dir = str(data_dir)
    where = data_uri(data_dir, "manifest.json")
    if _is_remote(data_dir):
        text = _read_remote_text(where, data_dir)
        try:
            manifest = json.loads(text)
        except ValueError as err:
            raise DataError(f"{where} is not valid JSON ({err}); {_recreate(data_dir, False)}") from None
    else:
        check_data_dir(data_dir)
        path = Path(where)
        kind = path_kind(path)
        if kind == "missing":
            raise DataError(
                f"{where} is missing, so {data_dir} is not an snlp-prepare folder; {_how_to_create(data_dir)}"
            )
        if kind != "a file":
            raise DataError(
                f"{where} is {kind}, not a file, so {data_dir} is not an snlp-prepare folder; {_how_to_create(data_dir)}"
            )
        manifest = _load_json(path, "manifest", _recreate(data_dir, False))
    if not isinstance(manifest, dict):
        raise DataError(f"{where} holds a JSON {type(manifest).__name__}, not an object; {_recreate(data_dir, False)}")
    fmt = manifest.get("format", MANIFEST_FORMAT)
    if fmt != MANIFEST_FORMAT:
        raise DataError(f"{where} has format {fmt!r}; this version reads {MANIFEST_FORMAT!r}: {_recreate(data_dir, False)}")
    missing = [k for k in MANIFEST_FIELDS if k not in manifest]
    if missing:
        raise DataError(f"{where} lacks {', '.join(missing)}; {_recreate(data_dir)}")
    vocab, bos, splits = manifest["vocab_size"], manifest["bos_id"], manifest["splits"]
    if not _is_count(vocab, 1):
        raise DataError(f"{where}: vocab_size {vocab!r} is not a positive integer; {_recreate(data_dir)}")
    if not _is_count(bos) or bos >= vocab:
        raise DataError(f"{where}: bos_id {bos!r} is not an id below vocab_size {vocab}; {_recreate(data_dir)}")
    if not isinstance(splits, dict) or not all(isinstance(v, dict) for v in splits.values()):
        raise DataError(f"{where}: splits is not an object of split objects; {_recreate(data_dir)}")
    return manifest


def read_split_index(data_dir: str | os.PathLike, split: str) -> dict[str, Any] | None:
    """Check one split of a prepared folder; returns its litdata index.json (None for a remote folder).

    Local: index.json must be a litdata index (``chunks`` and ``config``) of token chunks, every
    chunk file it lists must exist with the size it lists (a cheap stat per chunk: a truncated or
    missing chunk otherwise surfaces as a litdata timeout mid-epoch), and the split must hold tokens.
    Remote: only that index.json exists, where the provider can tell.
    """
    data_dir = str(data_dir)
    index_uri = data_uri(data_dir, split, "index.json")
    if _is_remote(data_dir):
        if _remote_exists(index_uri) is False:
            raise DataError(f"split {split!r} is missing ({index_uri} does not exist); {_recreate(data_dir)}")
        return None
    index_path = Path(index_uri)
    kind = path_kind(index_path)
    if kind == "missing":
        raise DataError(f"split {split!r} is missing ({index_uri} does not exist); {_recreate(data_dir)}")
    if kind != "a file":
        raise DataError(f"split {split!r} is damaged ({index_uri} is {kind}, not a file); {_recreate(data_dir)}")
    index = _load_json(index_path, f"{split} index", _recreate(data_dir))
    if not isinstance(index, dict):
        raise DataError(f"{index_uri} holds a JSON {type(index).__name__}, not a litdata index; {_recreate(data_dir)}")
    missing = [k for k in ("chunks", "config") if k not in index]
    if missing:
        raise DataError(f"{index_uri} lacks {', '.join(map(repr, missing))} (not a litdata index); {_recreate(data_dir)}")
    chunks, config = index["chunks"], index["config"]
    if not isinstance(chunks, list) or not isinstance(config, dict):
        raise DataError(f"{index_uri}: 'chunks' must be a list and 'config' an object; {_recreate(data_dir)}")
    loader = config.get("item_loader")
    if loader not in (None, "TokensLoader"):
        raise DataError(f"{index_uri} was written with item_loader {loader!r}, not as token chunks; {_recreate(data_dir)}")
    split_dir = index_path.parent
    for i, chunk in enumerate(chunks):
        name = chunk.get("filename") if isinstance(chunk, dict) else None
        if (
            not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..")
            or not _is_count(chunk.get("chunk_bytes")) or not _is_count(chunk.get("dim"))
        ):
            raise DataError(
                f"{index_uri}: chunk entry {i} lacks a plain 'filename', 'chunk_bytes' or 'dim'; {_recreate(data_dir)}"
            )
        path = split_dir / name
        kind = path_kind(path)
        if kind == "missing":
            raise DataError(f"chunk file {path} is missing (listed in {index_uri}); {_recreate(data_dir)}")
        if kind != "a file":
            raise DataError(f"chunk file {path} is {kind}, not a file; {_recreate(data_dir)}")
        size, expected = path.stat().st_size, chunk["chunk_bytes"]
        if config.get("compression") is None and size != expected:
            state = f"truncated ({size:,} of {expected:,} bytes)" if size < expected else (
                f"{size:,} bytes, but {index_uri} lists {expected:,}"
            )
            raise DataError(f"chunk file {path} is {state}; {_recreate(data_dir)}")
    if not chunks or sum(c["dim"] for c in chunks) == 0:
        raise DataError(f"the {split} split of {data_dir} is empty ({index_uri} lists no tokens); {_recreate(data_dir)}")
    return index


def count_windows(index: dict[str, Any], block_size: int) -> int:
    """Windows of ``block_size`` tokens litdata's TokensLoader reads from a split (the tail of each chunk is never read)."""
    return sum(chunk["dim"] // block_size for chunk in index["chunks"])


def require_windows(data_dir: str | os.PathLike, split: str, index: dict[str, Any], seq_len: int, needed: int = 1) -> int:
    """The split must hold at least ``needed`` windows of seq_len + 1 tokens; returns how many it holds."""
    windows = count_windows(index, seq_len + 1)
    if windows < needed:
        tokens = sum(c["dim"] for c in index["chunks"])
        longest = max(c["dim"] for c in index["chunks"])
        raise DataError(
            f"the {split} split of {data_dir} ({tokens} tokens, at most {longest} per chunk) holds {windows} window(s) of "
            f"seq_len + 1 = {seq_len + 1} tokens, fewer than {needed}; use a smaller seq_len or more data"
        )
    return windows


def _read_remote_text(uri: str, data_dir: str) -> str:
    from .compat import litdata_fs_provider

    _get_fs_provider = litdata_fs_provider()  # litdata's private lookup, its signature checked

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "manifest.json")
        try:
            _get_fs_provider(uri).download_file(uri, local)
            return Path(local).read_text()
        except Exception as err:  # provider errors differ per cloud (botocore, google, ...)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"cannot read {uri} ({first}); {_how_to_create(data_dir)} and upload the folder") from None


def _remote_exists(uri: str) -> bool | None:
    """True / False when the provider can tell, None when it cannot (then litdata reports it)."""
    from .compat import litdata_fs_provider

    _get_fs_provider = litdata_fs_provider()  # litdata's private lookup, its signature checked

    try:
        return bool(_get_fs_provider(uri).exists(uri))
    except Exception:
        return None
