"""Multi-token prediction heads (the authors' MTP variants): logits, loss, import and export.

References are written from the authors' description (head k: norm(proj_k(hidden)) through the
shared lm_head, predicting the token k + 1 positions ahead, CE weighted by mtp_loss_weight), on
the spec-written reference model of tests/reference.py, in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import reference as ref
from conftest import tiny_model, tokens
from snlp_lightning import ConfigError, ModelConfig, load_nanochat
from snlp_lightning.models.nanochat_io import export_nanochat
from snlp_lightning.module import SNLPModule
from snlp_lightning.regularizer import RegularizerConfig

import pytest


def reference_hidden(model, idx):
    """Pre-norm hidden state (B, T, D) of the reference forward: last state minus backout."""
    cfg = model.config
    x0 = ref.embed(model, idx)
    h, mid = x0, None
    for layer in range(cfg.n_layer):
        h = ref.block(model, layer, h, x0, idx)
        if layer == cfg.n_layer // 2:
            mid = h
    x = h.sum(-2)
    return x - model.backout_lambda * mid.sum(-2) if cfg.backout else x


def reference_logits(model, x):
    logits = (ref.rms(x) @ model.lm_head.weight.T)[..., : model.config.vocab_size]
    return 15 * torch.tanh(logits / 15)


@pytest.mark.parametrize("preset", ["plain", "nanochat", "mhc"])
def test_mtp_logits_and_loss_equal_a_direct_computation(preset):
    model = tiny_model(preset, num_mtp_steps=2, mtp_loss_weight=0.3)
    with torch.no_grad():
        for proj in model.mtp_projs:
            proj.weight.normal_(0, 0.3)
    idx = tokens(batch=2, length=10)
    inputs, targets = idx[:, :-1], idx[:, 1:]
    with torch.no_grad():
        hidden = reference_hidden(model, inputs)
        expected_ce = F.cross_entropy(reference_logits(model, hidden).flatten(0, 1), targets.flatten())
        expected_mtp = []
        for k, proj in enumerate(model.mtp_projs, start=1):
            logits = reference_logits(model, hidden[:, :-k] @ proj.weight.T)
            expected_mtp.append(F.cross_entropy(logits.flatten(0, 1), targets[:, k:].flatten()))
        # the model's own pieces
        _, trace = model.forward_trace(inputs)
        ours_hidden = model.hidden(trace[-1], trace[model.backout_layer + 1])
        assert (ours_hidden - hidden).abs().max() < 1e-12
        for k, logits in enumerate(model.mtp_logits(ours_hidden), start=1):
            assert logits.shape == (2, inputs.size(1) - k, model.config.vocab_size)
        module = SNLPModule(model.config, regularizer=RegularizerConfig())
        module.model = model
        out = module.compute_losses(inputs, targets, torch.ones((), dtype=torch.float64), 0)
    assert abs(float(out["ce"]) - float(expected_ce)) < 1e-12
    for k, value in enumerate(expected_mtp, start=1):
        assert abs(float(out[f"mtp_{k}"]) - float(value)) < 1e-12
    total = expected_ce + 0.3 * sum(expected_mtp)
    assert abs(float(out["loss"]) - float(total)) < 1e-12


def test_mtp_heads_get_gradients_and_leave_the_logits_alone():
    plain = tiny_model("plain")
    mtp = tiny_model("plain", num_mtp_steps=1)
    state = {k: v for k, v in mtp.state_dict().items() if not k.startswith("mtp_projs.")}
    assert set(state) == set(plain.state_dict())  # the heads are the only new parameters
    plain.load_state_dict(state)
    idx = tokens()
    assert torch.equal(plain(idx), mtp(idx))  # inference never reads them
    module = SNLPModule(mtp.config)
    module.model = mtp
    out = module.compute_losses(idx[:, :-1], idx[:, 1:], torch.ones((), dtype=torch.float64), 0)
    out["loss"].backward()
    assert mtp.mtp_projs[0].weight.grad is not None and mtp.mtp_projs[0].weight.grad.abs().sum() > 0


def test_mtp_round_trips_through_nanochat_checkpoints():
    model = tiny_model("nanochat", num_mtp_steps=2, mtp_loss_weight=0.5)
    state, config = export_nanochat(model)
    assert {k for k in state if k.startswith("mtp_projs.")} == {"mtp_projs.0.weight", "mtp_projs.1.weight"}
    assert config["num_mtp_steps"] == 2 and config["mtp_loss_weight"] == 0.5
    loaded = load_nanochat(state, config).double()
    for a, b in zip(loaded.mtp_projs, model.mtp_projs):
        assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("field, value", [("num_mtp_steps", -1), ("num_mtp_steps", 1.5), ("mtp_loss_weight", -0.1),
                                          ("mtp_loss_weight", float("nan"))])
def test_bad_mtp_settings_are_one_line_errors(field, value):
    with pytest.raises(ConfigError, match=f"^{field}=.* is not allowed") as err:
        ModelConfig(**{field: value})
    assert "\n" not in str(err.value)
