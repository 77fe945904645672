"""Bad input and faults on the data side: snlp-prepare's output folder, temporaries, corrupt files,
and TokenDataModule / validation_windows on damaged prepared folders. Real commands on real files:
every failure is one line (exit 2 for bad input, 1 for a fault), names the path, prints no
traceback, and leaves the inputs byte for byte as they were."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import ONE_THREAD, ROOT, TINY_MODEL
from data_prep import PrepareOptions, prepare
from data_prep.errors import PrepareError
from data_prep.prepare import MANIFEST_FORMAT, main
from snlp_lightning.data import DataError, TokenDataModule
from snlp_lightning.errors import TEMP_RE

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable:UserWarning")

WORDS = "the model layer block solver newton step chunk token stream window batch data train value".split()
PREPARE = [sys.executable, "-c", "from data_prep.prepare import main; main()"]
FAST = ["--quiet", "--workers", "1", "--start-method", "fork", "--vocab-size", "300", "--chunk-bytes", "8KB"]


def write_jsonl(path: Path, docs: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n")
    return path


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below root (or of root itself)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)) if p != root else p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run(cmd: list[str], timeout: float = 120, preexec=None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command in its own session; a run that outlives ``timeout`` (or leaves a process holding
    its pipes) fails the test instead of hanging it."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD, cwd=cwd,
                         start_new_session=True, preexec_fn=preexec)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"{cmd[3:]} did not end within {timeout} s (a hang, or a child holding its output)")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def assert_one_line(done: subprocess.CompletedProcess | tuple[int, str], prog: str, code: int, *needles: str) -> str:
    rc, err = (done.returncode, done.stderr) if isinstance(done, subprocess.CompletedProcess) else done
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert rc == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert last.startswith(f"{prog}: error: "), err[-3000:]
    for needle in needles:
        assert str(needle) in last, (needle, last)
    return last


def prepare_main(capsys, *args: str) -> tuple[int, str]:
    """snlp-prepare's main() in this process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        main([*args])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Path:
    """A real snlp-prepare output of a tiny corpus (the folder --overwrite may replace)."""
    base = tmp_path_factory.mktemp("earlier")
    write_jsonl(base / "in" / "c.jsonl")
    out = base / "out"
    prepare(PrepareOptions(out=str(out), inputs=[str(base / "in")], vocab_size=300, chunk_bytes="8KB", workers=1,
                           progress=False, start_method="fork"))
    return out


def test_manifest_format_is_one_constant():
    from snlp_lightning.prepared import MANIFEST_FORMAT as DATA_MANIFEST_FORMAT

    assert DATA_MANIFEST_FORMAT == MANIFEST_FORMAT


# -- snlp-prepare --out: nothing is lost ----------------------------------------------------------------
def test_out_equal_to_the_input_folder_is_refused_even_with_overwrite(tmp_path):
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "a.jsonl")
    (corpus / "notes.md").write_text("my notes\n")
    before = snapshot(corpus)
    done = run([*PREPARE, str(corpus), "--out", str(corpus), "--overwrite", *FAST])
    assert_one_line(done, "snlp-prepare", 2, f"--out {corpus}", "holds the input")
    assert snapshot(corpus) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no temp folder left beside it


@pytest.mark.parametrize("case", ["parent of an input file", "holds the --tokenizer"])
def test_out_holding_an_input_is_refused(tmp_path, capsys, earlier, case):
    if case == "parent of an input file":
        data = tmp_path / "data"
        source = write_jsonl(data / "corpus" / "a.jsonl")
        args = [str(source), "--out", str(data), "--overwrite"]
        keep = data
    else:  # an earlier output, but the tokenizer to reuse lives in it
        keep = tmp_path / "out"
        shutil.copytree(earlier, keep)
        source = keep / "tokenizer.json"
        args = [str(write_jsonl(tmp_path / "more.jsonl")), "--tokenizer", str(source), "--out", str(keep), "--overwrite"]
    before = snapshot(keep)
    code_err = prepare_main(capsys, *args, *FAST)
    assert_one_line(code_err, "snlp-prepare", 2, f"--out {keep}", f"holds the input {source}")
    assert snapshot(keep) == before


