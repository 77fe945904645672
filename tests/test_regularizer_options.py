"""The authors' regularizer options: the DiagN VJP estimator and diag_stride, the Jacobi
(contractive) regularizer, spectral normalisation; each against a computation written here from
the authors' formulas on the spec-written reference blocks (tests/reference.py), and the defaults
against the code as it was before the options (bitwise)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import reference
from conftest import TINY, randomize, tiny_model, tokens
from snlp_lightning import ConfigError, make_config
from snlp_lightning.models import build
from snlp_lightning.module import SNLPModule
from snlp_lightning.optim import MuonAdamW, OptimConfig, param_groups
from snlp_lightning.regularizer import (
    DIAG_EPS,
    JACOBI_SEED_OFFSET,
    RegularizerConfig,
    _suffix_outputs,
    _vjp_diagonals,
    apply_spectral_norm,
    diag_probes,
    fold_spectral_norm,
    hcn_term,
    idn_term,
    jacobi_vectors,
    relative_error,
    snlp_regularizer,
)
from snlp_lightning.solvers.surrogates import linear_scan


# -- hand computations on the reference blocks ------------------------------------------------------
def ref_trace(model, idx):
    """x0 and [h_0 .. h_L] from the reference blocks."""
    x0 = reference.embed(model, idx)
    trace = [x0]
    for layer in range(model.config.n_layer):
        trace.append(reference.block(model, layer, trace[-1], x0, idx))
    return x0, trace


def raw_block(model, layer, x, idx):
    """The block without its lambda blend, on an already blended input x (the authors' ``block(x)``)."""
    cfg, blk = model.config, model.transformer.h[layer]
    hc_attn = blk.hc_attn if cfg.use_mhc else None
    hc_mlp = blk.hc_mlp if cfg.use_mhc else None
    x = reference.sublayer(model, hc_attn, lambda xn: reference.attention(model, layer, xn, idx), x)
    return reference.sublayer(model, hc_mlp, lambda xn: reference.mlp(model, layer, xn), x)


def blend_by_hand(model, layer, h, x0):
    if not model.config.uses_lambdas:
        return h
    return model.resid_lambdas[layer] * h + model.x0_lambdas[layer] * x0


def rel(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-6)).mean()


def direct_diag(model, idx, n_list, probes, estimator, stride):
    """DiagN K = 1 as the authors' loop: per block h_j = f_j(h_init); diag_j by FD (clamped, no grad)
    or z * vjp (detached) where j % stride == 0, else None (J ~ I); compare the last block."""
    L = model.config.n_layer
    x0, trace = ref_trace(model, idx)
    total = 0.0
    for n, z in zip(n_list, probes):
        s = L - n
        h_init = trace[s]
        z = z.to(h_init.dtype)
        outs, diags = [], []
        for j in range(n):
            f = lambda h, layer=s + j: reference.block(model, layer, h, x0, idx)  # noqa: E731
            outs.append(f(h_init))
            if j % stride != 0:
                diags.append(None)
            elif estimator == "vjp":
                _, vjp = torch.autograd.functional.vjp(f, h_init.detach(), z)
                diags.append((z * vjp).detach())
            else:
                with torch.no_grad():
                    diags.append((z * (f(h_init + 0.01 * z) - outs[-1]) / 0.01).clamp(-2, 2))
        h = outs[0]
        for j in range(1, n):
            h = outs[j] + (h - h_init if diags[j] is None else diags[j] * (h - h_init))
        total = total + rel(h, trace[L].detach())
    return total


def hand_jacobi(model, idx, vectors):
    """The authors' contractive regularizer, block by block with a Python branch on sigma.item()."""
    L = model.config.n_layer
    x0, trace = ref_trace(model, idx)
    total, sigmas = 0.0, []
    for layer in range(L):
        x_pre = blend_by_hand(model, layer, trace[layer], x0)
        x = trace[layer + 1]
        v = vectors[layer].to(x.dtype)
        with torch.no_grad():
            jv = (raw_block(model, layer, x_pre + 0.01 * v, idx) - raw_block(model, layer, x_pre, idx)) / 0.01
            sigma = jv.norm(dim=-1).mean().item()
        sigmas.append(sigma)
        if sigma > 0.9:
            total = total + min(sigma, 3.0) * ((x - x_pre).norm(dim=-1) / (x_pre.norm(dim=-1) + 1e-6)).mean()
    return total / L, sigmas


