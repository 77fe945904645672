"""``snlp prepare`` (alias ``snlp-prepare``): text files (or the bundled corpus) -> tokenizer + litdata
token chunks + manifest.

    snlp prepare --bundled --out data/bundled                        # offline quickstart corpus
    snlp prepare data/fineweb-edu/ --out data/fwe --vocab-size 32768  # folders are searched recursively
    snlp prepare more.jsonl --tokenizer data/fwe/tokenizer.json --out data/more

Output (built in a temp folder beside OUT and renamed at the end; removed on any error, and a
killed run's leftover is removed by the next run writing beside OUT):

    OUT/tokenizer.json   byte-level BPE, <|bos|> = id 0 (or the reused --tokenizer, copied)
    OUT/train/, OUT/val/ litdata chunks; read with StreamingDataset(OUT/train, item_loader=TokensLoader(T + 1))
    OUT/manifest.json    counts, vocab, BOS id, sources with sha256, arguments (schema: data_prep/README.md)

Passes over the input: (1) sha256 of every file; (2) one read that checks every record, counts
documents, decides the split and feeds the tokenizer trainer; (3, 4) tokenizing workers, one pass
per split. Bad input stops with one line ``snlp prepare: error: ...`` and exit code 2; a fault
(full disk, a failed worker) with one line and exit code 1.

``--overwrite`` replaces OUT only when it is an earlier snlp-prepare output (its manifest.json says
``snlp-tokens/1`` and it holds nothing else than manifest.json, tokenizer.json, train/, val/), and
never when OUT is, or holds, an input or the ``--tokenizer`` file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from snlp_lightning.errors import (
    Fault, UserError, check_output_dir, clean_stale_temps, earlier_output_problem, install_dir, make_temp_dir, os_error_line,
    run_entry,
)

from .corpus import (
    TXT_SPLITS, Shard, Source, doc_hash, file_sha256, find_sources, iter_records, parquet_row_groups, val_threshold,
)
from .errors import PrepareError
from .tokenizer import BOS_TOKEN, check_vocab_size, load_tokenizer, special_tokens_of, train_tokenizer
from snlp_lightning.errors import ArgumentParser

MANIFEST_FORMAT = "snlp-tokens/1"
OUTPUT_ENTRIES = ("manifest.json", "tokenizer.json", "train", "val")  # everything an output folder holds
SHARD_BYTES = 32 << 20  # target input bytes per tokenizing work item
BUNDLED_NAME = ".bundled.jsonl"
START_METHODS = ("spawn", "fork")
PROG = "snlp-prepare"  # the alias's name; ``snlp prepare`` passes its own


@dataclass
class PrepareOptions:
    """Everything ``snlp-prepare`` takes; the CLI flags map one to one (``--vocab-size`` = vocab_size)."""

    out: str
    inputs: list[str] = field(default_factory=list)
    bundled: bool = False
    vocab_size: int = 4096
    tokenizer: str | None = None  # reuse this tokenizer.json instead of training one
    bos_token: str = BOS_TOKEN
    text_field: str = "text"
    txt_split: str = "blank-line"
    val_fraction: float = 0.05
    workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    chunk_bytes: str = "64MB"
    tokenizer_max_chars: int | None = None
    overwrite: bool = False
    progress: bool = True
    # How litdata starts the tokenizing workers. spawn (litdata's default) starts clean interpreters
    # (~2-5 s of imports per split); fork starts in ~0.1 s but copies this process, threads and all.
    start_method: str = "spawn"


# -- validation ---------------------------------------------------------------------------------------
def parse_bytes(text: str | int) -> int:
    """'64MB' -> 64_000_000 (decimal units, as litdata reads them); a plain integer is bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]B?)?\s*", str(text), flags=re.IGNORECASE)
    if not m or int(m.group(1)) <= 0:
        raise PrepareError(f"--chunk-bytes {text!r} is not a size; use e.g. 64MB, 512KB or a number of bytes")
    scale = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9}[(m.group(2) or "")[:1].upper() or None]
    return int(m.group(1)) * scale