def test_overwrite_replaces_only_an_earlier_output(tmp_path, capsys, earlier):
    corpus = write_jsonl(tmp_path / "c.jsonl", seed=1)
    foreign = tmp_path / "mine"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "thesis.tex").write_text("years of work\n")
    (foreign / "sub" / "x.bin").write_bytes(b"\0" * 10)
    before = snapshot(foreign)
    last = assert_one_line(prepare_main(capsys, str(corpus), "--out", str(foreign), "--overwrite", *FAST),
                           "snlp-prepare", 2, f"--out {foreign}", "not an earlier output", "no manifest.json", "sub/", "thesis.tex")
    assert snapshot(foreign) == before
    last = assert_one_line(prepare_main(capsys, str(corpus), "--out", str(foreign), *FAST), "snlp-prepare", 2, "already exists")
    assert "--overwrite" not in last.split(";")[-1]  # not advice that cannot work
    assert snapshot(foreign) == before

    # an earlier output with something else in it: named, and kept
    mixed = tmp_path / "mixed"
    shutil.copytree(earlier, mixed)
    (mixed / "eval-results.csv").write_text("step,loss\n")
    before = snapshot(mixed)
    assert_one_line(prepare_main(capsys, str(corpus), "--out", str(mixed), "--overwrite", *FAST),
                    "snlp-prepare", 2, "eval-results.csv")
    assert snapshot(mixed) == before

    # a folder whose manifest has another format
    other = tmp_path / "other"
    shutil.copytree(earlier, other)
    (other / "manifest.json").write_text(json.dumps({"format": "something-else/2"}))
    assert_one_line(prepare_main(capsys, str(corpus), "--out", str(other), "--overwrite", *FAST),
                    "snlp-prepare", 2, f"--out {other}", MANIFEST_FORMAT)

    # a clean earlier output is replaced
    again = tmp_path / "again"
    shutil.copytree(earlier, again)
    code, err = prepare_main(capsys, str(corpus), "--out", str(again), "--overwrite", *FAST)
    assert code == 0, err
    manifest = json.loads((again / "manifest.json").read_text())
    assert manifest["sources"][0]["path"] == str(corpus) and sorted(p.name for p in again.iterdir()) == [
        "manifest.json", "tokenizer.json", "train", "val"]
    assert not [p for p in tmp_path.iterdir() if TEMP_RE.match(p.name)]