def grads(loss, model):
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]


def assert_grads_close(a, b, tol):
    for x, y in zip(a, b):
        assert (x - y).abs().max() <= tol


# -- the interface addition ---------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["nanochat", "mhc"])
def test_blend_then_blended_block_is_the_block(preset):
    model = tiny_model(preset)
    idx = tokens()
    inputs, trace = model.forward_trace(idx)
    x0 = reference.embed(model, idx)
    for layer in (0, 3):
        x = model.blend(layer, trace[layer], inputs)
        assert (x - blend_by_hand(model, layer, trace[layer], x0)).abs().max() < 1e-14
        assert torch.equal(model.block(layer, x, inputs, blended=True)[0], model.block(layer, trace[layer], inputs)[0])
        assert (model.block(layer, x, inputs, blended=True)[0] - raw_block(model, layer, x, idx)).abs().max() < 1e-12
    if preset == "nanochat":  # the blend is not the identity there
        assert (model.blend(2, trace[2], inputs) - trace[2]).abs().max() > 1e-2


# -- DiagN: the VJP estimator and diag_stride ---------------------------------------------------------
@pytest.mark.parametrize("preset", ["nanochat", "mhc-dynamic"])
def test_vjp_diagonals_are_z_times_the_vjp_of_each_block(preset):
    model = tiny_model(preset)
    idx = tokens()
    inputs, trace = model.forward_trace(idx)
    x0 = reference.embed(model, idx)
    h_init = trace[2]
    z = diag_probes(tuple(h_init.shape), 1, torch.Generator().manual_seed(3))[0].double()
    layers = [2, 3, 4, 5]
    batched = _vjp_diagonals(model, inputs, h_init, z, layers, per_block=False)
    per_block = _vjp_diagonals(model, inputs, h_init, z, layers, per_block=True)
    assert not batched.requires_grad
    for g, layer in enumerate(layers):
        _, vjp = torch.autograd.functional.vjp(lambda h: reference.block(model, layer, h, x0.detach(), idx), h_init.detach(), z)
        assert (batched[g] - z * vjp).abs().max() < 1e-12
        assert (per_block[g] - z * vjp).abs().max() < 1e-12
    # and it is not the clamped FD estimate (for one block, the diagonal differs visibly)
    with torch.no_grad():
        fd = z * (model.block(3, h_init + DIAG_EPS * z, inputs)[0] - model.block(3, h_init, inputs)[0]) / DIAG_EPS
    assert (fd - batched[1]).abs().max() > 1e-4


DIAG_CASES = [
    ("nanochat", "vjp", 1),
    ("mhc-dynamic", "vjp", 2),
    ("plain", "fd", 2),
    ("nanochat", "fd", 3),
]


@pytest.mark.parametrize("preset, estimator, stride", DIAG_CASES)
def test_diag_term_equals_the_authors_loop(preset, estimator, stride):
    model = tiny_model(preset)
    idx = tokens()
    n_list = [3, 5]
    cfg = RegularizerConfig(lambda_diag=0.5, n_par_configs=n_list, diag_estimator=estimator, diag_stride=stride)
    inputs, trace = model.forward_trace(idx)
    probes = diag_probes(tuple(trace[0].shape), len(n_list), torch.Generator().manual_seed(1))
    terms = snlp_regularizer(model, inputs, trace, cfg, probes=probes)
    assert terms["total"].item() == pytest.approx(0.5 * terms["diag"].item(), rel=1e-14)
    expected = direct_diag(model, idx, n_list, probes, estimator, stride)
    assert abs(terms["diag"].item() - expected.item()) < 1e-10
    assert_grads_close(grads(terms["diag"], model), grads(expected, model), 1e-9)
    # FSDP's per-block path gives the same value
    inputs, trace = model.forward_trace(idx)
    per_block = snlp_regularizer(model, inputs, trace, cfg, probes=probes, per_block=True)["diag"]
    assert abs(per_block.item() - terms["diag"].item()) < 1e-12
    # the option changes the number (so the comparison above can tell the options apart)
    inputs, trace = model.forward_trace(idx)
    other = dataclasses.replace(cfg, **(dict(diag_stride=1) if stride > 1 else dict(diag_estimator="fd")))
    baseline = snlp_regularizer(model, inputs, trace, other, probes=probes)["diag"]
    assert abs(baseline.item() - terms["diag"].item()) > 1e-6


