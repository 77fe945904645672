"""DDP with 2 CPU processes (gloo) matches one process on the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "ddp_losses.py"


def run_losses(tmp_path: Path, devices: int) -> dict:
    out = tmp_path / f"losses_{devices}.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--devices", str(devices), "--global-batch", "8", "--steps", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_ddp_two_processes_match_one_process(tmp_path):
    single = run_losses(tmp_path, 1)
    ddp = run_losses(tmp_path, 2)
    assert ddp["world_size"] == 2 and len(ddp["losses"]) == len(single["losses"]) == 4
    for a, b in zip(single["losses"], ddp["losses"]):
        assert abs(a - b) < 1e-4, (single["losses"], ddp["losses"])
    assert single["losses"][0] != single["losses"][-1]  # the model did train