def validate(opts: PrepareOptions) -> None:
    """Every check that needs no reading of the inputs, so a typo fails before any work."""
    if not opts.inputs and not opts.bundled:
        raise PrepareError("no input: give .txt / .jsonl / .parquet files or folders, or --bundled")
    if not 0.0 < opts.val_fraction < 1.0:
        raise PrepareError(f"--val-fraction {opts.val_fraction} must be between 0 and 1 (exclusive)")
    if opts.workers < 1:
        raise PrepareError(f"--workers {opts.workers} must be at least 1")
    if opts.start_method not in START_METHODS:
        raise PrepareError(f"--start-method {opts.start_method!r} is not one of {', '.join(START_METHODS)}")
    if opts.txt_split not in TXT_SPLITS:
        raise PrepareError(f"--txt-split {opts.txt_split!r} is not one of {', '.join(TXT_SPLITS)}")
    if opts.tokenizer_max_chars is not None and opts.tokenizer_max_chars < 1:
        raise PrepareError(f"--tokenizer-max-chars {opts.tokenizer_max_chars} must be at least 1")
    if opts.tokenizer is None:
        check_vocab_size(opts.vocab_size)
        if opts.bos_token != BOS_TOKEN:
            raise PrepareError(
                f"--bos-token {opts.bos_token!r} needs --tokenizer: a trained tokenizer's BOS is always {BOS_TOKEN}"
            )
    parse_bytes(opts.chunk_bytes)
    check_out(opts)


def check_out(opts: PrepareOptions) -> Path:
    """--out may become the output: a new or empty folder, or (with --overwrite) an earlier output of
    snlp-prepare that holds no input; its parent must be a writable folder."""
    inputs = [*opts.inputs, *([opts.tokenizer] if opts.tokenizer else [])]
    try:
        return check_output_dir(opts.out, what="--out", overwrite=opts.overwrite, is_own_output=not_an_output, inputs=inputs)
    except UserError as err:  # prepare() raises PrepareError for every bad input
        raise PrepareError(str(err)) from None


def not_an_output(folder: Path) -> str | None:
    """None when ``folder`` is an earlier snlp-prepare output; else why not (for the --out error)."""
    return earlier_output_problem(folder, MANIFEST_FORMAT, OUTPUT_ENTRIES)


# -- the scan -----------------------------------------------------------------------------------------
@dataclass
class Scan:
    """Pass 2 bookkeeping: counts, the smallest document hash and the shard cut points."""

    threshold: int
    documents: list[int]
    val_documents: int = 0
    min_hash: int | None = None
    at_min_hash: int = 0
    shards: list[Shard] = field(default_factory=list)


def _parts(sources: Sequence[Source], workers: int, shard_bytes: int) -> list[int]:
    """Work items per file: ~shard_bytes each, and enough overall to keep every worker busy."""
    total = sum(s.size for s in sources)
    return [max(math.ceil(s.size / shard_bytes), math.ceil(workers * s.size / total)) for s in sources]


