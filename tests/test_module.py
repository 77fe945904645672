"""The LightningModule pieces that need no data pipeline: losses, optimizer groups, schedule, checkpoint IO."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, randomize, tokens
from snlp_lightning import CheckpointError, make_config
from snlp_lightning.checkpoint_io import AtomicCheckpointIO
from snlp_lightning.module import SNLPModule
from snlp_lightning.optim import MuonAdamW, OptimConfig, lr_multiplier, param_groups
from snlp_lightning.regularizer import RegularizerConfig


def module(preset="plain", **kwargs) -> SNLPModule:
    torch.manual_seed(0)
    m = SNLPModule(config=make_config(preset, **TINY), **kwargs)
    randomize(m.model)
    return m


def test_lambda_zero_gives_exactly_the_ce_loss():
    m = module(regularizer=RegularizerConfig())
    x = tokens()
    losses = m.compute_losses(x[:, :-1], x[:, 1:], torch.tensor(1.0), step=0)
    logits = m.model(x[:, :-1])
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    assert torch.equal(losses["loss"], losses["ce"]) and torch.equal(losses["ce"], ce)


def test_regularizer_enters_the_loss_with_its_weight():
    m = module("mhc", regularizer=RegularizerConfig(lambda_idn=0.5, lambda_hcn=0.25, n_par_configs=[2, 4], stride=2))
    x = tokens()
    at_zero = m.compute_losses(x[:, :-1], x[:, 1:], torch.tensor(0.0), step=0)
    assert torch.equal(at_zero["loss"], at_zero["ce"])  # the ramp starts at 0
    full = m.compute_losses(x[:, :-1], x[:, 1:], torch.tensor(1.0), step=0)
    expected = full["ce"] + 0.5 * full["reg_idn"] + 0.25 * full["reg_hcn"]
    assert (full["loss"] - expected).abs() < 1e-6 and full["reg_idn"] > 0 and full["reg_hcn"] > 0


def test_optimizer_groups_cover_every_trainable_parameter_once():
    for preset in ("plain", "nanochat", "mhc", "mhc-dynamic"):
        m = module(preset)
        groups = param_groups(m.model, OptimConfig())
        seen = [id(p) for g in groups for p in g["params"]]
        trainable = [id(p) for p in m.model.parameters() if p.requires_grad]
        assert sorted(seen) == sorted(trainable), preset
        for g in groups:
            if g["kind"] == "muon":
                assert all(p.ndim == 2 for p in g["params"])
    plain = module("plain").model
    assert not plain.resid_lambdas.requires_grad and not plain.value_embeds["5"].weight.requires_grad


def test_muon_adamw_lowers_a_loss():
    m = module("nanochat", regularizer=RegularizerConfig())
    opt = MuonAdamW(param_groups(m.model, OptimConfig()))
    x = tokens(batch=4, length=16)
    first = None
    for _ in range(15):
        loss = m.compute_losses(x[:, :-1], x[:, 1:], torch.tensor(0.0), 0)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    assert any(opt.state[p].get("momentum_buffer") is not None for p in m.model.transformer.h[0].parameters())


def test_lr_schedule():
    cfg = OptimConfig(warmup_steps=10, warmdown_ratio=0.2, final_lr_frac=0.1)
    assert lr_multiplier(0, 100, cfg) == pytest.approx(0.1)
    assert lr_multiplier(50, 100, cfg) == 1.0 and lr_multiplier(80, 100, cfg) == 1.0
    assert lr_multiplier(90, 100, cfg) == pytest.approx(0.55)
    assert lr_multiplier(100, 100, cfg) == pytest.approx(0.1)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is corrupt or truncated"):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")