# -- the Jacobi regularizer ---------------------------------------------------------------------------
@pytest.mark.parametrize("preset, scales", [("nanochat", {2: 40.0}), ("mhc", {1: 20.0, 3: 200.0})])
def test_jacobi_term_equals_the_authors_loop(preset, scales):
    model = tiny_model(preset)
    with torch.no_grad():  # blocks of large gain: the clamp min(sigma, 3) is reached
        for layer, s in scales.items():
            model.transformer.h[layer].mlp.c_proj.weight.mul_(s)
            model.transformer.h[layer].attn.c_proj.weight.mul_(s)
    idx = tokens()
    inputs, trace = model.forward_trace(idx)
    vectors = jacobi_vectors(tuple(trace[0].shape), model.config.n_layer, torch.Generator().manual_seed(5))
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(()), atol=1e-6)
    cfg = RegularizerConfig(lambda_jacobi=0.5)
    terms = snlp_regularizer(model, inputs, trace, cfg, vectors=vectors)
    expected, sigmas = hand_jacobi(model, idx, vectors)
    assert max(sigmas) > 3.0 and any(0.9 < s < 3.0 for s in sigmas)
    if preset == "mhc":
        assert min(sigmas) < 0.9  # blocks that are not penalised
    assert terms["jacobi"].item() > 1e-3
    assert abs(terms["jacobi"].item() - expected.item()) < 1e-10
    assert terms["total"].item() == pytest.approx(0.5 * terms["jacobi"].item(), rel=1e-14)
    # the gradient is the hand loss's: through the main path, sigma a constant
    assert_grads_close(grads(terms["jacobi"], model), grads(expected, model), 1e-9)


def test_module_draws_the_jacobi_vectors_from_seed_and_step():
    torch.manual_seed(0)
    m = SNLPModule(config=make_config("plain", **TINY), regularizer=RegularizerConfig(lambda_jacobi=0.5), probe_seed=7)
    randomize(m.model)
    x = tokens()
    a = m.compute_losses(x[:, :-1], x[:, 1:], torch.tensor(1.0), step=3)
    b = m.compute_losses(x[:, :-1], x[:, 1:], torch.tensor(1.0), step=3)
    c = m.compute_losses(x[:, :-1], x[:, 1:], torch.tensor(1.0), step=4)
    assert torch.equal(a["reg_jacobi"], b["reg_jacobi"]) and a["reg_jacobi"] != c["reg_jacobi"]
    inputs, trace = m.model.forward_trace(x[:, :-1])
    gen = torch.Generator().manual_seed(7 * 1_000_003 + 3 + JACOBI_SEED_OFFSET)
    vectors = jacobi_vectors(tuple(trace[0].shape), m.config.n_layer, gen)
    expected = snlp_regularizer(m.model, inputs, trace, m.regularizer, vectors=vectors)["jacobi"]
    assert torch.equal(a["reg_jacobi"], expected)
    assert (a["loss"] - (a["ce"] + 0.5 * a["reg_jacobi"])).abs() < 1e-6


