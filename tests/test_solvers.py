"""The SNLP solver family: exactness at K = C, non-trivial error at K = 1, closed forms, convergence."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, tokens
from snlp_lightning import SolverDivergence, SolverPlan, snlp_forward, snlp_solve

EXACT = 1e-9
METHODS = ["fixed", "idn", "damped", "diagn", "newton"]


def methods_for(preset: str) -> list[str]:
    return METHODS + (["hcn"] if preset.startswith("mhc") else [])


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("init", ["h0", "batch_fwd"])
def test_k_equals_c_reproduces_sequential(preset, init):
    model = tiny_model(preset)
    idx = tokens()
    sequential = model(idx)
    for method in methods_for(preset):
        for n_par in (4, 6):  # n6 = L: no sequential prefix at all
            plan = f"{method}:n{n_par}:K{n_par}:{init}"
            err = (snlp_forward(model, idx, plan, generator=seeded()) - sequential).abs().max()
            assert err < EXACT, (plan, float(err))


def test_diagn_vjp_estimator_is_exact_at_k_equals_c(preset):
    model = tiny_model(preset)
    idx = tokens()
    err = (snlp_forward(model, idx, "diagn:n4:K4:est=vjp:probes=2", generator=seeded()) - model(idx)).abs().max()
    assert err < EXACT


def test_fused_k_equals_c_reproduces_chunk_sequential(preset):
    model = tiny_model(preset)
    idx = tokens()
    chunk_sequential = snlp_forward(model, idx, "seq:n6:3xF2")
    assert (chunk_sequential - model(idx)).abs().max() > 1e-4  # fusion changes the model
    for method in methods_for(preset):
        plan = f"{method}:n6:3xF2:K3"
        err = (snlp_forward(model, idx, plan, generator=seeded()) - chunk_sequential).abs().max()
        assert err < EXACT, (plan, float(err))
    one_chunk = snlp_forward(model, idx, "idn:n4:1xF4:K1")
    assert (one_chunk - snlp_forward(model, idx, "seq:n4:1xF4")).abs().max() < EXACT


def test_k1_is_not_exact(preset):
    model = tiny_model(preset)
    idx = tokens()
    sequential = model(idx)
    for method in methods_for(preset):
        err = (snlp_forward(model, idx, f"{method}:n4:K1", generator=seeded()) - sequential).abs().max()
        assert err > 1e-6, method


def test_first_k_chunks_are_exact_after_k_iterations(preset):
    model = tiny_model(preset)
    idx = tokens()
    _, seq_trace = model.forward_trace(idx)
    result = snlp_solve(model, idx, "idn:n6:K6", trace=True)
    for k, iterate in enumerate(result.trace):
        for c in range(6):
            err = (iterate[c] - seq_trace[c + 1]).abs().max()
            assert (err < EXACT) == (c < k), (k, c, float(err))


def test_idn_k1_equals_closed_form(preset):
    """x_c = h_init + sum_{i <= c} (F_i(h_init) - h_init), F including the lambda blend."""
    model = tiny_model(preset)
    idx = tokens()
    inputs, _ = model.embed(idx)
    _, seq_trace = model.forward_trace(idx)
    h_init = seq_trace[2]  # S = 2
    increments = [model.block(layer, h_init, inputs)[0] - h_init for layer in range(2, 6)]
    closed = h_init + torch.cumsum(torch.stack(increments), 0)
    result = snlp_solve(model, idx, "idn:n4:K1", trace=True)
    assert (result.states - closed).abs().max() < EXACT


def test_residuals_fall_to_zero_at_k_equals_c(preset):
    model = tiny_model(preset)
    result = snlp_solve(model, tokens(), "idn:n5:K5", residuals=True, trace=True)
    assert len(result.residuals) == 6 and len(result.trace) == 6
    assert result.residuals[0] > 1.0 and result.residuals[-1] < 1e-10
    assert all(r > 1e-8 for r in result.residuals[:-1])


def test_hcn_converges_in_one_iteration_when_branches_vanish():
    """With zero branch outputs an mHC block is X -> H_res_mlp H_res_attn X: HCN's A is its exact Jacobian."""
    model = tiny_model("mhc")
    with torch.no_grad():
        for blk in model.transformer.h[2:]:  # the prefix keeps its branches, so the streams differ
            blk.attn.c_proj.weight.zero_()
            blk.mlp.c_proj.weight.zero_()
    idx = tokens()
    hcn = snlp_solve(model, idx, "hcn:n4:K1", residuals=True)
    idn = snlp_solve(model, idx, "idn:n4:K1", residuals=True)
    assert hcn.residuals[-1] < 1e-10
    assert idn.residuals[-1] > 1e-3
    assert (hcn.logits - model(idx)).abs().max() < EXACT
    # Zero branches keep every stream sum fixed, so the logits cannot tell the two apart here.


