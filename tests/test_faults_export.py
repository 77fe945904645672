"""Bad input and faults of snlp-generate, snlp-export and snlp-bench (and a package's generate.py):
one line ``PROG: error: ...`` naming the bad value, exit code 2 (bad input) or 1 (a failed write),
never a traceback, never a user's folder replaced, never a silently ignored flag or a token the
tokenizer cannot decode.

The commands run on real files: as subprocesses where argv or a fresh process matters, otherwise
through their ``main(argv)`` in this process (the same code, without a torch import per case).
One package is exported for the whole module (the slow part, ~30 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export import LayerParallelDecoder, generate_tokens, speculative_tokens
from export import bench as bench_cli
from export import generate_cli
from export import package as export_cli
from export.checkpoint import load_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("SNLP_TRACEBACK", None)
PLAN = "idn:n2:K1"


@pytest.fixture(autouse=True)
def _one_line_errors(monkeypatch):
    monkeypatch.delenv("SNLP_TRACEBACK", raising=False)


@pytest.fixture(scope="module")
def package(trained_checkpoint, tmp_path_factory) -> Path:
    """The trained model exported once by the real command, at the smallest settings."""
    out = tmp_path_factory.mktemp("package") / "pkg"
    done = subprocess.run([sys.executable, "-m", "export.package", "--checkpoint", str(trained_checkpoint), "--plan", PLAN,
                           "--out", str(out), "--max-seq-len", "16"], capture_output=True, text=True, timeout=900, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def run_main(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """A command's main(argv) in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def run_module(module: str, *args, cwd: Path | None = None) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, timeout=600, env=ENV, cwd=cwd)
    return done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")


def assert_one_line(result: tuple[int, str, str], prog: str, *names: str, code: int = 2) -> str:
    """Exit ``code``, no traceback, and stderr's last line is ``prog: error: ...`` naming every one of ``names``."""
    got, _, err = result
    assert "Traceback" not in err, err[-3000:]
    assert got == code, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), err[-3000:]
    for name in names:
        assert name in last, f"{name!r} not in {last!r}"
    return last


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (a folder is an entry too)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(folder.rglob("*"))}


