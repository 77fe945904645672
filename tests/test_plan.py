"""The plan notation: parsing, canonical form, validation against a model, one-line errors."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from snlp_lightning import PlanError, SolverPlan, make_config, snlp_forward

L32 = make_config("plain", n_layer=32, n_embd=64, n_head=2, n_kv_head=2)
MHC = make_config("mhc", n_layer=32, n_embd=64, n_head=2, n_kv_head=2)


@pytest.mark.parametrize(
    "text, fields",
    [
        ("idn:n24:4xF6:K2:h0", dict(method="idn", n_par=24, chunks=4, fuse=6, iters=2, init="h0")),
        ("hcn:n16:K1", dict(method="hcn", n_par=16, chunks=16, fuse=1, iters=1, init="h0")),
        ("diagn:n8:K2:batch_fwd", dict(method="diagn", n_par=8, chunks=8, iters=2, init="batch_fwd")),
        ("damped:n8:K3:kappa=0.3", dict(method="damped", kappa=0.3, iters=3)),
        ("jacobi:n4:K4", dict(method="fixed", n_par=4)),
        ("diagn:n8:K1:probes=4:est=vjp:eps=0.001", dict(probes=4, estimator="vjp", eps=0.001)),
        ("idn:n12:2xF6:K1:avg", dict(average_branches=True, chunks=2, fuse=6)),
        ("idn:n24:F6:K2", dict(n_par=24, chunks=4, fuse=6)),
        ("seq", dict(method="seq", n_par=0)),
        ("seq:n24:4xF6", dict(method="seq", n_par=24, chunks=4, fuse=6)),
    ],
)
def test_parse(text, fields):
    plan = SolverPlan.parse(text)
    for key, value in fields.items():
        assert getattr(plan, key) == value, key
    assert SolverPlan.parse(str(plan)) == plan  # the canonical form reads back to the same plan


def test_canonical_form():
    assert str(SolverPlan.parse("idn:n24:4xF6:K2")) == "idn:n24:4xF6:K2:h0"
    assert str(SolverPlan.parse("hcn:n16:16xF1:K1")) == "hcn:n16:K1:h0"


def test_describe():
    text = SolverPlan.parse("idn:n24:4xF6:K2").describe(32)
    assert text == "8 sequential blocks, then 4 chunk(s) of 6 fused block(s), 2 idn iteration(s) from h_init; ideal speedup 3.20x"


def test_ideal_speedup_matches_the_spec_example():
    plan = SolverPlan.parse("idn:n24:K2")
    assert plan.ideal_speedup(32) == pytest.approx(3.2)
    assert SolverPlan.parse("idn:n24:K2:batch_fwd").ideal_speedup(32) == pytest.approx(32 / 11)
    assert SolverPlan.parse("seq").ideal_speedup(32) == 1.0
    assert SolverPlan.parse("idn:n24:4xF6:K2").chunk_layers(32)[1] == [14, 15, 16, 17, 18, 19]


@pytest.mark.parametrize(
    "text, cfg, message",
    [
        ("idn:n40:K2", L32, r"N=40 parallel blocks but the model has L=32; N must be <= L"),
        ("idn:n24:5xF5:K2", L32, r"5xF5 does not split N=24; N must be a multiple of M"),
        ("idn:n24:F5:K2", L32, r"N=24 is not a multiple of M=5; N must be a multiple of M"),
        ("idn:n24:K0", L32, r"K=0; K must be >= 1"),
        ("hcn:n16:K1", L32, r"method 'hcn' needs an mHC model \(use_mhc=True\)"),
        ("newtonish:n8:K1", L32, r"unknown method 'newtonish' in plan 'newtonish:n8:K1'; allowed: seq, fixed, idn, hcn"),
        ("idn:n8", L32, r"plan 'idn:n8' lacks K \(e.g. K2\)"),
        ("idn:n8:K2:warm", L32, r"cannot read 'warm' in plan 'idn:n8:K2:warm'"),
        ("damped:n8:K2:kappa=2", L32, r"kappa=2.0 is not allowed: damping must lie in \[0, 1\]"),
        ("idn:n8:K2:K3", L32, r"gives K twice"),
        ("diagn:n8:K2:est=exact", L32, r"est='exact' is not allowed: one of fd, vjp"),
        ("", L32, r"empty plan"),
    ],
)
def test_bad_plans_raise_one_line_errors(text, cfg, message):
    with pytest.raises(PlanError, match=message) as info:
        SolverPlan.parse(text).validate(cfg)
    assert "\n" not in str(info.value)


def test_hcn_is_accepted_on_mhc_models():
    assert SolverPlan.parse("hcn:n16:4xF4:K2").validate(MHC).method == "hcn"


def test_solvers_validate_the_plan_against_the_model():
    model = tiny_model("plain")
    with pytest.raises(PlanError, match="N=7 parallel blocks but the model has L=6"):
        snlp_forward(model, torch.zeros(1, 4, dtype=torch.long), "idn:n7:K1")
