"""One error policy for every entry point, and the file-system edges every command shares.

Every command (``snlp`` and each of its subcommands, also under their old names ``snlp-prepare``,
``snlp-generate``, ``snlp-export``, ``snlp-bench``, ``snlp-quickstart``, ``snlp-demo``) ends a failed
run the same way, naming itself (``snlp prepare: error: ...``):

    UserError  bad input (a value, a path, a file's contents): one line that names the bad value and
               what is allowed, exit code 2
    Fault      the run could not finish (divergence, disk full, a failed write): one line, exit code 1
    OSError    not foreseen by a check: one line naming the path and the system's reason, exit code 1
    SNLP_TRACEBACK=1 re-raises instead, for the full traceback.

The file-system edges: output folders that may be replaced only when they are recognisably an
earlier output of the same command (``check_output_dir``), atomic writes through temporaries whose
names carry host and pid, so a later start can tell a dead writer's leftovers (``clean_stale_temps``)
from a live one's, and path messages that say what a path is rather than "does not exist".

The module itself imports only the standard library (importing it as ``snlp_lightning.errors``
still runs the package's ``__init__``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

EXIT_BAD_INPUT = 2
EXIT_FAULT = 1
EXIT_INTERRUPTED = 130
TRACEBACK_ENV = "SNLP_TRACEBACK"


class UserError(ValueError):
    """Bad input; the message is one line naming the bad value and what is allowed (exit code 2)."""


class Fault(RuntimeError):
    """The run could not finish for a reason outside the input (divergence, a full disk); one line (exit code 1)."""


# -- one line per failure -----------------------------------------------------------------------------
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free space or write elsewhere",
    errno.EFBIG: "the file exceeds the size limit of this process or file system",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "permission denied: choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOENT: "it does not exist",
}


def os_error_line(err: OSError, doing: str | None = None) -> str:
    """'cannot write runs/x/last.ckpt: No space left on device (the disk is full: ...)'."""
    path = err.filename if err.filename is not None else ""
    reason = err.strerror or type(err).__name__
    hint = _OS_HINTS.get(err.errno or -1)
    where = f"{doing} {path}".strip() if doing else str(path)
    line = f"{where}: {reason}" if where else reason
    return line + (f" ({hint})" if hint and hint.lower() != reason.lower() else "")


def first_line(message: object) -> str:
    text = str(message).strip()
    return text.splitlines()[0] if text else type(message).__name__


def fail(prog: str, message: object, code: int) -> None:
    print(f"{prog}: error: {first_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def quiet_library_noise() -> None:
    """Silence warnings that a user of the commands cannot act on (entry points only, never on import).

    - torch 2.13's pytree prints a FutureWarning about its own deprecated LeafSpec check on every
      Lightning step;
    - litdata's StreamingDataset defines __len__ for an IterableDataset (Lightning warns about it);
    - Lightning's "Tip" lines advertising cloud products;
    - torch.jit.script's deprecation notice from inside torch.func.
    """
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*Your `IterableDataset` has `__len__` defined.*")
    warnings.filterwarnings("ignore", message=r".*`torch.jit.script` is deprecated.*")
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
    import logging

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Tip:" not in str(record.msg)

    for name in ("lightning.pytorch.trainer.connectors.callback_connector", "lightning.pytorch.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(type(f).__name__ == "_NoTips" for f in log.filters):
            log.addFilter(_NoTips())


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (``PROG: error: ...``, exit code 2), not the usage dump."""

    def error(self, message: str):
        print(f"{self.prog}: error: {' '.join(message.split())} (all options: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def at_least(minimum: int | float, number: type = int):
    """An argparse type: a ``number`` (int or float) >= ``minimum``, with a message naming the value."""
    noun = "an integer" if number is int else "a number"

    def parse(text: str):
        try:
            value = number(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not value >= minimum:  # NaN too
            raise argparse.ArgumentTypeError(f"{value} is not allowed: must be >= {minimum}")
        return value

    parse.__name__ = f"{noun} >= {minimum}"
    return parse


def run_entry(prog: str, fn: Callable[..., Any], *args: Any, user_errors: tuple[type[BaseException], ...] = ()) -> Any:
    """Run ``fn(*args)`` under the error policy above; returns its result (0 if None)."""
    quiet_library_noise()
    traceback = bool(os.environ.get(TRACEBACK_ENV))
    try:
        result = fn(*args)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if traceback:
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except (UserError, *user_errors) as err:
        if traceback:
            raise
        fail(prog, err, EXIT_BAD_INPUT)
    except Fault as err:
        if traceback:
            raise
        fail(prog, err, EXIT_FAULT)
    except OSError as err:
        if traceback:
            raise
        fail(prog, os_error_line(err), EXIT_FAULT)
    return 0 if result is None else result


# -- paths --------------------------------------------------------------------------------------------
def path_kind(path: Path) -> str:
    """'a file' | 'a folder' | 'a broken link' | 'missing' | 'something else' (a socket, a device, ...)."""
    if path.is_file():
        return "a file"
    if path.is_dir():
        return "a folder"
    if path.is_symlink() and not path.exists():
        return "a broken link"
    if not path.exists():
        return "missing"
    return "something else"


def _require(path: str | Path, what: str, hint: str, want: str) -> Path:
    p = Path(path).expanduser()
    kind = path_kind(p)
    tail = f"; {hint}" if hint else ""
    if kind == "missing":
        raise UserError(f"{what} {p} does not exist{tail}")
    if kind != want:
        raise UserError(f"{what} {p} is {kind}, not {want}{tail}")
    return p


def require_file(path: str | Path, what: str, hint: str = "") -> Path:
    """``path`` must be a readable file; else a UserError saying what it is instead."""
    p = _require(path, what, hint, "a file")
    if not os.access(p, os.R_OK):
        raise UserError(f"{what} {p} is not readable (permission denied)" + (f"; {hint}" if hint else ""))
    return p


def require_dir(path: str | Path, what: str, hint: str = "") -> Path:
    """``path`` must be an existing folder; else a UserError saying what it is instead."""
    return _require(path, what, hint, "a folder")


def check_writable_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable folder (so ``path`` can be made)."""
    for ancestor in [path.parent, *path.parent.parents]:
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise UserError(f"{what} {path} cannot be created: {ancestor} is {path_kind(ancestor)}, not a folder")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise UserError(f"{what} {path} cannot be created: {ancestor} is not writable (permission denied)")
            return


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_dir(
    path: str | Path,
    *,
    what: str,
    overwrite: bool,
    is_own_output: Callable[[Path], str | None],
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Check that ``path`` may become this command's output folder; returns it (user-expanded).

    - ``path`` must not be a file, and its nearest existing ancestor must be a writable folder;
    - it must not be an input or hold one (an input is never replaced);
    - an existing, non-empty folder is replaced only with ``overwrite`` and only when
      ``is_own_output(path)`` returns None (it is an earlier output of this command); otherwise
      that function returns the reason it is not, which goes into the error.
    """
    p = Path(path).expanduser()
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise UserError(f"{what} {p} is {path_kind(p)}; give a folder path (new, or an earlier output of this command)")
        if not os.access(p, os.W_OK | os.X_OK):
            raise UserError(f"{what} {p} is not writable (permission denied)")
    check_writable_parent(p, what)
    resolved = p.resolve()
    for source in inputs:
        src = Path(source).expanduser().resolve()
        if _inside(src, resolved):
            raise UserError(f"{what} {p} holds the input {source}; write the output to another folder")
    if p.is_dir() and any(p.iterdir()):
        reason = is_own_output(p)
        if not overwrite:
            hint = "pass --overwrite to replace it" if reason is None else f"choose a new folder (it is not an earlier output: {reason})"
            raise UserError(f"{what} {p} already exists and is not empty; {hint}")
        if reason is not None:
            raise UserError(f"{what} {p} is not an earlier output of this command ({reason}); --overwrite replaces only those: choose a new folder")
    return p


def unexpected_entries(folder: Path, allowed: Iterable[str]) -> list[str]:
    """Names in ``folder`` that a command's output never holds (its own temporaries excepted)."""
    allowed = set(allowed)
    return sorted(e.name for e in folder.iterdir() if e.name not in allowed and not TEMP_RE.match(e.name))


def earlier_output_problem(folder: Path, manifest_format: str, entries: Iterable[str]) -> str | None:
    """None when ``folder`` is an earlier output of a command (its manifest.json has ``manifest_format``
    and it holds nothing but ``entries``); else why not, naming what else it holds. The
    ``is_own_output`` of ``check_output_dir`` for snlp prepare and snlp export."""
    extra = [f"{name}/" if (folder / name).is_dir() else name for name in unexpected_entries(folder, entries)]
    holds = ", ".join(extra[:6]) + (f" and {len(extra) - 6} more" if len(extra) > 6 else "")
    manifest = folder / "manifest.json"
    found = None
    if manifest.is_file():
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(manifest.read_bytes())
            found = data.get("format") if isinstance(data, dict) else None
    if found != manifest_format:
        why = "it has no manifest.json" if not manifest.is_file() else f"its manifest.json has format {found!r}, not {manifest_format!r}"
        return why + (f" and holds {holds}" if extra else "")
    return f"it also holds {holds}" if extra else None


# -- temporaries and atomic writes --------------------------------------------------------------------
# ".<target name>.<host>-<pid>.<random>.tmp": the writer's host and pid, so a later start on the
# same host removes only temporaries whose writer is gone (never a running writer's).
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_.-]+?)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