def test_hcn_and_idn_differ_from_k2_on():
    """At K = 1 (h0) the stream-summed output is the same for any doubly stochastic A; K = 2 differs."""
    model = tiny_model("mhc")
    idx = tokens()
    k1 = (snlp_forward(model, idx, "hcn:n4:K1") - snlp_forward(model, idx, "idn:n4:K1")).abs().max()
    k2 = (snlp_forward(model, idx, "hcn:n4:K2") - snlp_forward(model, idx, "idn:n4:K2")).abs().max()
    assert k1 < EXACT and k2 > 1e-6


def test_exact_newton_needs_far_fewer_iterations_than_fixed_point():
    model = tiny_model("plain", n_layer=10, sequence_len=16)
    idx = tokens()

    def iterations_to_converge(method: str) -> int:
        residuals = snlp_solve(model, idx, f"{method}:n10:K10", residuals=True).residuals
        return next(k for k, r in enumerate(residuals) if r < 1e-8)

    newton, fixed = iterations_to_converge("newton"), iterations_to_converge("fixed")
    assert fixed == 10  # a fixed-point sweep only fixes one more block per iteration
    assert newton <= 5


def test_damped_interpolates_between_fixed_point_and_idn():
    model = tiny_model("plain")
    idx = tokens()
    for kappa, twin in ((0.0, "idn:n4:K2"), (1.0, "fixed:n4:K2")):
        damped = snlp_forward(model, idx, f"damped:n4:K2:kappa={kappa}")
        assert (damped - snlp_forward(model, idx, twin)).abs().max() < EXACT
    middle = snlp_forward(model, idx, "damped:n4:K2:kappa=0.5")
    assert (middle - snlp_forward(model, idx, "idn:n4:K2")).abs().max() > 1e-6


def test_diagn_probes_follow_the_generator():
    model = tiny_model("plain")
    idx = tokens()
    a = snlp_forward(model, idx, "diagn:n4:K2", generator=torch.Generator().manual_seed(1))
    b = snlp_forward(model, idx, "diagn:n4:K2", generator=torch.Generator().manual_seed(1))
    c = snlp_forward(model, idx, "diagn:n4:K2", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and (a - c).abs().max() > 0


def test_solver_gradients_flow_to_the_parallel_blocks():
    model = tiny_model("nanochat", dtype=torch.float32)
    loss = snlp_forward(model, tokens(), "idn:n4:2xF2:K1").logsumexp(-1).mean()
    loss.backward()
    for layer in range(6):
        assert model.transformer.h[layer].mlp.c_fc.weight.grad.abs().sum() > 0


def test_divergence_is_a_clear_error():
    model = tiny_model("plain")
    with torch.no_grad():
        model.transformer.h[4].mlp.c_fc.weight.fill_(float("nan"))
    with pytest.raises(SolverDivergence, match=r"plan 'idn:n4:K2:h0' diverged: NaN/inf in the iterate after iteration 1"):
        snlp_forward(model, tokens(), SolverPlan.parse("idn:n4:K2"))


def test_float32_k_equals_c_is_exact_to_float_precision():
    model = tiny_model("mhc", dtype=torch.float32)
    idx = tokens()
    assert (snlp_forward(model, idx, "hcn:n6:K6") - model(idx)).abs().max() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_cuda_bf16_solvers_track_the_sequential_model(preset):
    model = tiny_model(preset, dtype=torch.float32).cuda()
    idx = tokens().cuda()
    exact = snlp_forward(model, idx, "idn:n6:K6")
    assert (exact - model(idx)).abs().max() < 1e-4
    model = model.to(torch.bfloat16)
    reference = model(idx)
    for plan in ("idn:n6:K6", "diagn:n4:K4", "idn:n6:3xF2:K3"):
        out = snlp_forward(model, idx, plan, generator=seeded())
        assert out.dtype == torch.float32 and out.device.type == "cuda"
        if plan == "idn:n6:K6":
            assert (out - reference).abs().max() < 0.1
