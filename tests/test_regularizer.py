"""The SNLP regularizer against a direct, block-by-block computation of the spec formula."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, tokens
from snlp_lightning import ConfigError, make_config
from snlp_lightning.regularizer import RegularizerConfig, default_n_par_configs, snlp_regularizer, warmup_weight


def rel(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-6)).mean()


def direct(model, idx, kind: str, n_list, stride: int, detach: bool, seed: int = 0):
    """One block at a time, a Python loop over the suffix, exactly as section 4 / 9 read."""
    L = model.config.n_layer
    inputs, trace = model.forward_trace(idx)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for n in n_list:
        s = L - n
        h_init = trace[s]
        tgt = (lambda i: trace[i].detach()) if (detach or kind == "diag") else (lambda i: trace[i])
        if kind == "idn" and stride == 0:
            total = total + rel(model.block(L - 1, h_init, inputs)[0], tgt(L))
            continue
        outs, mix = zip(*(model.block(s + j, h_init, inputs) for j in range(n)))
        if kind == "diag":
            z = (torch.randint(0, 2, h_init.shape, generator=gen) * 2 - 1).to(h_init.dtype)
            with torch.no_grad():
                diag = [(z * (model.block(s + j, h_init + 0.01 * z, inputs)[0] - outs[j]) / 0.01).clamp(-2, 2) for j in range(n)]
        h = outs[0]
        for j in range(1, n):
            delta = h - h_init
            if kind == "idn":
                h = outs[j] + delta
            elif kind == "hcn":
                h = outs[j] + mix[j] @ delta
            else:
                h = outs[j] + diag[j] * delta
            compare = (stride > 0 and ((j + 1) % stride == 0 or j == n - 1)) or (stride == 0 and j == n - 1)
            if kind == "diag":
                compare = j == n - 1
            if compare:
                total = total + rel(h, tgt(s + j + 1))
    return total


CASES = [
    ("plain", "idn", 0, False),
    ("plain", "idn", 2, False),
    ("nanochat", "idn", 2, True),
    ("nanochat", "idn", 0, True),
    ("mhc", "hcn", 0, False),
    ("mhc", "hcn", 2, True),
    ("mhc-dynamic", "hcn", 3, False),
    ("mhc", "idn", 2, False),
    ("plain", "diag", 0, False),
    ("nanochat", "diag", 0, False),
]


@pytest.mark.parametrize("preset, kind, stride, detach", CASES)
def test_regularizer_equals_direct_computation(preset, kind, stride, detach):
    model = tiny_model(preset)
    idx = tokens()
    n_list = [2, 4, 6]
    cfg = RegularizerConfig(**{f"lambda_{kind}": 0.5}, n_par_configs=n_list, stride=stride, detach=detach)
    inputs, trace = model.forward_trace(idx)
    terms = snlp_regularizer(model, inputs, trace, cfg, generator=torch.Generator().manual_seed(0))
    batched = terms[kind]
    assert terms["total"].item() == pytest.approx(0.5 * batched.item(), rel=1e-12)
    assert batched.item() > 1e-3  # the tiny random models are far from layer-parallel

    params = [p for p in model.parameters() if p.requires_grad]
    grads_batched = torch.autograd.grad(batched, params, allow_unused=True)
    reference = direct(model, idx, kind, n_list, stride, detach)
    assert abs(batched.item() - reference.item()) < 1e-10
    grads_direct = torch.autograd.grad(reference, params, allow_unused=True)
    for p, a, b in zip(params, grads_batched, grads_direct):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        assert (a - b).abs().max() < 1e-9


@pytest.mark.parametrize("preset, kind, stride, detach", CASES)
def test_per_block_path_equals_the_batched_path(preset, kind, stride, detach):
    """FSDP's path (one model.block call per suffix block) gives the batched path's values and gradients."""
    model = tiny_model(preset)
    cfg = RegularizerConfig(**{f"lambda_{kind}": 0.5}, n_par_configs=[2, 4, 6], stride=stride, detach=detach)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for per_block in (False, True):
        inputs, trace = model.forward_trace(tokens())
        total = snlp_regularizer(model, inputs, trace, cfg, generator=torch.Generator().manual_seed(0), per_block=per_block)["total"]
        grads = torch.autograd.grad(total, params, allow_unused=True)
        results.append((total, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]))
    (batched, grads_batched), (per_block, grads_per_block) = results
    assert batched.item() > 1e-3 and abs(batched.item() - per_block.item()) < 1e-12
    for a, b in zip(grads_batched, grads_per_block):
        assert (a - b).abs().max() < 1e-12


def test_detach_stops_gradients_through_the_target():
    model = tiny_model("plain")
    idx = tokens()
    inputs, trace = model.forward_trace(idx)
    cfg = RegularizerConfig(lambda_idn=1.0, n_par_configs=[2], stride=0, detach=True)
    loss = snlp_regularizer(model, inputs, trace, cfg)["total"]
    loss.backward()
    # with a detached target, the last block's input path (block L - 2) gets no gradient from the target
    assert model.transformer.h[4].mlp.c_fc.weight.grad is None or model.transformer.h[4].mlp.c_fc.weight.grad.abs().max() == 0
    assert model.transformer.h[5].mlp.c_fc.weight.grad.abs().max() > 0


def test_zero_lambdas_compute_nothing():
    model = tiny_model("plain")
    inputs, trace = model.forward_trace(tokens())
    terms = snlp_regularizer(model, inputs, trace, RegularizerConfig())
    assert float(terms["total"]) == 0.0 and not terms["total"].requires_grad


def test_warmup_ramp():
    assert warmup_weight(0, 100) == 0.0
    assert warmup_weight(10, 100) == pytest.approx(0.5)
    assert warmup_weight(20, 100) == 1.0 and warmup_weight(99, 100) == 1.0
    assert warmup_weight(0, 3) == 0.0 and warmup_weight(1, 3) == 1.0  # ramp of at least one step
    assert warmup_weight(0, 100, fraction=0.0) == 1.0


def test_default_n_par_configs():
    assert default_n_par_configs(32) == [3, 5, 7, 10, 12, 16]
    assert default_n_par_configs(8) == [3, 5, 7, 7, 7, 6]


def test_bad_regularizer_configs():
    plain = make_config("plain", n_layer=6, n_embd=48, n_head=4, n_kv_head=2)
    with pytest.raises(ConfigError, match=r"lambda_hcn > 0 needs an mHC model"):
        RegularizerConfig(lambda_hcn=0.1).validate(plain)
    with pytest.raises(ConfigError, match=r"n_par_configs entry 9 is not allowed: each N must lie in 1\.\.6"):
        RegularizerConfig(lambda_idn=0.1, n_par_configs=[2, 9]).validate(plain)
    with pytest.raises(ConfigError, match=r"stride=-1 is not allowed"):
        RegularizerConfig(stride=-1).validate(plain)