def temp_prefix(target: Path) -> str:
    return f".{target.name}.{_host()}-{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove temporaries in ``folder`` that this project wrote and whose writer (same host) has died.

    Only names matching TEMP_RE are touched; a temporary of another host or a live process stays.
    Returns the removed paths.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    host = _host()
    for entry in folder.iterdir():
        m = TEMP_RE.match(entry.name)
        if not m or m["host"] != host or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
    return removed


def make_temp_dir(target: Path) -> Path:
    """A new folder beside ``target`` to build it in (renamed over it by ``install_dir``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent))


def install_dir(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` folder to ``target``; an old ``target`` is moved aside first and
    removed only after the rename (callers check with ``check_output_dir`` that it may go)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent))
        os.replace(target, old / "previous")
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Write ``target`` all or nothing: a temporary beside it, flushed and fsynced, renamed over it.

    On any error (a full disk included) the temporary is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=temp_prefix(target), suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); the file should look like any other
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_figure(fig, target: str | Path) -> None:
    """A matplotlib figure as a PNG at ``target``, written atomically (``atomic_file``); the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(target) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)


def atomic_write_text(target: str | Path, text: str) -> None:
    with atomic_file(target, "w") as f:
        f.write(text)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit; the message names the file or keys."""


def non_finite_entries(state, limit: int = 3) -> list[str]:
    """Names of floating-point tensors in the mapping ``state`` holding NaN / inf (at most ``limit``)."""
    bad = []
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(name)
            if len(bad) == limit:
                break
    return bad
