"""``snlp gpu-check``: its CPU dry run end to end (so the command never rots), and its argument errors."""

from __future__ import annotations

import json

import pytest

from export import gpu_check


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    code = gpu_check.main(["--dry-run", "--out", str(out), "--budget", "300"])
    return out, code, json.loads((out / "checks.json").read_text())


def test_dry_run_records_every_stage_and_fails_none(dry_run):
    out, code, data = dry_run
    assert code == 0, (out / "summary.md").read_text()
    for name in gpu_check.OUT_FILES:
        assert (out / name).is_file(), name
    stages = {s["stage"]: s for s in data["stages"]}
    assert list(stages) == list(gpu_check.STAGES)
    for name, stage in stages.items():
        assert stage["status"] in ("ok", "skipped"), (name, stage)
        if stage["status"] == "skipped":
            assert stage["reason"], name
    # Every stage that can run on a CPU did; the package build is skipped there, and says why.
    assert {n for n, s in stages.items() if s["status"] == "ok"} >= {"report", "cuda_tests", "exactness", "full_forward", "decode", "training"}
    assert "AOTInductor" in stages["package"]["reason"]
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} |" in summary for name in gpu_check.STAGES)
    tables = (out / "tables.md").read_text()
    assert "Full forward" in tables and "Decode" in tables and "Attention kernels" in tables


def test_dry_run_exactness_compares_numbers(dry_run):
    _, _, data = dry_run
    checks = {c["name"]: c for c in data["checks"] if c["stage"] == "exactness"}
    f64 = next(c for n, c in checks.items() if n.startswith("K = C") and n.endswith("float64") and "logits" in n)
    assert f64["ok"] is True and f64["max_abs_diff"] < 1e-10 and f64["logit_scale"] > 0.1  # a real comparison of real logits
    f32 = next(c for n, c in checks.items() if n.startswith("K = C") and n.endswith("float32") and "logits" in n)
    assert f32["ok"] is True and f32["max_abs_diff"] < 1e-3
    bf16 = next(c for n, c in checks.items() if n.startswith("bf16 K = C") and "agreement" in n)
    assert bf16["ok"] is True and 0.0 < bf16["top1_agree"] <= 1.0 and bf16["max_abs_diff"] > 0  # judged by agreement, not identity
    assert any(n.startswith("compiled decode vs eager") and c["ok"] for n, c in checks.items())
    assert any(n.startswith("self-speculative") and c["ok"] for n, c in checks.items())
    assert not [c for c in data["checks"] if c["ok"] is False]
    training = next(c for c in data["checks"] if c["stage"] == "training" and c["name"].startswith("attention kernels"))
    assert training["kernels"] and "scaled_dot_product" in training["kernels"][0]


def test_a_stage_that_does_not_fit_is_skipped_with_the_reason(tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--budget", "15", "--stages", "report", "full_forward"]) == 0
    stages = {s["stage"]: s for s in json.loads((out / "checks.json").read_text())["stages"]}
    assert stages["report"]["status"] == "ok"
    assert stages["full_forward"]["status"] == "skipped" and "does not fit" in stages["full_forward"]["reason"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget", "0"], "argument --budget: 0.0 is not allowed: must be >= 1.0"),
        (["--stages", "bogus"], "argument --stages: invalid choice: 'bogus'"),
        (["--out", "FILE"], "is a file, not a folder"),
        (["--out", "FOREIGN"], "holds a checks.json that snlp gpu-check did not write"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "checks.json").write_text("{}")
    argv = [{"FILE": str(tmp_path / "file"), "FOREIGN": str(tmp_path / "foreign")}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(argv + ["--dry-run"] + ([] if "--out" in argv else ["--out", str(tmp_path / "o")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("snlp gpu-check: error: ") and message in err[0], err
