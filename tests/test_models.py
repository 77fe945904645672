"""Models against the naive reference: sequential forward, batched blocks, fusion, mHC, errors."""

from __future__ import annotations

import pytest
import torch

import reference as ref
from conftest import tiny_model, tokens
from snlp_lightning import ConfigError, TokenRangeError, build_model, make_config
from snlp_lightning.models.mhc import sinkhorn_log
from snlp_lightning.models.nanochat import rms_norm

TOL = 1e-10


def test_sequential_forward_matches_naive_reference(preset):
    model = tiny_model(preset)
    idx = tokens(length=14)  # longer than short_window=4 + 1: the windows really cut
    assert (model(idx) - ref.forward(model, idx)).abs().max() < TOL


def test_sliding_windows_change_the_output():
    model = tiny_model("nanochat")
    full = tiny_model("nanochat", window_pattern="L")
    full.load_state_dict(model.state_dict())
    idx = tokens(length=14)
    assert (model(idx) - full(idx)).abs().max() > 1e-4


def test_batched_blocks_equal_a_loop_over_blocks(preset):
    model = tiny_model(preset)
    idx = tokens()
    inputs, h0 = model.embed(idx)
    layers = [1, 2, 4, 5]
    states = torch.stack([h0 + 0.1 * k * torch.randn_like(h0) for k in range(len(layers))])  # a different input each
    batched, surrogate = model.stack([[l] for l in layers])(states, inputs)
    for g, layer in enumerate(layers):
        single, single_a = model.block(layer, states[g], inputs)
        assert (batched[g] - single).abs().max() < TOL
        assert (batched[g] - ref.block(model, layer, states[g], h0, idx)).abs().max() < TOL
        if surrogate is not None:
            assert (surrogate[g] - single_a).abs().max() < TOL


@pytest.mark.parametrize("preset_name", ["plain", "nanochat", "mhc"])
def test_fused_chunk_equals_spec_formula(preset_name):
    """F(x) = x_mid + sum_m MLP_m(norm x_mid), x_mid = x + sum_m Attn_m(norm x), from unfused blocks."""
    model = tiny_model(preset_name)
    cfg = model.config
    idx = tokens()
    inputs, h0 = model.embed(idx)
    x = h0 + 0.3 * torch.randn_like(h0)
    chunk = [2, 3, 4]
    fused, _ = model.stack([chunk])(x.unsqueeze(0), inputs)

    if cfg.uses_lambdas:  # averaged lambdas, applied once to the chunk input
        x = model.resid_lambdas[chunk].mean() * x + model.x0_lambdas[chunk].mean() * h0
    # the blocks' own attention / MLP, value embeddings dropped: evaluate each block alone, no ve gate
    def attn_sum(xn):
        total = 0
        for layer in chunk:
            one = model.stack([[layer]])
            one.ve_gate = None
            total = total + one.attention(xn.unsqueeze(0), inputs).squeeze(0)
        return total

    def mlp_sum(xn):
        return sum(model.stack([[layer]]).mlp(xn.unsqueeze(0)).squeeze(0) for layer in chunk)

    if cfg.use_mhc:
        hcs = [model.transformer.h[layer] for layer in chunk]
        mean = lambda parts: torch.stack(parts).mean(0)  # noqa: E731
        mats = lambda hc_list: [mean([ref.connection(model, hc, x)[i] for hc in hc_list]) for i in range(3)]  # noqa: E731
        pre, post, res = mats([b.hc_attn for b in hcs])
        x_mid = res @ x + post[:, None] * attn_sum(rms_norm(torch.einsum("n,btnd->btd", pre, x))).unsqueeze(-2)
        pre, post, res = mats([b.hc_mlp for b in hcs])
        expected = res @ x_mid + post[:, None] * mlp_sum(rms_norm(torch.einsum("n,btnd->btd", pre, x_mid))).unsqueeze(-2)
    else:
        x_mid = x + attn_sum(rms_norm(x[..., 0, :])).unsqueeze(-2)
        expected = x_mid + mlp_sum(rms_norm(x_mid[..., 0, :])).unsqueeze(-2)
    assert (fused.squeeze(0) - expected).abs().max() < TOL


def test_fusion_concatenates_weights():
    model = tiny_model("plain")
    wide = model.stack([[0, 1], [2, 3]])
    d = model.config.n_embd
    assert wide.wq.shape == (2, 2 * d, d) and wide.wo.shape == (2, d, 2 * d) and wide.w_fc.shape == (2, 8 * d, d)
    assert torch.equal(wide.wo[1, :, d:], model.transformer.h[3].attn.c_proj.weight)


