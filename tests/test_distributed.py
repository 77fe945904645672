"""DDP and FSDP with 2 CPU processes (gloo) match one process on the same global batch.

FSDP is ``BlockFSDPStrategy`` (torch FSDP1 through Lightning's FSDPStrategy, one unit per Block):
its losses, its validation table (stacked solver plans on the gathered weights), its checkpoint
(one full file that a single process loads) and its resume from a single-process checkpoint.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from snlp_lightning.checkpoint_io import AtomicCheckpointIO
from snlp_lightning.solvers import snlp_forward

SCRIPTS = Path(__file__).parent / "scripts"
SCRIPT = SCRIPTS / "ddp_losses.py"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SCRIPTS))
from ddp_losses import EVAL_PLANS, SEQ, VOCAB, FixedTokens, tiny_module  # noqa: E402


def run_script(out: Path, devices: int, *extra: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--devices", str(devices), "--global-batch", "8", *extra],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[dict, Path]:
    """4 steps on one process, with its final checkpoint."""
    folder = tmp_path_factory.mktemp("single")
    return run_script(folder / "losses.json", 1, "--ckpt", str(folder / "final.ckpt")), folder / "final.ckpt"


def assert_close_losses(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) and all(abs(x - y) < 1e-4 for x, y in zip(a, b)), (a, b)


def assert_close_tables(a: list[dict], b: list[dict], top1_tol: float) -> None:
    assert [r["plan"] for r in a] == [r["plan"] for r in b] == ["seq", *(f"{p}:h0" for p in EVAL_PLANS)]
    for x, y in zip(a, b):
        assert abs(math.log(x["ppl"]) - math.log(y["ppl"])) < 1e-4, (a, b)  # mean CE within 1e-4
        assert abs(x["cosine"] - y["cosine"]) < 1e-4 and abs(x["top1"] - y["top1"]) <= top1_tol, (a, b)


def test_ddp_two_processes_match_one_process(tmp_path):
    """With the default optimizer (Muon for the block matrices, AdamW for the rest)."""
    single = run_script(tmp_path / "single.json", 1, "--optimizer", "muon_adamw")
    ddp = run_script(tmp_path / "ddp.json", 2, "--strategy", "ddp", "--optimizer", "muon_adamw")
    assert ddp["world_size"] == 2
    assert_close_losses(single["losses"], ddp["losses"])
    assert_close_tables(single["table"], ddp["table"], top1_tol=4 / (16 * SEQ))
    assert single["losses"][0] - single["losses"][-1] > 1.0  # the model did train


def validation_table(module, plans: list[str]) -> dict[str, float]:
    """Mean CE per plan of ``module`` on the script's validation rows, on this single process."""
    data = FixedTokens(16, SEQ, VOCAB, seed=1)
    inputs, targets = data.data[:, :-1], data.data[:, 1:]
    with torch.no_grad():
        runs = {"seq": module.model(inputs), **{p: snlp_forward(module.model, inputs, p) for p in plans}}
    return {p: float(F.cross_entropy(logits.flatten(0, 1), targets.flatten())) for p, logits in runs.items()}


