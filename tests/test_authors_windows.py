"""The 'aw' switch (authors' windows): full causal windows in the parallel part only.

The reference is tests/reference.py's naive forward on a copy of the model whose config gives the
last N layers long windows ("L") and keeps the prefix's: written from the spec, not from the
executor's window override.
"""

from __future__ import annotations

import copy

import pytest
import torch

import reference
from conftest import tiny_model, tokens
from snlp_lightning.solvers import snlp_forward
from snlp_lightning.solvers.plan import PlanError, SolverPlan

# L = 6 with pattern SSSL tiles to S S S L S L (the last layer is always long); short window 8 << T.
WINDOWED = dict(sequence_len=256, window_pattern="SSSL", short_window=8)
T = 40
N = 4  # the last 4 layers are parallel, S = 2 prefix layers keep their short windows


def full_window_reference(model, idx, n_par: int):
    """The sequential model whose last ``n_par`` layers attend with full causal windows."""
    cfg = model.config
    pattern = (cfg.window_pattern.upper() * cfg.n_layer)[: cfg.n_layer - n_par] + "L" * n_par
    twin = copy.deepcopy(model)
    twin.config = cfg.replace(window_pattern=pattern)
    sizes = twin.config.window_sizes()
    assert sizes[: cfg.n_layer - n_par] == cfg.window_sizes()[: cfg.n_layer - n_par]
    assert all(w >= idx.size(1) for w in sizes[cfg.n_layer - n_par :])
    return reference.forward(twin, idx)


@pytest.mark.parametrize("preset", ["plain", "nanochat", "mhc"])
def test_exact_plan_with_authors_windows_is_the_full_window_model(preset):
    model = tiny_model(preset, **WINDOWED)
    assert min(model.config.window_sizes()) < T  # the windows really cut the context
    idx = tokens(2, T)
    with torch.no_grad():
        on = snlp_forward(model, idx, f"idn:n{N}:K{N}:aw")
        off = snlp_forward(model, idx, f"idn:n{N}:K{N}")
        want_on = full_window_reference(model, idx, N)
        want_off = reference.forward(model, idx)
    torch.testing.assert_close(on, want_on, rtol=0, atol=1e-10)
    torch.testing.assert_close(off, want_off, rtol=0, atol=1e-10)
    torch.testing.assert_close(off, model(idx), rtol=0, atol=1e-10)
    assert (on - off).abs().max() > 1e-4  # the switch changes something, so the test can fail


def test_authors_windows_reach_every_parallel_call():
    """batch_fwd, the iterations and a fused seq plan all see full windows: at K = C with M = 1 the
    batch_fwd plan and the chunk-sequential seq plan equal the same reference."""
    model = tiny_model("plain", **WINDOWED)
    idx = tokens(1, T, seed=1)
    with torch.no_grad():
        want = full_window_reference(model, idx, N)
        for plan in (f"idn:n{N}:K{N}:batch_fwd:aw", f"seq:n{N}:{N}xF1:aw", f"damped:n{N}:K{N}:kappa=0.3:aw"):
            torch.testing.assert_close(snlp_forward(model, idx, plan), want, rtol=0, atol=1e-10, msg=plan)


def test_no_short_windows_no_change():
    model = tiny_model("plain", sequence_len=64, window_pattern="L")
    idx = tokens(1, 24)
    with torch.no_grad():
        assert torch.equal(snlp_forward(model, idx, "idn:n4:K2:aw"), snlp_forward(model, idx, "idn:n4:K2"))


def test_notation():
    plan = SolverPlan.parse("idn:n8:2xF4:K2:aw")
    assert plan.authors_windows and str(plan) == "idn:n8:2xF4:K2:h0:aw"
    assert SolverPlan.parse(str(plan)) == plan
    assert not SolverPlan.parse("idn:n8:K2").authors_windows
    assert str(SolverPlan.parse("seq:n4:2xF2:aw")) == "seq:n4:2xF2:aw"
    assert SolverPlan.parse("seq:n4:2xF2:aw").authors_windows
    assert "aw" in SolverPlan.parse("idn:n8:K2:aw").describe(12)
    for bad in ("seq:aw", "idn:n8:K2:aw:aw"):
        with pytest.raises(PlanError) as info:
            SolverPlan.parse(bad)
        assert "\n" not in str(info.value)


def test_decoder_refuses_authors_windows():
    from export.decoder import DecoderError, LayerParallelDecoder

    model = tiny_model("plain", **WINDOWED)
    with pytest.raises(DecoderError, match="authors_windows"):
        LayerParallelDecoder(model, "idn:n4:K2:aw", max_seq_len=64)
