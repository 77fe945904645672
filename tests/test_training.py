"""Training through the real CLI on the real bundled corpus: fit / validate, errors, learning.

Exact resume (after a writer killed mid-checkpoint) is in tests/test_faults.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from snlp_lightning.checkpoint_io import AtomicCheckpointIO

from cli_helpers import ROOT, TINY_MODEL, fit_args, snlp


def test_fit_then_validate_end_to_end(bundled_data, tmp_path):
    snlp(*fit_args(bundled_data, "e2e", "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
                   "--trainer.limit_val_batches", "2", "--checkpoint.every_n_train_steps", "3"), cwd=tmp_path)
    events = list((tmp_path / "runs" / "e2e").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    ckpt = tmp_path / "runs" / "e2e" / "checkpoints" / "last.ckpt"
    state = AtomicCheckpointIO().load_checkpoint(ckpt)
    assert state["global_step"] == 6 and state["hyper_parameters"]["config"]["n_layer"] == 4
    done = snlp("validate", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--data.data_dir", str(bundled_data),
                *TINY_MODEL, "--ckpt_path", str(ckpt), "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
                cwd=tmp_path)
    out = done.stdout + done.stderr
    assert "| plan | PPL | vs seq | top-1 agree | logit cosine | ideal speedup |" in out
    for plan in ("| seq |", "| idn:n2:K1:h0 |", "| idn:n3:K2:h0 |", "| idn:n4:2xF2:K1:h0 |"):
        assert plan in out


def test_bad_inputs_are_one_line_errors(bundled_data, tmp_path):
    missing = snlp(*fit_args(tmp_path / "nowhere", "bad"), cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "snlp: error: data_dir" in missing.stderr and "snlp-prepare" in missing.stderr
    small_vocab = snlp(*fit_args(bundled_data, "bad", "--model.config.vocab_size", "300"), cwd=tmp_path, check=False)
    assert small_vocab.returncode == 2
    assert "snlp: error: model vocab_size=300 is smaller than the data's tokenizer vocabulary (512)" in small_vocab.stderr
    bad_plan = snlp(*fit_args(bundled_data, "bad", "--model.eval_plans", "[idn:n9:K1]"), cwd=tmp_path, check=False)
    assert bad_plan.returncode == 2 and "N=9 parallel blocks but the model has L=4" in bad_plan.stderr
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    bad_ckpt = snlp("validate", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--data.data_dir", str(bundled_data),
                    *TINY_MODEL, "--ckpt_path", str(corrupt), cwd=tmp_path, check=False)
    assert bad_ckpt.returncode == 2 and f"snlp: error: checkpoint {corrupt} is corrupt or truncated" in bad_ckpt.stderr


def test_a_few_hundred_steps_beat_the_unigram_model(bundled_data, tmp_path):
    snlp(*fit_args(bundled_data, "learn", "--trainer.max_steps", "250", "--trainer.val_check_interval", "250",
                   "--trainer.limit_val_batches", "8", "--model.config.n_layer", "2", "--model.regularizer.n_par_configs", "[1, 2]",
                   "--model.eval_plans", "[]", "--checkpoint.every_n_train_steps", "250"), cwd=tmp_path)
    metrics = _scalars(tmp_path / "runs" / "learn")
    val_ppl = metrics["val/ppl"][-1]
    assert val_ppl < 0.6 * unigram_ppl(bundled_data), (val_ppl, unigram_ppl(bundled_data))


def _scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next(run_dir.rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def unigram_ppl(data: Path) -> float:
    """PPL on val of the unigram distribution counted on train (add-one smoothed)."""
    from litdata import StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]

    def counts(split: str) -> torch.Tensor:
        ds = StreamingDataset(str(data / split), item_loader=TokensLoader(block_size=1024))
        tokens = torch.cat([ds[i].long() for i in range(len(ds))])
        return torch.bincount(tokens, minlength=vocab).double()

    train, val = counts("train"), counts("val")
    probs = (train + 1) / (train + 1).sum()
    return math.exp(float(-(val * probs.log()).sum() / val.sum()))
