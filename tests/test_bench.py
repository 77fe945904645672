"""snlp-bench end to end on a trained tiny model: every section, the files, the plan search.
No timing is asserted (speed targets live in docs/benchmarks.md, measured by this command)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_writes_tables_plot_and_a_plan_choice(trained_checkpoint, bundled_data, tmp_path):
    out = tmp_path / "bench"
    args = [
        "--checkpoint", str(trained_checkpoint), "--data-dir", str(bundled_data), "--plans", "idn:n2:K1", "diagn:n2:K1",
        "--sweep", "--sweep-fuse", "1", "2", "--sweep-iters", "1", "--lengths", "32", "--warmup", "1", "--iters", "2",
        "--decode-batches", "2", "--decode-tokens", "6", "--prompt-len", "4", "--draft-len", "2", "--repeats", "1",
        "--val-tokens", "1024", "--budget", "0.5", "--out", str(out),
    ]
    done = subprocess.run([sys.executable, "-m", "export.bench", *args], capture_output=True, text=True, timeout=1200,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = (out / "bench.md").read_text()
    results = json.loads((out / "bench.json").read_text())
    assert (out / "speedup_vs_ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    full = {r["plan"] for r in results["full"]}
    # sweep grid of a 4-layer model: N in {1, 2, 3} unfused, N = 2 fused 1xF2, all K = 1
    assert {"seq", "seq (eager)", "idn:n2:K1:h0", "idn:n1:K1:h0", "idn:n3:K1:h0", "idn:n2:1xF2:K1:h0"} <= full
    assert all(r["ms"] > 0 and r["ideal"] >= 1.0 for r in results["full"])
    modes = [r["mode"] for r in results["decode"]]
    assert modes == ["seq (eager)", "seq (compiled)", "idn:n2:K1:h0 (compiled)", "self-speculative (compiled)"]
    assert "identical to seq greedy" in results["decode"][-1]["note"]
    assert set(results["quality"]) >= {"seq", "idn:n2:K1:h0", "diagn:n2:K1:h0:probes=1:eps=0.01:est=fd"}
    assert "Not timed" in report and "diagn" in report.split("Not timed")[1]
    best = results["sweep"]["best"]
    assert best is not None and best[2] <= results["sweep"]["seq_ppl"] * 1.5
    assert f"Fastest within +50% PPL: `{best[0]}`" in report


def test_bench_bad_plan_is_one_line(trained_checkpoint, tmp_path):
    done = subprocess.run([sys.executable, "-m", "export.bench", "--checkpoint", str(trained_checkpoint), "--plans", "idn:n7:K1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and done.stderr.startswith("snlp-bench: error:") and "n7" in done.stderr
