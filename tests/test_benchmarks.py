"""The regularizer-overhead benchmark runs end to end on a tiny model (no timing assertions)."""

from __future__ import annotations

import torch

from snlp_lightning.benchmarks import regularizer_overhead as bench

TINY = ["--depth", "4", "--width", "32", "--heads", "2", "--vocab", "64", "--batch", "2", "--seq", "16",
        "--steps", "2", "--warmup", "0", "--threads", "1"]


def table_rows(text: str, preset: str) -> dict[str, list[str]]:
    """config -> its cells, from the markdown table printed after the preset's header."""
    section = text.split(f"### {preset}:")[1].split("###")[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_benchmark_tables_and_one_batched_call_per_suffix_config(capsys):
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--preset", "plain", "mhc", *TINY])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert bench.suffix_sizes(4) == [1, 2, 3] and bench.suffix_sizes(8) == [2, 4, 6] and bench.suffix_sizes(32) == [8, 16, 24]
    expected = {
        "plain": ["lambda 0", "IDN [1]", "IDN [2]", "IDN [3]", "IDN [1, 2, 3]", "DiagN [1, 2, 3]"],
        "mhc": ["lambda 0", "HCN [1]", "HCN [2]", "HCN [3]", "HCN [1, 2, 3]"],
    }
    for preset, names in expected.items():
        rows = table_rows(out, preset)
        assert list(rows) == names
        for cells in rows.values():
            assert float(cells[0]) > 0 and float(cells[1]) > 0  # median and min ms/step
            assert "expected" not in cells[3]
        variants = {v.name: v for v in results[preset]}
        assert all(len(v.times) == 2 for v in variants.values())
        assert variants["lambda 0"].calls == []
        kind = "IDN" if preset == "plain" else "HCN"
        for n in (1, 2, 3):  # one batched call per suffix config, all N blocks in it
            assert variants[f"{kind} [{n}]"].calls == [n]
        assert variants[f"{kind} [1, 2, 3]"].calls == [1, 2, 3]
    assert results["plain"][-1].calls == [1, 1, 2, 2, 3, 3]  # DiagN: F(x) and F(x + eps z) per config