def scan_documents(
    sources: Sequence[Source], opts: PrepareOptions, scan: Scan, bar, shard_bytes: int = SHARD_BYTES
) -> Iterator[str]:
    """Read every record once: validate, count, hash, cut shards; yields the train documents.

    A generator so the tokenizer trainer can consume it while the bookkeeping happens; drain it
    fully (``finish_scan``) when the trainer stops early or no tokenizer is trained.
    """
    for idx, (src, parts) in enumerate(zip(sources, _parts(sources, opts.workers, shard_bytes))):
        if src.fmt == "parquet":
            groups = parquet_row_groups(src, opts.text_field)
            n = max(1, min(parts, groups))
            bounds = sorted({round(k * groups / n) for k in range(n + 1)})
        else:
            cuts = [k * src.size / parts for k in range(1, parts)]
            bounds = [0]
        done = 0
        for rec in iter_records(src, opts.text_field, opts.txt_split):
            if src.fmt != "parquet":
                while cuts and rec.end >= cuts[0]:
                    cuts.pop(0)
                    if bounds[-1] < rec.end < src.size:
                        bounds.append(rec.end)
                bar.update(rec.end - done)
                done = rec.end
            text = rec.text
            if text is None or not text.strip():
                continue
            h = doc_hash(text)
            scan.documents[idx] += 1
            if scan.min_hash is None or h < scan.min_hash:
                scan.min_hash, scan.at_min_hash = h, 0
            scan.at_min_hash += h == scan.min_hash
            if h < scan.threshold:
                scan.val_documents += 1
            else:
                yield text
        if src.fmt != "parquet":
            bounds.append(src.size)
        bar.update(src.size - done)
        if scan.documents[idx] == 0:
            raise PrepareError(f"input {src.path} contains no documents (only blank text)")
        scan.shards.extend(Shard(idx, a, b) for a, b in zip(bounds, bounds[1:]) if b > a)


def _limit_chars(texts: Iterator[str], limit: int | None) -> Iterator[str]:
    used = 0
    for text in texts:
        if limit is not None and used >= limit:
            return
        used += len(text)
        yield text


def finish_scan(texts: Iterator[str], scan: Scan) -> None:
    for _ in texts:
        pass
    total = sum(scan.documents)
    if total < 2:
        raise PrepareError(f"the input has {total} document(s); need at least 2 (one for train, one for val)")
    if scan.val_documents == 0:
        # Tiny corpora: no hash fell below the threshold. Move the smallest-hash document(s) to val.
        assert scan.min_hash is not None
        scan.threshold = scan.min_hash + 1
        scan.val_documents = scan.at_min_hash
    if scan.val_documents == total:
        raise PrepareError(
            f"all {total} documents went to val (identical texts, or --val-fraction too high); train needs at least one"
        )