def test_fsdp_two_processes_match_one_process_and_save_a_plain_checkpoint(tmp_path, single):
    fsdp = run_script(tmp_path / "fsdp.json", 2, "--strategy", "fsdp", "--ckpt", str(tmp_path / "fsdp.ckpt"))
    assert fsdp["world_size"] == 2 and fsdp["tokens"] == 16 * SEQ
    assert_close_losses(single[0]["losses"], fsdp["losses"])
    # validation under FSDP (plans on the gathered weights) == validation on one process
    assert_close_tables(single[0]["table"], fsdp["table"], top1_tol=4 / (16 * SEQ))
    assert fsdp["table"][2]["top1"] < 0.99  # the fused plan really differs from the sequential model

    # the FSDP checkpoint is one ordinary file: a plain single-process module loads it strictly
    ckpt = AtomicCheckpointIO().load_checkpoint(tmp_path / "fsdp.ckpt")
    reference = AtomicCheckpointIO().load_checkpoint(single[1])
    assert ckpt["global_step"] == 4 and ckpt["hyper_parameters"] == reference["hyper_parameters"]
    module = tiny_module()
    module.load_state_dict(ckpt["state_dict"])
    # it holds exactly the weights the FSDP run validated: same table, computed on one process
    ce = validation_table(module, EVAL_PLANS)
    for row in fsdp["table"]:
        assert abs(ce[row["plan"].removesuffix(":h0")] - math.log(row["ppl"])) < 1e-5, (ce, fsdp["table"])
    # the optimizer state is keyed and shaped like the single-process one: each AdamW moment lies within
    # 5% of its largest entry (plus 0.1% of the largest over all parameters, for moments near 0) of the
    # single-process one; any other parameter's moment would be far off
    states, ref_states = ckpt["optimizer_states"][0], reference["optimizer_states"][0]
    assert [g["params"] for g in states["param_groups"]] == [g["params"] for g in ref_states["param_groups"]]
    for key in ("exp_avg", "exp_avg_sq"):
        scale = max(float(ref[key].abs().max()) for ref in ref_states["state"].values())
        for i, ref in ref_states["state"].items():
            assert states["state"][i][key].shape == ref[key].shape
            assert (states["state"][i][key] - ref[key]).abs().max() <= 0.05 * ref[key].abs().max() + 1e-3 * scale, (i, key)


def test_fsdp_resumes_a_single_process_checkpoint(tmp_path, single):
    """2 steps on one process, then 2 more under FSDP == 4 steps on one process (optimizer state included)."""
    run_script(tmp_path / "leg.json", 1, "--steps", "2", "--ckpt", str(tmp_path / "leg.ckpt"))
    resumed = run_script(tmp_path / "resumed.json", 2, "--strategy", "fsdp", "--resume", str(tmp_path / "leg.ckpt"))
    assert_close_losses(single[0]["losses"][2:], resumed["losses"])
    assert_close_tables(single[0]["table"], resumed["table"], top1_tol=4 / (16 * SEQ))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snlp_lightning.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_cli_fsdp_fit_then_validate_on_one_process(bundled_data, tmp_path):
    model = [
        "--model.config.n_layer", "4", "--model.config.n_embd", "64", "--model.config.n_head", "2",
        "--model.config.n_kv_head", "2", "--model.config.sequence_len", "64", "--model.config.vocab_size", "512",
        "--model.regularizer.n_par_configs", "[2, 3]", "--model.eval_plans", "[idn:n2:K1, idn:n4:2xF2:K1]",
        "--data.data_dir", str(bundled_data), "--data.seq_len", "64", "--data.batch_size", "4",
        "--trainer.enable_progress_bar", "false",
    ]
    fsdp = ["--trainer.strategy", "fsdp", "--trainer.devices", "2"]
    fit = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), *model, *fsdp, "--trainer.max_steps", "2",
           "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--checkpoint.every_n_train_steps", "2",
           "--trainer.logger.init_args.name", "fsdp", "--checkpoint.dirpath", "runs/fsdp/checkpoints"]
    muon = cli(*fit, cwd=tmp_path)  # the quickstart's optimizer is muon_adamw: refused before a 2nd process starts
    assert muon.returncode == 2 and muon.stderr.count("snlp: error: optim.optimizer='muon_adamw' does not work under FSDP") == 1
    done = cli(*fit, "--model.optim.optimizer", "adamw", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Starting with 2 processes" in done.stdout + done.stderr
    ckpt = tmp_path / "runs" / "fsdp" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and AtomicCheckpointIO().load_checkpoint(ckpt)["global_step"] == 2
    validate = cli("validate", "--config", str(ROOT / "configs" / "quickstart.yaml"), *model, "--ckpt_path", str(ckpt),
                   "--trainer.limit_val_batches", "2", cwd=tmp_path)
    assert validate.returncode == 0, validate.stderr[-4000:]
    out = validate.stdout + validate.stderr
    assert "Starting with 2 processes" not in out
    for row in ("| seq |", "| idn:n2:K1:h0 |", "| idn:n4:2xF2:K1:h0 |"):
        assert row in out