def test_out_that_cannot_be_a_folder_is_one_line(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl")
    blocker = tmp_path / "plain.txt"
    blocker.write_text("a file\n")
    before = snapshot(tmp_path)
    assert_one_line(prepare_main(capsys, str(corpus), "--out", str(blocker / "out"), *FAST),
                    "snlp-prepare", 2, str(blocker), "not a folder")
    assert_one_line(prepare_main(capsys, str(corpus), "--out", str(blocker), "--overwrite", *FAST),
                    "snlp-prepare", 2, f"--out {blocker} is a file")
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_out_with_an_unwritable_parent_is_one_line(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        assert_one_line(prepare_main(capsys, str(corpus), "--out", str(locked / "out"), *FAST),
                        "snlp-prepare", 2, str(locked), "not writable")
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("damage", ["truncated", "empty", "not json", "a folder", "missing"])
def test_corrupt_tokenizer_is_one_line(tmp_path, capsys, earlier, damage):
    corpus = write_jsonl(tmp_path / "c.jsonl")
    tok = tmp_path / "tokenizer.json"
    text = (earlier / "tokenizer.json").read_text()
    if damage == "truncated":
        tok.write_text(text[: len(text) // 2])
    elif damage == "empty":
        tok.write_text("")
    elif damage == "not json":
        tok.write_text("<html>404</html>")
    elif damage == "a folder":
        tok.mkdir()
    expected = {"a folder": "is a folder, not a file", "missing": "does not exist"}.get(damage, "not a valid tokenizer.json")
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    assert_one_line(prepare_main(capsys, str(corpus), "--tokenizer", str(tok), "--out", str(out), *FAST),
                    "snlp-prepare", 2, f"--tokenizer {tok}", expected)
    assert snapshot(tmp_path) == before and not out.exists()


# -- temporaries ----------------------------------------------------------------------------------------
def test_a_killed_run_leaves_nothing_after_the_next_start(tmp_path, bundled_data):
    """SIGKILL mid-run leaves its build folder; the next run to the same --out removes it and writes
    exactly what an uninterrupted run writes (bundled_data: the same corpus, vocab and workers)."""
    out = tmp_path / "data"
    cmd = [*PREPARE, "--bundled", "--out", str(out), "--vocab-size", "512", "--quiet", "--start-method", "fork",
           "--workers", str(min(2, os.cpu_count() or 1))]
    p = subprocess.Popen(cmd, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and p.poll() is None:
            temps = [e for e in tmp_path.iterdir() if TEMP_RE.match(e.name)]
            if temps and (temps[0] / ".bundled.jsonl").exists():  # building: the corpus file is in the temp folder
                break
            time.sleep(0.01)
        assert p.poll() is None, "snlp-prepare ended before it could be killed"
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the command and any worker it started
        p.wait()
    (stale,) = [e for e in tmp_path.iterdir() if TEMP_RE.match(e.name)]
    assert stale.is_dir() and f"-{p.pid}." in stale.name and not out.exists()

    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(e.name for e in tmp_path.iterdir()) == ["data"]  # the dead run's temp folder is gone
    got, want = (json.loads((d / "manifest.json").read_text()) for d in (out, bundled_data))
    assert got["splits"] == want["splits"]  # documents, tokens, chunks and chunk-layout fingerprints
    assert got["tokenizer"]["sha256"] == want["tokenizer"]["sha256"]
    for split in ("train", "val"):
        assert snapshot(out / split).keys() == snapshot(bundled_data / split).keys()
        for name, sha in snapshot(out / split).items():
            if name.endswith(".bin"):
                assert sha == snapshot(bundled_data / split)[name], name


def test_a_live_runs_temporary_is_left_alone(tmp_path, capsys):
    from snlp_lightning.errors import make_temp_dir

    corpus = write_jsonl(tmp_path / "c.jsonl")
    live = make_temp_dir(tmp_path / "out")  # this (live) process's temporary beside --out: another writer's
    (live / "partial.bin").write_bytes(b"x")
    code, err = prepare_main(capsys, str(corpus), "--out", str(tmp_path / "out"), *FAST)
    assert code == 0, err
    assert (live / "partial.bin").exists()


# -- faults while writing -------------------------------------------------------------------------------
def _file_size_limit(limit_bytes: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


@pytest.mark.parametrize("limit, chunk", [(4_000, "8KB"), (12_000, "64KB")], ids=["tokenizer write", "chunk write in a worker"])
def test_a_failed_write_is_one_line_exit_1_and_leaves_nothing(tmp_path, limit, chunk):
    """A file-size limit stands in for a full disk: the tokenizer (written here) or a chunk (written in
    a litdata worker) cannot be written. One line, exit 1, no temp folder, and no process left
    holding the output (run() fails the test if the pipes stay open)."""
    corpus = write_jsonl(tmp_path / "c.jsonl", docs=300)
    before = snapshot(corpus)
    out = tmp_path / "out"
    args = [str(corpus), "--out", str(out), "--quiet", "--workers", "2", "--start-method", "fork", "--vocab-size", "300",
            "--chunk-bytes", chunk]
    done = run([*PREPARE, *args], timeout=120, preexec=_file_size_limit(limit))
    assert_one_line(done, "snlp-prepare", 1, "File too large", str(tmp_path))
    assert snapshot(corpus) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_a_worker_error_is_one_line_and_ends_every_worker(tmp_path):
    """A document the scan did not see (the file changed under the run): the worker's PrepareError
    comes back as one line, not as litdata's traceback."""
    import multiprocessing

    from data_prep.corpus import Shard, Source
    from data_prep.tokenizer import SPECIAL_TOKENS, train_tokenizer
    from data_prep.writer import TokenizeShards, write_split

    bad = tmp_path / "a.txt"
    bad.write_bytes(b"fine words here\n\nnot \xff utf-8\n")
    tok = train_tokenizer(["fine words here", "more words"], 300, show_progress=False)
    tok.save(str(tmp_path / "tokenizer.json"))
    fn = TokenizeShards(sources=[Source(str(bad), "txt", bad.stat().st_size)], shards=[Shard(0, 0, bad.stat().st_size)],
                        tokenizer_path=str(tmp_path / "tokenizer.json"), bos_token=SPECIAL_TOKENS[0],
                        vocab_size=tok.get_vocab_size(), split="train", threshold=0, text_field="text", txt_split="blank-line")
    build = tmp_path / "build"
    build.mkdir()
    with pytest.raises(PrepareError, match=rf"{re.escape(str(bad))} is not UTF-8 text") as err:
        write_split(fn, build / "train", workers=1, chunk_bytes=8000, progress=False, start_method="fork")
    assert "\n" not in str(err.value)
    assert not multiprocessing.active_children()
    assert not list(build.glob(".*errors"))


# -- prepared folders that are damaged: TokenDataModule ------------------------------------------------
def _damage(root: Path, how: str) -> tuple[Path, str]:
    """Damage a copy of a prepared folder; returns (the file the message must name, a phrase it must hold)."""
    manifest, index, chunk = root / "manifest.json", root / "train" / "index.json", None
    chunks = json.loads(index.read_text())["chunks"]
    chunk = root / "train" / chunks[-1]["filename"]
    if how == "manifest not json":
        manifest.write_text('{"vocab_size": 512, "bos_id"')
        return manifest, "is not valid JSON"
    if how == "manifest empty":
        manifest.write_text("")
        return manifest, "it is empty"
    if how == "manifest lacks fields":
        manifest.write_text(json.dumps({"format": MANIFEST_FORMAT, "bos_id": 0}))
        return manifest, "lacks vocab_size, splits"
    if how == "manifest is a list":
        manifest.write_text("[1, 2]")
        return manifest, "not an object"
    if how == "index not json":
        index.write_text(index.read_text()[:40])
        return index, "is not valid JSON"
    if how == "index lacks chunks":
        data = json.loads(index.read_text())
        del data["chunks"]
        index.write_text(json.dumps(data))
        return index, "lacks 'chunks'"
    if how == "index lacks config":
        data = json.loads(index.read_text())
        del data["config"]
        index.write_text(json.dumps(data))
        return index, "lacks 'config'"
    if how == "chunk truncated":
        with open(chunk, "r+b") as f:
            f.truncate(chunk.stat().st_size // 3)
        return chunk, "is truncated"
    if how == "chunk empty":
        chunk.write_bytes(b"")
        return chunk, "is truncated (0 of"
    if how == "chunk missing":
        chunk.unlink()
        return chunk, "is missing"
    if how == "split empty":
        data = json.loads(index.read_text())
        data["chunks"] = []
        index.write_text(json.dumps(data))
        return root, "train split of"
    if how == "val index missing":
        (root / "val" / "index.json").unlink()
        return root / "val" / "index.json", "does not exist"
    raise AssertionError(how)


DAMAGE = ["manifest not json", "manifest empty", "manifest lacks fields", "manifest is a list", "index not json",
          "index lacks chunks", "index lacks config", "chunk truncated", "chunk empty", "chunk missing", "split empty",
          "val index missing"]


@pytest.fixture
def damaged(bundled_data, tmp_path, request):
    root = tmp_path / "data"
    shutil.copytree(bundled_data, root)
    return root, *_damage(root, request.param)


@pytest.mark.parametrize("damaged", DAMAGE, indirect=True)
def test_damaged_data_fails_at_the_start_with_one_line(damaged):
    root, path, phrase = damaged
    before = snapshot(root)
    with pytest.raises(DataError) as err:
        dm = TokenDataModule(str(root), seq_len=32, batch_size=4)
        dm.setup("fit")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and phrase in message, message
    assert "snlp-prepare" in message  # what to do
    assert snapshot(root) == before  # a check never changes the data


@pytest.mark.parametrize("damaged", ["chunk truncated", "index lacks chunks", "manifest lacks fields"], indirect=True)
def test_validation_windows_uses_the_same_checks(damaged):
    from export.measure import validation_windows

    root, path, phrase = damaged
    if "train" in str(path):  # validation_windows reads val: damage it the same way
        shutil.rmtree(root / "val")
        shutil.copytree(root / "train", root / "val")
        path = root / "val" / path.relative_to(root / "train")
    with pytest.raises(DataError) as err:
        validation_windows(root, seq_len=32, max_tokens=256)
    assert "\n" not in str(err.value) and str(path) in str(err.value) and phrase in str(err.value)


def test_validation_windows_on_good_and_too_short_data(bundled_data, tmp_path):
    from export.measure import validation_windows

    windows = validation_windows(bundled_data, seq_len=32, max_tokens=320)
    assert windows.shape == (10, 33)
    val_tokens = json.loads((bundled_data / "manifest.json").read_text())["splits"]["val"]["tokens"]
    with pytest.raises(DataError, match=r"the val split of .* holds 0 window\(s\) of seq_len \+ 1 = .*use a smaller seq_len"):
        validation_windows(bundled_data, seq_len=val_tokens + 10, max_tokens=10**9)
    with pytest.raises(DataError, match=f"data_dir {tmp_path / 'nope'} does not exist"):
        validation_windows(tmp_path / "nope", seq_len=32, max_tokens=256)


def test_data_dir_that_is_a_file_says_so_at_construction(bundled_data, tmp_path):
    manifest = re.escape(str(bundled_data / "manifest.json"))
    with pytest.raises(DataError, match=rf"data_dir {manifest} is a file, not a folder; give its folder"):
        TokenDataModule(str(bundled_data / "manifest.json"), seq_len=32, batch_size=4)
    with pytest.raises(DataError, match=f"data_dir {tmp_path / 'nowhere'} does not exist"):
        TokenDataModule(str(tmp_path / "nowhere"), seq_len=32, batch_size=4)  # before any Trainer exists
    remote = TokenDataModule("s3://some-bucket/prepared", seq_len=32, batch_size=4)  # read later, as before
    assert remote.data_dir == "s3://some-bucket/prepared"


# -- the same through `snlp fit` -----------------------------------------------------------------------
def _fit(data_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "snlp_lightning.cli", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                "--data.data_dir", str(data_dir), *TINY_MODEL, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                "--trainer.logger", "false", "--checkpoint.dirpath", str(cwd / "ckpt")], timeout=300, cwd=cwd)


@pytest.mark.parametrize("damaged", ["chunk truncated"], indirect=True)
def test_snlp_fit_on_a_truncated_chunk_is_one_line(damaged, tmp_path):
    root, path, phrase = damaged
    before = snapshot(root)
    done = _fit(root, tmp_path)
    assert_one_line(done, "snlp", 2, str(path), phrase)
    assert snapshot(root) == before and not (tmp_path / "ckpt").exists()


def test_snlp_fit_on_a_data_dir_that_is_a_file_fails_before_the_trainer(bundled_data, tmp_path):
    target = bundled_data / "manifest.json"
    done = _fit(target, tmp_path)
    assert_one_line(done, "snlp", 2, f"data_dir {target} is a file, not a folder")
    assert "GPU available" not in done.stdout + done.stderr  # the Trainer never started


def test_ctrl_c_while_tokenizing_is_interrupted_and_leaves_nothing(tmp_path):
    """SIGINT while litdata writes the chunks: litdata's own handler would exit 0 with nothing written
    and the temporary folder left; the command ends 'interrupted' (exit code 130) and removes it."""
    out = tmp_path / "data"
    cmd = [*PREPARE, "--bundled", "--out", str(out), "--vocab-size", "512", "--quiet", "--start-method", "fork", "--workers", "1"]
    p = subprocess.Popen(cmd, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and p.poll() is None:
            temps = [e for e in tmp_path.iterdir() if TEMP_RE.match(e.name)]
            if temps and (temps[0] / "train").exists():  # litdata is writing the train chunks
                break
            time.sleep(0.01)
        assert p.poll() is None, "snlp-prepare ended before it could be interrupted"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "snlp-prepare: interrupted"
    assert sorted(e.name for e in tmp_path.iterdir()) == []  # no output, no temporary