# -- the run ------------------------------------------------------------------------------------------
def prepare(opts: PrepareOptions, argv: Sequence[str] | None = None) -> dict:
    """Build OUT; returns the manifest. Raises PrepareError on bad input, leaving nothing behind."""
    started = time.time()
    validate(opts)
    sources = find_sources(opts.inputs) if opts.inputs else []
    reuse = load_tokenizer(opts.tokenizer, opts.bos_token) if opts.tokenizer else None

    out = Path(opts.out).expanduser().resolve()
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    clean_stale_temps(out.parent)  # what a killed run (SIGKILL, power loss) left beside OUT
    tmp = make_temp_dir(out)  # .OUT.<host>-<pid>.<random>.tmp: the next run can tell when its writer is gone
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); OUT should look like any mkdir'd folder
        manifest = _build(opts, sources, reuse, tmp, argv, started)
        check_out(opts)  # again: OUT may have changed during the build (another run, a user's files)
        install_dir(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # parents we made, deepest first, if they stayed empty
            with contextlib.suppress(OSError):
                p.rmdir()
        if isinstance(err, OSError) and err.filename is None and err.errno:  # a failed write (full disk) names no file
            raise Fault(f"writing {out} failed: {os_error_line(OSError(err.errno, err.strerror, str(out.parent)))}") from err
        raise
    _log(opts, f"wrote {out} in {time.time() - started:.1f} s")
    return manifest


def _build(opts: PrepareOptions, sources: list[Source], reuse, tmp: Path, argv, started: float) -> dict:
    from tqdm.auto import tqdm

    from .writer import TokenizeShards, token_dtype, write_split  # torch + litdata: only once there is work

    bundled_info = None
    if opts.bundled:
        bundled_source, bundled_info = _write_bundled(opts, tmp / BUNDLED_NAME)
        sources = [*sources, bundled_source]

    total_bytes = sum(s.size for s in sources)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="sha256", disable=not opts.progress) as bar:
        hashes = [file_sha256(s.path, bar.update) for s in sources]

    scan = Scan(threshold=val_threshold(opts.val_fraction), documents=[0] * len(sources))
    desc = "read + train tokenizer" if reuse is None else "read"
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=not opts.progress) as bar:
        texts = scan_documents(sources, opts, scan, bar)
        if reuse is None:
            tok = train_tokenizer(_limit_chars(texts, opts.tokenizer_max_chars), opts.vocab_size, show_progress=False)
            bos_id = tok.token_to_id(opts.bos_token)
        else:
            tok, bos_id = reuse
        finish_scan(texts, scan)
    tok_path = tmp / "tokenizer.json"
    # tokenizers' own save() reports a failed write (a full disk) as a bare Exception; write it from Python.
    tok_path.write_text(tok.to_str(pretty=True), encoding="utf-8")
    vocab_size = tok.get_vocab_size(with_added_tokens=True)

    chunk_bytes = parse_bytes(opts.chunk_bytes)
    stats = {}
    for split in ("train", "val"):
        n_workers = min(opts.workers, len(scan.shards))
        _log(opts, f"tokenizing {split} ({len(scan.shards)} work items, {n_workers} worker(s)) ...")
        fn = TokenizeShards(
            sources=sources, shards=scan.shards, tokenizer_path=str(tok_path), bos_token=opts.bos_token,
            vocab_size=vocab_size, split=split, threshold=scan.threshold, text_field=opts.text_field,
            txt_split=opts.txt_split,
        )
        st = stats[split] = write_split(fn, tmp / split, opts.workers, chunk_bytes, opts.progress, opts.start_method)
        expected = scan.val_documents if split == "val" else sum(scan.documents) - scan.val_documents
        if st.documents != expected:  # the workers re-read the files: they must agree with the scan
            raise Fault(
                f"{split}: the tokenizing workers wrote {st.documents} of {expected} documents "
                "(a worker died, or an input file changed during the run); nothing was written to --out"
            )
        _log(opts, f"{split}: {st.documents:,} documents, {st.tokens:,} tokens in {st.chunks} chunk(s)")

    source_entries = []
    for src, sha, n in zip(sources, hashes, scan.documents):
        entry = {"path": src.path, "format": src.fmt, "bytes": src.size, "sha256": sha, "documents": n}
        if bundled_info is not None and src.path.endswith(BUNDLED_NAME):
            entry = {"path": "<bundled>", **{k: v for k, v in entry.items() if k != "path"}, **bundled_info}
        source_entries.append(entry)
    (tmp / BUNDLED_NAME).unlink(missing_ok=True)

    import litdata
    import tokenizers

    manifest = {
        "format": MANIFEST_FORMAT,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "vocab_size": vocab_size,
        "bos_id": bos_id,
        "bos_token": opts.bos_token,
        "special_tokens": special_tokens_of(tok),
        "token_dtype": str(token_dtype(vocab_size)[1]),
        "documents": sum(scan.documents),
        "splits": {
            split: {
                "dir": split, "documents": st.documents, "tokens": st.tokens, "chunks": st.chunks,
                "fingerprint": st.fingerprint,
            }
            for split, st in stats.items()
        },
        "split_rule": {
            "rule": "val iff blake2b-64(document UTF-8) < threshold",
            "val_fraction": opts.val_fraction,
            "threshold": scan.threshold,
        },
        "tokenizer": {
            "file": "tokenizer.json",
            "sha256": file_sha256(tok_path),
            "trained": reuse is None,
            "source": None if reuse is None else str(Path(opts.tokenizer).resolve()),
            "source_sha256": None if reuse is None else file_sha256(opts.tokenizer),
            "requested_vocab_size": opts.vocab_size if reuse is None else None,
        },
        "sources": source_entries,
        "args": {"argv": list(argv) if argv is not None else None, **dataclasses.asdict(opts)},
        "versions": {
            "python": sys.version.split()[0], "tokenizers": tokenizers.__version__, "litdata": litdata.__version__,
        },
        "elapsed_s": round(time.time() - started, 2),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _write_bundled(opts: PrepareOptions, path: Path) -> tuple[Source, dict]:
    """The bundled corpus as a JSONL input file inside the build folder (removed before the rename)."""
    from .bundled import bundled_documents

    _log(opts, "collecting the bundled corpus (pydoc topics + stdlib docstrings) ...")
    docs = bundled_documents()
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({opts.text_field: doc}, ensure_ascii=False) + "\n")
    info = {"documents": len(docs), "chars": sum(map(len, docs)), "bytes_utf8": sum(len(d.encode()) for d in docs)}
    _log(opts, f"bundled corpus: {info['documents']:,} documents, {info['bytes_utf8'] / 1e6:.2f} MB")
    return Source(path=str(path), fmt="jsonl", size=path.stat().st_size), info