def word_tokenizer(path: Path, size: int) -> Path:
    """A real tokenizers JSON of ``size`` ids (<|bos|> = 0, like the trained model's), fewer than the model's 512."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<|bos|>": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, size)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(path))
    return path


# -- 3a: a package fixed these settings at export time -------------------------------------------------
@pytest.mark.parametrize("flag", [["--plan", "idn:n3:K1"], ["--dtype", "float32"], ["--device", "cpu"], ["--compile"],
                                  ["--speculative", "2"], ["--max-seq-len", "8"]], ids=lambda f: f[0])
def test_generate_with_a_package_refuses_settings_fixed_at_export(package, flag, capsys):
    result = run_main(generate_cli.main, ["--package", package, "--prompt", "The", "--max-new-tokens", "2", *flag], capsys)
    assert_one_line(result, "snlp-generate", flag[0], "--package", "export")
    assert result[1] == ""  # nothing was generated


# -- 4: counts below their minimum --------------------------------------------------------------------
COUNTS = [
    ("generate", "--max-new-tokens", "0", "1"), ("generate", "--top-k", "0", "1"), ("generate", "--speculative", "-1", "0"),
    ("generate", "--max-seq-len", "0", "1"),
    ("export", "--batch-size", "0", "1"), ("export", "--max-seq-len", "0", "1"),
    ("bench", "--lengths", "0", "1"), ("bench", "--iters", "0", "1"), ("bench", "--warmup", "-1", "0"),
    ("bench", "--repeats", "0", "1"), ("bench", "--decode-batches", "0", "1"), ("bench", "--decode-tokens", "0", "1"),
    ("bench", "--prompt-len", "0", "1"), ("bench", "--draft-len", "0", "1"), ("bench", "--val-tokens", "0", "1"),
    ("bench", "--sweep-fuse", "0", "1"),
]


@pytest.mark.parametrize("command, flag, value, minimum", COUNTS, ids=[f"{c[0]}{c[1]}" for c in COUNTS])
def test_a_count_below_its_minimum_is_one_line(command, flag, value, minimum, trained_checkpoint, tmp_path, capsys):
    ck = str(trained_checkpoint)
    main, prog, argv = {
        "generate": (generate_cli.main, "snlp-generate", ["--checkpoint", ck, "--prompt", "The", "--max-new-tokens", "2"]),
        "export": (export_cli.main, "snlp-export", ["--checkpoint", ck, "--out", tmp_path / "pkg"]),
        "bench": (bench_cli.main, "snlp-bench", ["--checkpoint", ck, "--out", tmp_path / "bench", "--lengths", "8", "--warmup", "0",
                                                 "--iters", "1", "--no-decode"]),
    }[command]
    assert_one_line(run_main(main, [*argv, flag, value], capsys), prog, flag, f"{value} is not allowed", f">= {minimum}")
    assert not (tmp_path / "pkg").exists() and not (tmp_path / "bench").exists()


def test_sampling_settings_out_of_range_are_one_line(trained_checkpoint, capsys):
    base = ["--checkpoint", trained_checkpoint, "--prompt", "The", "--max-new-tokens", "2"]
    for flag, value, name in [("--seed", str(10**23), "seed=100000000000000000000000"), ("--temperature", "nan", "temperature=nan")]:
        result = run_main(generate_cli.main, [*base, flag, value, *(["--temperature", "1"] if flag == "--seed" else [])], capsys)
        assert_one_line(result, "snlp-generate", name, "not allowed")


# -- 4: prompts, devices, checkpoint paths -------------------------------------------------------------
def test_a_prompt_that_is_not_utf8_is_one_line(trained_checkpoint):
    # argv bytes that are not UTF-8 reach Python as surrogate escapes; the tokenizer cannot take them.
    result = run_module("export.generate_cli", b"--checkpoint", bytes(trained_checkpoint), b"--prompt", b"caf\xe9 \xff")
    assert_one_line(result, "snlp-generate", "prompt", r"\xe9", "not valid UTF-8")


@pytest.mark.parametrize("prog", ["snlp-generate", "snlp-export", "snlp-bench"])
def test_a_device_this_torch_does_not_have_is_one_line(prog, trained_checkpoint, tmp_path, capsys):
    main, argv = {
        "snlp-generate": (generate_cli.main, ["--prompt", "The"]),
        "snlp-export": (export_cli.main, ["--out", tmp_path / "pkg"]),
        "snlp-bench": (bench_cli.main, ["--out", tmp_path / "bench", "--lengths", "8", "--no-decode"]),
    }[prog]
    devices = ["gpu0", "meta"] + ([] if torch.cuda.is_available() else ["cuda"]) + (["cuda:99"] if torch.cuda.is_available() else [])
    for device in devices:
        result = run_main(main, ["--checkpoint", trained_checkpoint, *argv, "--device", device], capsys)
        assert_one_line(result, prog, f"--device '{device}'")
    assert not (tmp_path / "pkg").exists() and not (tmp_path / "bench").exists()


def test_checkpoint_paths_say_what_they_are(trained_checkpoint, tmp_path, capsys):
    folder = tmp_path / "model.ckpt"
    folder.mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save({"state_dict": {}, "hyper_parameters": None}, tmp_path / "no_config.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"config": __import__("argparse").Namespace(n_layer=2)}},
               tmp_path / "objects.ckpt")
    torch.save({"wte.weight": torch.zeros(2, 2)}, tmp_path / "model_000001.pt")
    cases = {
        folder: [str(folder), "is a folder, not a file"],
        tmp_path / "notes.txt": ["notes.txt", "neither a .ckpt nor a nanochat model_*.pt"],
        tmp_path / "no_config.ckpt": ["no_config.ckpt", "has no model config"],
        tmp_path / "objects.ckpt": ["objects.ckpt", "weights_only"],
        tmp_path / "model_000001.pt": ["model_000001.pt", "meta_000001.json"],
        tmp_path / "none.ckpt": ["none.ckpt", "does not exist"],
    }
    for path, names in cases.items():
        assert_one_line(run_main(generate_cli.main, ["--checkpoint", path, "--prompt", "The"], capsys), "snlp-generate", *names)
    # the same check in snlp-export and snlp-bench
    assert_one_line(run_main(export_cli.main, ["--checkpoint", folder, "--out", tmp_path / "pkg"], capsys), "snlp-export",
                    "is a folder, not a file")
    assert_one_line(run_main(bench_cli.main, ["--checkpoint", folder, "--out", tmp_path / "bench"], capsys), "snlp-bench",
                    "is a folder, not a file")


# -- 3b: the tokenizer must fit the model -------------------------------------------------------------
def test_a_tokenizer_larger_than_the_model_is_refused(trained_checkpoint, bundled_data, package, tmp_path, capsys):
    from tokenizers import Tokenizer

    big = Tokenizer.from_file(str(bundled_data / "tokenizer.json"))
    big.add_tokens([f"extra{i}" for i in range(100)])
    big.save(str(tmp_path / "big.json"))
    for source in (["--checkpoint", trained_checkpoint], ["--package", package]):
        result = run_main(generate_cli.main, [*source, "--tokenizer", tmp_path / "big.json", "--prompt", "extra99"], capsys)
        assert_one_line(result, "snlp-generate", "big.json", "612", "512")
        assert result[1] == ""
    # snlp-export refuses it too, before compiling anything, rather than ship a package that cannot run
    result = run_main(export_cli.main, ["--checkpoint", trained_checkpoint, "--tokenizer", tmp_path / "big.json",
                                        "--out", tmp_path / "pkg"], capsys)
    assert_one_line(result, "snlp-export", "big.json", "612", "512")
    assert not (tmp_path / "pkg").exists()


def test_a_smaller_tokenizer_never_gets_ids_it_cannot_decode(trained_checkpoint, package, tmp_path):
    model, _ = load_model(trained_checkpoint)
    prompts = [[0, 5, 17], [0, 42]]
    seq = LayerParallelDecoder(model, "seq", batch_size=2)
    free = generate_tokens(seq, prompts, 24)
    assert max(max(row) for row in free) >= 100  # the model does emit ids a 100-id tokenizer lacks
    limited = generate_tokens(seq, prompts, 24, vocab_limit=100)
    assert max(max(row) for row in limited) < 100
    assert generate_tokens(seq, prompts, 24, vocab_limit=None) == free
    sampled = generate_tokens(seq, prompts, 24, temperature=1.0, seed=3, vocab_limit=100)
    assert max(max(row) for row in sampled) < 100
    # Self-speculative: greedy stays exactly the (restricted) sequential greedy; sampling stays below the limit.
    drafter = LayerParallelDecoder(model, PLAN, batch_size=2)
    spec, _ = speculative_tokens(drafter, prompts, 24, draft_len=3, vocab_limit=100)
    assert spec == limited
    spec_sampled, _ = speculative_tokens(drafter, prompts, 24, draft_len=3, temperature=1.0, seed=3, vocab_limit=100)
    assert max(max(row) for row in spec_sampled) < 100

    # The package's own runtime (a fresh process, torch only): with the 100-id tokenizer every new
    # id is below 100; with the package's full-size tokenizer the output is the eager plan's.
    small = word_tokenizer(tmp_path / "small.json", 100)
    launcher = [sys.executable, str(package / "generate.py"), "--max-new-tokens", "12", "--print-tokens"]
    done = subprocess.run([*launcher, "--prompt", "w5 w17", "--tokenizer", str(small)], capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = [int(t) for t in done.stdout.strip().splitlines()[-1].split()]
    assert len(ids) == 12 and max(ids) < 100
    done = subprocess.run([*launcher, "--prompt", "The module"], capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    from export.text import TextCodec

    eager = LayerParallelDecoder(model, PLAN, batch_size=1, max_seq_len=16)
    want = generate_tokens(eager, [TextCodec(package / "tokenizer.json").encode("The module")], 12)[0]
    assert [int(t) for t in done.stdout.strip().splitlines()[-1].split()] == want


# -- 4, 5: broken packages ----------------------------------------------------------------------------
def test_a_broken_package_is_one_line_naming_the_file(package, tmp_path, capsys):
    def variant(name: str, manifest: str | None = None, truncate: bool = False) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        shutil.copyfile(package / "tokenizer.json", folder / "tokenizer.json")
        (folder / "manifest.json").write_text(manifest if manifest is not None else (package / "manifest.json").read_text())
        data = (package / "model.pt2").read_bytes()
        (folder / "model.pt2").write_bytes(data[: len(data) // 2] if truncate else data)
        return folder

    good = json.loads((package / "manifest.json").read_text())
    cases = {
        variant("truncated", truncate=True): ["model.pt2", "truncated"],
        variant("not_json", manifest="{\"format\": \"snlp-export/1\","): ["manifest.json", "not valid JSON"],
        variant("no_config", manifest=json.dumps({k: v for k, v in good.items() if k != "config"})): ["manifest.json", "'config'"],
        variant("bad_rows", manifest=json.dumps({**good, "batch_size": "one"})): ["manifest.json", "'batch_size'"],
        variant("format", manifest=json.dumps({**good, "format": "other/2"})): ["manifest.json", "other/2"],
    }
    for folder, names in cases.items():
        result = run_main(generate_cli.main, ["--package", folder, "--prompt", "The"], capsys)
        assert_one_line(result, "snlp-generate", str(folder), *names)
    # The package's own launcher (no training code) says the same.
    broken = tmp_path / "not_json"
    shutil.copytree(package / "snlp_runtime", broken / "snlp_runtime")
    shutil.copyfile(package / "generate.py", broken / "generate.py")
    done = subprocess.run([sys.executable, str(broken / "generate.py"), "--prompt", "x"], capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert_one_line((done.returncode, done.stdout, done.stderr), "generate.py", str(broken / "manifest.json"), "not valid JSON")


# -- 1, 2: snlp-export's output folder ----------------------------------------------------------------
def test_export_never_replaces_a_folder_that_is_not_its_package(trained_checkpoint, package, tmp_path, capsys):
    ck = str(trained_checkpoint)
    project = tmp_path / "myproj"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("a week of notes")
    (project / "src" / "data.bin").write_bytes(os.urandom(256))
    lookalike = tmp_path / "lookalike"
    shutil.copytree(package, lookalike)
    (lookalike / "results.csv").write_text("plan,ppl\n")
    (tmp_path / "ckdir").mkdir()
    shutil.copyfile(trained_checkpoint, tmp_path / "ckdir" / "last.ckpt")
    mine = tmp_path / "mine"
    shutil.copytree(package, mine)
    before = {folder: snapshot(folder) for folder in (project, lookalike, tmp_path / "ckdir", mine)}

    cases = [
        (["--checkpoint", ck, "--out", project, "--overwrite"], ["myproj", "no manifest.json"]),
        (["--checkpoint", ck, "--out", project], ["myproj", "not an snlp-export package"]),
        (["--checkpoint", ck, "--out", lookalike, "--overwrite"], ["lookalike", "results.csv"]),
        (["--checkpoint", tmp_path / "ckdir" / "last.ckpt", "--out", tmp_path / "ckdir", "--overwrite"], ["holds the input", "last.ckpt"]),
        (["--checkpoint", ck, "--tokenizer", mine / "tokenizer.json", "--out", mine, "--overwrite"], ["holds the input", "tokenizer.json"]),
        (["--checkpoint", ck, "--out", mine], ["mine", "exists: pass --overwrite"]),
        (["--checkpoint", ck, "--out", project / "notes.txt"], ["notes.txt", "is a file"]),
        (["--checkpoint", ck, "--out", project / "notes.txt" / "pkg"], ["notes.txt is a file, not a folder"]),
    ]
    for argv, names in cases:
        assert_one_line(run_main(export_cli.main, argv, capsys), "snlp-export", *names)
    for folder, files in before.items():
        assert snapshot(folder) == files, folder
    assert export_cli.package_problem(package) is None  # a real package is one --overwrite may replace
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a /sys that nobody can create folders in")
def test_a_failed_write_is_one_line_with_exit_code_1(trained_checkpoint, capsys):
    # /sys refuses new entries even for root: the write fails with an OSError after the checks pass.
    result = run_main(export_cli.main, ["--checkpoint", trained_checkpoint, "--out", "/sys/snlp-export-test"], capsys)
    assert_one_line(result, "snlp-export", "/sys", code=1 if os.access("/sys", os.W_OK) else 2)


# -- 2, 5: snlp-bench checks everything before it times anything -----------------------------------
def test_bench_checks_data_output_and_lengths_before_timing(trained_checkpoint, tmp_path, capsys):
    base = ["--checkpoint", trained_checkpoint, "--plans", PLAN, "--lengths", "8", "--warmup", "0", "--iters", "1",
            "--decode-batches", "1", "--decode-tokens", "2", "--prompt-len", "2", "--draft-len", "1", "--repeats", "1"]
    (tmp_path / "a_file").write_text("mine")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "bench.json").write_text('{"my": "results"}\n')
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "bench.md").write_text("# my notes\n")
    (tmp_path / "empty").mkdir()
    before = {folder: snapshot(folder) for folder in (theirs, notes)}
    out = tmp_path / "bench"
    cases = [
        (["--data-dir", tmp_path / "missing", "--out", out], ["--data-dir", "missing", "does not exist"]),
        (["--data-dir", tmp_path / "empty", "--out", out], ["empty"]),
        (["--out", tmp_path / "a_file"], ["--out", "a_file", "is a file"]),
        (["--out", theirs], ["theirs", "bench.json"]),
        (["--out", notes], ["notes", "bench.md"]),
        (["--out", out, "--decode-tokens", "100"], ["--decode-tokens 100", "sequence_len=64"]),
        (["--out", out, "--speculative-plan", "diagn:n2:K1"], ["--speculative-plan", "diagn"]),
        (["--out", out, "--size", "0.5b"], ["--size 0.5b", "--preset"]),
    ]
    for extra, names in cases:
        result = run_main(bench_cli.main, [*base, *extra], capsys)
        assert_one_line(result, "snlp-bench", *names)
        assert "full forward" not in result[2] and "decode batch" not in result[2]  # nothing was timed
    for folder, files in before.items():
        assert snapshot(folder) == files, folder
    assert not out.exists()