def test_one_by_f1_fusion_is_the_block_itself(preset):
    model = tiny_model(preset)
    idx = tokens()
    inputs, h0 = model.embed(idx)
    out, _ = model.stack([[3]])(h0.unsqueeze(0), inputs)
    assert (out.squeeze(0) - ref.block(model, 3, h0, h0, idx)).abs().max() < TOL


def test_average_branches_divides_by_m():
    model = tiny_model("plain")
    inputs, h0 = model.embed(tokens())
    summed, _ = model.stack([[2, 3]])(h0.unsqueeze(0), inputs)
    averaged, _ = model.stack([[2, 3]], average_branches=True)(h0.unsqueeze(0), inputs)
    assert (summed - averaged).abs().max() > 1e-3  # not the same model
    one = model.stack([[2, 3]], average_branches=True)
    x_mid = h0 + 0.5 * one.attention(rms_norm(h0[..., 0, :]).unsqueeze(0), inputs).squeeze(0).unsqueeze(-2)
    expected = x_mid + 0.5 * one.mlp(rms_norm(x_mid[..., 0, :]).unsqueeze(0)).squeeze(0).unsqueeze(-2)
    assert (averaged.squeeze(0) - expected).abs().max() < TOL


@pytest.mark.parametrize("preset_name", ["mhc", "mhc-dynamic"])
def test_h_res_is_doubly_stochastic(preset_name):
    model = tiny_model(preset_name, dtype=torch.float32)
    idx = tokens()
    inputs, h0 = model.embed(idx)
    x = h0 + torch.randn_like(h0)
    for layer in range(model.config.n_layer):
        wide = model.stack([[layer]])
        for hc in (wide.hc_attn, wide.hc_mlp):
            _, _, res = hc.coefficients(x.unsqueeze(0))
            assert (res.sum(-1) - 1).abs().max() < 1e-5
            assert (res.sum(-2) - 1).abs().max() < 1e-5
            assert res.min() >= 0


def test_log_space_sinkhorn_equals_plain_sinkhorn():
    logits = torch.randn(5, 4, 4, dtype=torch.float64) * 0.05
    assert (sinkhorn_log(logits, 10, 0.05) - ref.plain_sinkhorn(logits, 10, 0.05)).abs().max() < 1e-12


def test_initial_mhc_is_near_identity_mixing():
    model = build_model("mhc", n_layer=4, n_embd=32, n_head=2, n_kv_head=2, vocab_size=64, sequence_len=8)
    res = model.stack([[0]]).hc_attn.res[0]
    assert (res - torch.eye(4)).abs().max() < 1e-3


def test_logits_dtype_and_vocab_crop():
    model = build_model("plain", n_layer=2, n_embd=32, n_head=2, n_kv_head=2, vocab_size=100, sequence_len=8)
    assert model.transformer.wte.weight.shape[0] == 128  # padded to a multiple of 64
    logits = model(torch.randint(0, 100, (1, 8)))
    assert logits.shape == (1, 8, 100) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0


def test_bf16_forward_is_close_to_fp32():
    model = tiny_model("nanochat", dtype=torch.float32)
    idx = tokens()
    ref32 = model(idx)
    logits = model.to(torch.bfloat16)(idx)
    assert logits.dtype == torch.float32
    assert (logits - ref32).abs().max() < 0.25 * ref32.abs().max()


def test_token_out_of_vocab_is_a_clear_error():
    model = tiny_model("plain")
    with pytest.raises(TokenRangeError, match=r"token id 96 is out of the vocabulary: allowed 0\.\.95"):
        model(torch.tensor([[1, 2, 96]]))
    with pytest.raises(ValueError, match="exceeds sequence_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_embd=50, n_head=4), "n_embd=50 is not allowed: must be a multiple of n_head=4"),
        (dict(n_kv_head=3), "n_kv_head=3 is not allowed: must divide n_head=4"),
        (dict(window_pattern="SXL"), "window_pattern='SXL' is not allowed"),
        (dict(n_layer=0), "n_layer=0 is not allowed: must be a positive integer"),
        (dict(mhc_variant="fancy"), "mhc_variant='fancy' is not allowed"),
        (dict(bogus=1), r"unknown ModelConfig field\(s\) \['bogus'\]"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config("plain", **{"n_layer": 4, "n_embd": 32, "n_head": 4, "n_kv_head": 4, **overrides})


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'tiny'; allowed: \['llama', 'mhc', 'mhc-dynamic', 'nanochat', 'plain'\]"):
        make_config("tiny")
