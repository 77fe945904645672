"""Running the real CLI in tests: the tiny model's flags and a subprocess wrapper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = [
    "--model.config.n_layer", "4", "--model.config.n_embd", "64", "--model.config.n_head", "2",
    "--model.config.n_kv_head", "2", "--model.config.sequence_len", "64", "--model.config.vocab_size", "512",
    "--model.regularizer.n_par_configs", "[2, 3]", "--model.eval_plans", "[idn:n2:K1, idn:n3:K2, idn:n4:2xF2:K1]",
    "--data.seq_len", "64", "--data.batch_size", "8",
]


# Tiny models run fastest on one intra-op thread (see conftest.py); the runs compared bit for bit
# (resume) all use the same setting.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def snlp(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``snlp ARGS`` (``python -m snlp_lightning``: the one command, as the console script runs it)."""
    done = subprocess.run([sys.executable, "-m", "snlp_lightning", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=ONE_THREAD)
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def fit_args(data: Path, name: str, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--data.data_dir", str(data), *TINY_MODEL,
        "--trainer.logger.init_args.name", name, "--checkpoint.dirpath", f"runs/{name}/checkpoints",
        "--trainer.enable_progress_bar", "false", *extra,
    ]


def installed(name: str) -> str:
    """The console script ``name`` (snlp, snlp-prepare, ...) that ``pip install -e .`` put beside this interpreter."""
    path = Path(sys.executable).with_name(name)
    assert path.is_file(), f"{name} is not installed beside {sys.executable}: run pip install -e ."
    return str(path)


def run_installed(name: str, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed console script ``name`` with ``args`` (one intra-op thread)."""
    return subprocess.run([installed(name), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ONE_THREAD)
