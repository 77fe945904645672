"""Attention in the shapes the fast kernels take: every SDPA call of a training step, a solver
forward and a decode step is 4-D, with ``is_causal`` and no mask where the window is full; the
4-D calls equal a naive float64 softmax attention; the default CPU kernel computes bitwise what
the earlier 5-D call computed (the recorded CPU numbers), the fast one agrees in float32."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from conftest import tiny_model, tokens
from export import LayerParallelDecoder
from snlp_lightning import snlp_forward
from snlp_lightning.models import attention
from snlp_lightning.models.attention import _block_mask, _flex, band_mask, causal_attention
from snlp_lightning.module import SNLPModule
from snlp_lightning.regularizer import RegularizerConfig


class SDPACalls(TorchFunctionMode):
    """Records the shapes, mask and causal flag of every scaled_dot_product_attention call."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention or func is torch.ops.aten._scaled_dot_product_attention_math:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.calls.append({
                "dims": {args[0].dim(), args[1].dim(), args[2].dim()},
                "q": tuple(args[0].shape),
                "mask": None if mask is None else tuple(mask.shape),
                "causal": kwargs.get("is_causal", False),
            })
        return func(*args, **kwargs)


def test_training_step_and_solver_calls_are_4d_causal_without_masks():
    model = tiny_model("plain", dtype=torch.float32)  # window_pattern L: every window is full
    module = SNLPModule(model.config, regularizer=RegularizerConfig(lambda_idn=0.5, n_par_configs=[2, 4], stride=1))
    module.model.load_state_dict(model.state_dict())
    idx = tokens(batch=3, length=9)
    with SDPACalls() as seen:
        loss = module.compute_losses(idx, idx, torch.ones(()), 10)["loss"]
        loss.backward()
    L = model.config.n_layer
    assert len(seen.calls) == L + 2  # the sequential trace, then one batched call per regularizer N
    assert all(c["dims"] == {4} and c["mask"] is None and c["causal"] for c in seen.calls)
    heads = model.config.n_head
    # the regularizer's N suffix blocks: groups merged into the batch axis, (N * B, H, T, hd)
    assert [c["q"][:3] for c in seen.calls[L:]] == [(2 * 3, heads, 9), (4 * 3, heads, 9)]

    with SDPACalls() as seen:
        snlp_forward(module.model, idx, "idn:n4:2xF2:K2")
    assert seen.calls and all(c["dims"] == {4} and c["mask"] is None and c["causal"] for c in seen.calls)
    assert seen.calls[-1]["q"][:2] == (2 * 3, 2 * heads)  # C = 2 chunks x B rows, M * n_head fused heads


def test_decode_step_is_4d_and_indexes_a_precomputed_mask():
    model = tiny_model("plain", dtype=torch.float32)
    decoder = LayerParallelDecoder(model, "idn:n4:2xF2:K1", batch_size=2, max_seq_len=16)
    prompt = tokens(batch=2, length=5)
    positions = torch.arange(5).expand(2, 5)
    decoder.prefill(prompt, positions, torch.zeros(2, dtype=torch.long))
    masks_before = decoder.cache_masks.clone()
    with SDPACalls() as seen:
        decoder.decode(prompt[:, -1:], torch.full((2, 1), 5), prompt[:, -1])
    assert seen.calls and all(c["dims"] == {4} for c in seen.calls)
    # one query per row over the whole cache; the mask broadcasts over heads: (B, 1, 1, Tmax)
    assert all(c["mask"] == (2, 1, 1, 16) for c in seen.calls)
    assert torch.equal(decoder.cache_masks, masks_before)  # a table the step only reads


def test_sliding_windows_are_4d_and_masked_only_where_a_window_is_short():
    model = tiny_model("nanochat", dtype=torch.float32)  # SSSL windows of 4 tokens
    windows = model.config.window_sizes()
    idx = tokens(batch=2, length=14)
    with SDPACalls() as seen:
        model(idx)
    assert all(c["dims"] == {4} for c in seen.calls)
    for c, w in zip(seen.calls, windows):
        assert (c["mask"] is None and c["causal"]) == (w >= 13), (w, c)


def naive_attention(q, k, v, windows):
    """(G, B, T, Hq, hd) softmax attention, head by head, float64, explicit band mask."""
    g, b, t, hq, hd = q.shape
    rep = hq // k.size(3)
    out = torch.empty_like(q)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    for gi in range(g):
        for h in range(hq):
            allowed = (j <= i) & (i - j <= windows[gi][h])
            s = q[gi, :, :, h] @ k[gi, :, :, h // rep].transpose(-1, -2) / math.sqrt(hd)
            out[gi, :, :, h] = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v[gi, :, :, h // rep]
    return out


@pytest.mark.parametrize("windows", [((20,) * 4, (20,) * 4, (20,) * 4), ((3,) * 4, (20,) * 4, (5, 5, 20, 20))])
def test_4d_attention_equals_naive_attention_in_float64(windows):
    """Full windows (is_causal), and windows that differ between groups and heads (band mask); GQA 4:2."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 11, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 11, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    got = causal_attention(q, k, v, windows)
    torch.testing.assert_close(got, naive_attention(q, k, v, windows), rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_flex_block_mask_equals_the_band_mask():
    """The CUDA path's flex_attention block mask allows exactly what the CPU band mask allows
    (run compiled on the CPU here; the CUDA kernel is checked by the GPU readiness command)."""
    windows, t = (3, 3, 20, 20, 5, 5), 40
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, t, 16, generator=g)
    k, v = (torch.randn(2, 3, t, 16, generator=g) for _ in range(2))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(windows, t, "cpu"), enable_gqa=True)
    got = _flex(q, k, v, block_mask=_block_mask(windows, t, torch.device("cpu")), enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_default_cpu_kernel_is_bitwise_the_earlier_5d_call_and_fast_agrees(kv_heads):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 2, 16, 4, 8, generator=g)  # (G, B, T, H, hd) float32
    k, v = (torch.randn(3, 2, 16, kv_heads, 8, generator=g) for _ in range(2))
    windows = ((20,) * 4,) * 3
    # the earlier code: heads second, kv heads repeated, one 5-D call (SDPA's math kernel)
    rep = 4 // kv_heads
    five_d = [x.transpose(2, 3) for x in (q, k.repeat_interleave(rep, 3), v.repeat_interleave(rep, 3))]
    earlier = F.scaled_dot_product_attention(*five_d, is_causal=True).transpose(2, 3)
    assert torch.equal(causal_attention(q, k, v, windows), earlier)
    attention.set_cpu_kernel("fast")
    try:
        fast = causal_attention(q, k, v, windows)
    finally:
        attention.set_cpu_kernel("math")
    torch.testing.assert_close(fast, earlier, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="CPU attention kernel 'flash' is not allowed: one of math, fast"):
        attention.set_cpu_kernel("flash")
