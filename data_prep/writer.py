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
import ctypes
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from snlp_lightning.errors import Fault, os_error_line

from .corpus import Shard, Source, doc_hash, iter_documents
from .errors import PrepareError
from .tokenizer import load_tokenizer

ENCODE_BATCH = 256  # documents per encode_batch call


def token_dtype(vocab_size: int) -> tuple[torch.dtype, np.dtype]:
    return (torch.uint16, np.dtype(np.uint16)) if vocab_size <= 1 << 16 else (torch.int32, np.dtype(np.int32))


@dataclass
class TokenizeShards:
    """The ``fn`` of ``litdata.optimize``: shard index -> token tensors of one split's documents.

    Picklable (plain fields), so litdata can send it to spawned workers; the tokenizer is loaded
    lazily once per worker.

    A failure in a worker (an input file that changed since the scan, a tokenizer that cannot be
    loaded) is written as one line to ``error_file`` and ends that worker's work cleanly:
    litdata's own path for a raising ``fn`` prints a traceback and leaves the worker's helper
    processes running after the run. ``write_split`` reads the file and raises its line.
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
    error_file: str | None = None

    def __post_init__(self) -> None:
        self._tokenizer = None
        self._failed = False

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_tokenizer"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tokenizer = None
        self._failed = False

    def __call__(self, index: int) -> Iterator[torch.Tensor]:
        if self.error_file is None:
            yield from self._tokens(index)
            return
        _watch_this_worker(self.error_file)
        if self._failed:
            return
        try:
            yield from self._tokens(index)
        except Exception as err:  # noqa: BLE001  (reported through error_file, see the class docstring)
            self._failed = True
            _record(self.error_file, {"bad_input": isinstance(err, PrepareError), "type": type(err).__name__,
                                      "message": str(err)})

    def _tokens(self, index: int) -> Iterator[torch.Tensor]:
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


def _record(error_file: str, record: dict) -> None:
    with contextlib.suppress(OSError):  # a full disk may refuse this too: the document count still disagrees
        with open(error_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


_WATCHED_PID: int | None = None


def _watch_this_worker(error_file: str) -> None:
    """Inside a litdata worker process, once: make its failures visible and its exit certain.

    litdata 0.2.x loses a worker's error when it happens after the worker's last item (the final
    chunk or index write on a full disk): the parent is already joining the workers and no longer
    reads their error queue, and the failed worker never exits, because at exit multiprocessing
    joins the worker's chunk remover, which waits for a stop message that never comes. So: copy
    every traceback the worker reports into ``error_file``, and at the worker's exit end the helper
    processes it still has (after a clean run it has none left).
    """
    global _WATCHED_PID
    if _WATCHED_PID == os.getpid():
        return
    _WATCHED_PID = os.getpid()
    worker = multiprocessing.current_process()
    queue = getattr(worker, "error_queue", None)
    if queue is None or multiprocessing.parent_process() is None:
        return  # not in a litdata worker
    put = queue.put

    def put_and_record(obj, *args, **kwargs):
        if isinstance(obj, str):
            _record(error_file, {"traceback": obj})
        return put(obj, *args, **kwargs)

    queue.put = put_and_record
    from multiprocessing.util import Finalize

    Finalize(None, _end_helper_processes, exitpriority=100)  # runs before multiprocessing joins the children


def _end_helper_processes() -> None:
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(5)


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

    error_file = output_dir.parent / f".{output_dir.name}.errors"  # see TokenizeShards
    error_file.unlink(missing_ok=True)
    fn = dataclasses.replace(fn, error_file=str(error_file))
    # optimize() calls multiprocessing.set_start_method(start_method, force=True) for the whole process;
    # put back what the caller had so later DataLoader workers keep their usual start method.
    previous = multiprocessing.get_start_method(allow_none=True)
    chatter = io.StringIO()  # litdata prints setup / worker lines to stdout; its progress bar is on stderr
    try:
        with contextlib.redirect_stdout(chatter), _reap_orphans(), _ctrl_c_interrupts():
            try:
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
            except Exception as err:
                # litdata's own report is "We found the following error <a worker's traceback>."; other
                # errors (merging the index after a worker failed) are explained by what the workers recorded.
                text = str(err) if str(err).startswith("We found the following error") else None
                failure = _worker_failure(error_file, fn.split, output_dir, text)
                if failure is None:
                    raise
                raise failure from None
            failure = _worker_failure(error_file, fn.split, output_dir)
            if failure is not None:
                raise failure
    finally:
        multiprocessing.set_start_method(previous, force=True)
        error_file.unlink(missing_ok=True)
    return read_split_stats(output_dir)


def _worker_failure(error_file: Path, split: str, output_dir: Path, traceback_text: str | None = None) -> Exception | None:
    """One exception for what the workers reported (see TokenizeShards), or None when they reported nothing."""
    records = []
    with contextlib.suppress(OSError):
        for line in error_file.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    for record in records:
        if "message" in record:  # raised in TokenizeShards
            message = " ".join(str(record["message"]).split()) or record["type"]
            if record["bad_input"]:
                return PrepareError(message)
            return Fault(f"tokenizing {split} failed in a worker: {record['type']}: {message}")
    for record in records:
        if "traceback" in record:  # raised in litdata's worker
            return _root_cause(record["traceback"], split, output_dir)
    return None if traceback_text is None else _root_cause(traceback_text, split, output_dir)


_CHAINED = ("The above exception was the direct cause", "During handling of the above exception")
_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*): ?(?P<message>.*)$")


def _root_cause(traceback_text: str, split: str, output_dir: Path) -> Exception:
    lines = [line.strip() for line in traceback_text.removesuffix(".").splitlines() if line.strip()]
    cut = next((i for i, line in enumerate(lines) if line.startswith(_CHAINED)), len(lines))
    candidates = [m for line in lines[:cut] if (m := _EXCEPTION_LINE.match(line)) and not line.startswith("File ")]
    if not candidates:
        return Fault(f"tokenizing {split} failed in a worker: {lines[-1] if lines else 'unknown error'}")
    kind, message = candidates[-1]["type"], candidates[-1]["message"]
    if kind.endswith("PrepareError"):
        return PrepareError(message)
    os_error = re.match(r"^\[Errno (\d+)\] (.*)$", message)
    if os_error:
        folder = output_dir.parent.parent  # beside --out: where the space or the permission is missing
        reason = os_error_line(OSError(int(os_error[1]), os_error[2], str(folder)))
        return Fault(f"writing the {split} chunks failed in a worker: {reason}")
    return Fault(f"tokenizing {split} failed in a worker: {kind.rsplit('.', 1)[-1]}: {message}")


@contextlib.contextmanager
def _ctrl_c_interrupts() -> Iterator[None]:
    """Keep Ctrl-C a KeyboardInterrupt during ``optimize``.

    litdata installs a SIGINT handler that ends the process with ``os._exit(0)``: exit code 0, no
    cleanup, the temporary folder left behind. While the split is written, requests to replace the
    SIGINT handler are ignored (Python's own, which raises KeyboardInterrupt, stays), so the run ends
    as ``snlp-prepare: interrupted`` (exit code 130) and removes what it built.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    real = signal.signal

    def signal_except_sigint(signum, handler):
        if signum == signal.SIGINT:
            return signal.getsignal(signum)
        return real(signum, handler)

    before = real(signal.SIGINT, signal.default_int_handler)
    signal.signal = signal_except_sigint
    try:
        yield
    finally:
        signal.signal = real
        real(signal.SIGINT, before)


@contextlib.contextmanager
def _reap_orphans() -> Iterator[None]:
    """When litdata's run fails it terminates its workers but not their helper processes (a chunk
    remover waiting on a queue): they would live on, holding this command's stdout / stderr, so a
    piped ``snlp-prepare ... | tee log`` never ends. On Linux this process becomes the subreaper of
    its descendants for the run, and after a failure ends every child that the run started."""
    if not sys.platform.startswith("linux"):
        yield
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        previous = ctypes.c_int(0)
        subreaper = libc.prctl(37, ctypes.byref(previous), 0, 0, 0) == 0 and libc.prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        subreaper = False
    before = _children()
    try:
        yield
    except BaseException:
        if subreaper:
            _end_new_children(before)
        raise
    finally:
        if subreaper:
            libc.prctl(36, previous.value, 0, 0, 0)


def _children() -> set[int]:
    """Pids whose parent is this process (from /proc)."""
    me, found = os.getpid(), set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                if int(fields[1]) == me:
                    found.add(int(entry.name))
    return found


def _end_new_children(before: set[int], settle_s: float = 0.5, limit_s: float = 5.0) -> None:
    """SIGKILL and reap the children not in ``before`` (multiprocessing's resource tracker and fork
    server excepted) until none has appeared for ``settle_s``: terminated workers' own children are
    re-parented here a moment after the workers die."""
    from multiprocessing import forkserver, resource_tracker

    keep = set(before)  # and the multiprocessing helpers this process shares with later runs:
    keep.add(getattr(resource_tracker._resource_tracker, "_pid", None))
    keep.add(getattr(forkserver._forkserver, "_forkserver_pid", None))
    start = last_seen = time.monotonic()
    while time.monotonic() - last_seen < settle_s and time.monotonic() - start < limit_s:
        new = _children() - keep
        for pid in new:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)
        if new:
            last_seen = time.monotonic()
        time.sleep(0.05)


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