# -- defaults: bitwise the code before the options ----------------------------------------------------
def old_diag_term(model, inputs, trace, n_par, z, per_block=False):
    """diag_term as it was before diag_estimator / diag_stride existed."""
    L = model.config.n_layer
    start = L - n_par
    h_init = trace[start]
    outs, _ = _suffix_outputs(model, inputs, h_init, start, per_block)
    z = z.to(device=h_init.device, dtype=h_init.dtype)
    with torch.no_grad():
        perturbed, _ = _suffix_outputs(model, inputs, h_init + DIAG_EPS * z, start, per_block)
        wide = torch.promote_types(outs.dtype, torch.float32)
        diag = (z * (perturbed.to(wide) - outs.detach().to(wide)) / DIAG_EPS).clamp(-2.0, 2.0).to(outs.dtype)
    corrected = h_init + linear_scan(outs - h_init, lambda c, d: diag[c] * d)
    return relative_error(corrected[-1], trace[L].detach())


@pytest.mark.parametrize("dtype, per_block", [(torch.float32, False), (torch.float32, True), (torch.float64, False)])
def test_defaults_give_bitwise_the_old_terms(dtype, per_block):
    model = tiny_model("mhc", dtype=dtype)
    idx = tokens()
    n_list = [2, 4]
    cfg = RegularizerConfig(lambda_idn=0.5, lambda_hcn=0.25, lambda_diag=0.125, n_par_configs=n_list, stride=2)
    assert (cfg.diag_estimator, cfg.diag_stride, cfg.lambda_jacobi, cfg.spectral_norm) == ("fd", 1, 0.0, False)
    inputs, trace = model.forward_trace(idx)
    probes = diag_probes(tuple(trace[0].shape), len(n_list), torch.Generator().manual_seed(2))
    terms = snlp_regularizer(model, inputs, trace, cfg, probes=probes, per_block=per_block)
    new_grads = grads(terms["total"], model)

    inputs, trace = model.forward_trace(idx)
    zero = trace[-1].new_zeros((), dtype=torch.promote_types(dtype, torch.float32))
    idn = sum((idn_term(model, inputs, trace, n, 2, False, per_block) for n in n_list), zero)
    hcn = sum((hcn_term(model, inputs, trace, n, 2, False, per_block) for n in n_list), zero)
    diag = sum((old_diag_term(model, inputs, trace, n, z, per_block) for n, z in zip(n_list, probes)), zero)
    total = 0.5 * idn + 0.25 * hcn + 0.125 * diag
    for key, old in (("idn", idn), ("hcn", hcn), ("diag", diag), ("total", total)):
        assert torch.equal(terms[key], old), key
    assert float(terms["jacobi"]) == 0.0
    for a, b in zip(new_grads, grads(total, model)):
        assert torch.equal(a, b)


# -- spectral normalisation ---------------------------------------------------------------------------
def test_parametrization_matches_the_old_hook_and_sigma_max():
    torch.manual_seed(0)
    w = torch.randn(16, 24, dtype=torch.float64)
    old, new = (torch.nn.Linear(24, 16, bias=False).double() for _ in range(2))
    for lin in (old, new):
        lin.weight.data.copy_(w)
    torch.nn.utils.spectral_norm(old, n_power_iterations=1)
    torch.nn.utils.parametrizations.spectral_norm(new, n_power_iterations=1)
    x = torch.randn(3, 24, dtype=torch.float64)
    for _ in range(300):  # training mode: one power iteration per call
        old(x), new(x)
    expected = w / torch.linalg.matrix_norm(w, ord=2)
    assert (new.weight - expected).abs().max() < 1e-12
    assert (old.weight - new.weight).abs().max() < 1e-12


def test_spectral_norm_on_the_blocks():
    model = tiny_model("nanochat")  # n_kv_head = 2: the value-embedding gates (2 rows) are normalised too
    count = apply_spectral_norm(model)
    ve_layers = sum(model.config.has_value_embedding(i) for i in range(model.config.n_layer))
    assert count == 6 * model.config.n_layer + ve_layers
    assert apply_spectral_norm(model) == 0  # idempotent
    linears = [lin for blk in model.transformer.h for lin in (blk.attn.c_q, blk.attn.c_k, blk.attn.c_v, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj)]
    for _ in range(1000):  # training mode: each access advances the power iteration
        for lin in linears:
            lin.weight
    for lin in linears:
        original = lin.parametrizations.weight.original
        assert (lin.weight - original / torch.linalg.matrix_norm(original, ord=2)).abs().max() < 1e-5
        assert torch.linalg.matrix_norm(lin.weight, ord=2).item() == pytest.approx(1.0, abs=1e-5)
    # the model reads the normalised weights (the reference reads .weight too); eval: no iteration
    model.eval()
    idx = tokens()
    assert (model(idx) - reference.forward(model, idx)).abs().max() < 1e-10