def _log(opts: PrepareOptions, message: str) -> None:
    if opts.progress:
        print(f"snlp-prepare: {message}", file=sys.stderr, flush=True)


# -- CLI ----------------------------------------------------------------------------------------------
def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    d = PrepareOptions(out="")
    p = ArgumentParser(
        prog=prog,
        description="Train (or reuse) a byte-level BPE tokenizer and write litdata token chunks "
        "(OUT/train, OUT/val) plus OUT/manifest.json, from .txt / .jsonl / .parquet files or the "
        "bundled offline corpus.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files or folders (searched recursively)")
    p.add_argument("--bundled", action="store_true",
                   help="use the bundled corpus: Python help topics + stdlib docstrings (no download)")
    p.add_argument("--out", required=True,
                   help="output folder (new or empty; --overwrite replaces only an earlier snlp-prepare output)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help=f"BPE vocabulary incl. special tokens (default {d.vocab_size}; paper configs: 32768)")
    p.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one (--vocab-size is then ignored)")
    p.add_argument("--bos-token", default=d.bos_token, help=f"BOS token, prepended to every document (default {d.bos_token})")
    p.add_argument("--text-field", default=d.text_field,
                   help=f"JSONL field / parquet column holding the text (default {d.text_field!r})")
    p.add_argument("--txt-split", default=d.txt_split, choices=TXT_SPLITS,
                   help="how .txt files split into documents (default blank-line)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"share of documents for val, by content hash (default {d.val_fraction}; at least one)")
    p.add_argument("--workers", type=int, default=d.workers, help=f"tokenizing processes (default min(2, CPUs) = {d.workers})")
    p.add_argument("--chunk-bytes", default=d.chunk_bytes, help=f"litdata chunk size (default {d.chunk_bytes})")
    p.add_argument("--tokenizer-max-chars", type=int, default=None,
                   help="train the tokenizer on at most this many characters of train text (default: all)")
    p.add_argument("--start-method", default=d.start_method, choices=START_METHODS,
                   help="how worker processes start (default spawn: clean interpreters; fork: much faster start-up)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an earlier snlp-prepare output (never a folder holding anything else)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    return p


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> None:
    """The command (``prog`` names it in --help and error lines: ``snlp prepare`` under ``snlp``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    opts = PrepareOptions(
        out=args.out, inputs=args.inputs, bundled=args.bundled, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        bos_token=args.bos_token, text_field=args.text_field, txt_split=args.txt_split, val_fraction=args.val_fraction,
        workers=args.workers, chunk_bytes=args.chunk_bytes, tokenizer_max_chars=args.tokenizer_max_chars,
        overwrite=args.overwrite, progress=not args.quiet, start_method=args.start_method,
    )
    run_entry(prog, _run, opts, argv)


def _run(opts: PrepareOptions, argv: list[str]) -> None:
    manifest = prepare(opts, argv)
    splits = manifest["splits"]
    print(
        f"{opts.out}: vocab {manifest['vocab_size']}, {manifest['documents']} documents, "
        f"train {splits['train']['tokens']:,} tokens / val {splits['val']['tokens']:,} tokens"
    )


if __name__ == "__main__":
    main()