def test_spectral_norm_training_step_and_checkpoints():
    cfg = make_config("nanochat", **TINY)
    reg = RegularizerConfig(lambda_idn=0.5, n_par_configs=[2], spectral_norm=True)
    torch.manual_seed(0)
    fresh = SNLPModule(config=cfg, regularizer=reg)
    x = tokens(batch=2, length=12)
    with pytest.raises(ConfigError, match=r"spectral_norm=true cannot normalise all-zero weights \(transformer\.h\.0\.attn\.c_proj"):
        fresh.compute_losses(x[:, :-1], x[:, 1:], torch.tensor(1.0), 0)

    torch.manual_seed(0)
    m = SNLPModule(config=cfg, regularizer=reg)
    randomize(m.model)  # sets the parametrizations' original weights
    assert any(k.endswith("attn.c_q.parametrizations.weight.original") for k in m.state_dict())
    opt = MuonAdamW(param_groups(m.model, OptimConfig()))
    before = m.model.transformer.h[1].mlp.c_fc.parametrizations.weight.original.detach().clone()
    for step in range(2):
        losses = m.compute_losses(x[:, :-1], x[:, 1:], torch.tensor(1.0), step)
        assert torch.isfinite(losses["loss"]) and losses["reg_idn"] > 0
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert not torch.equal(before, m.model.transformer.h[1].mlp.c_fc.parametrizations.weight.original)

    # a checkpoint of it loads into a spectral-norm module (same keys), and folds into a plain model
    m.eval()
    logits = m.model(x)
    torch.manual_seed(1)
    again = SNLPModule(config=cfg, regularizer=reg)
    again.load_state_dict(m.state_dict(), strict=True)
    again.eval()
    assert torch.equal(again.model(x), logits)
    plain = build(cfg).eval()
    plain.load_state_dict(fold_spectral_norm(m.model.state_dict()), strict=True)
    assert (plain(x) - logits).abs().max() < 1e-5
    assert fold_spectral_norm(plain.state_dict()).keys() == plain.state_dict().keys()
    # the default does not touch the model
    torch.manual_seed(0)
    default = SNLPModule(config=cfg, regularizer=RegularizerConfig())
    assert not any("parametrizations" in k for k in default.state_dict())


# -- validation ---------------------------------------------------------------------------------------
def test_bad_option_values():
    cfg = make_config("plain", n_layer=6, n_embd=48, n_head=4, n_kv_head=2)
    bad = [
        (dict(diag_estimator="jvp"), r"diag_estimator='jvp' is not allowed: one of 'fd', 'vjp'"),
        (dict(diag_stride=0), r"diag_stride=0 is not allowed: a positive integer"),
        (dict(diag_stride=1.5), r"diag_stride=1\.5 is not allowed"),
        (dict(lambda_jacobi=-0.1), r"lambda_jacobi=-0\.1 is not allowed: must be a finite number >= 0"),
        (dict(lambda_jacobi=float("inf")), r"lambda_jacobi=inf is not allowed"),
        (dict(lambda_jacobi=float("nan")), r"lambda_jacobi=nan is not allowed"),
        (dict(spectral_norm="yes"), r"spectral_norm='yes' is not allowed: true or false"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError, match=message):
            RegularizerConfig(**kwargs).validate(cfg)
    ok = RegularizerConfig(lambda_jacobi=0.1, diag_estimator="vjp", diag_stride=3, spectral_norm=True).validate(cfg)
    assert ok.active
