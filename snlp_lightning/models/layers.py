"""Stateless building blocks: RMS norm, rotary embeddings, causal attention with per-head windows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor) -> Tensor:
    """Parameter-free RMS norm over the last axis."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(max_len: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin tables of shape (max_len, head_dim // 2), float64 (cast at use)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split rotation. x: (..., T, H, hd); cos, sin: (T, hd // 2), or (B, T, hd // 2) for x of
    shape (..., B, T, H, hd) whose rows sit at different positions."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos.unsqueeze(-2).to(x.dtype)  # broadcast over the heads
    sin = sin.unsqueeze(-2).to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def window_mask(windows: Tensor, t: int, device) -> Tensor:
    """Boolean attention mask over T positions, True = may attend.

    windows: (G, H) left window per group and head (query i sees keys i - w .. i).
    Returns (G, 1, H, T, T), broadcastable over the batch axis.
    """
    pos = torch.arange(t, device=device)
    dist = pos[:, None] - pos[None, :]  # (T, T): query - key
    allowed = (dist >= 0)[None, None] & (dist[None, None] <= windows.to(device)[:, :, None, None])
    return allowed[:, None]


def causal_attention(q: Tensor, k: Tensor, v: Tensor, windows: tuple[tuple[int, ...], ...]) -> Tensor:
    """Grouped-query causal attention over T positions, batched over G independent (possibly fused) blocks.

    q: (G, B, Hq, T, hd); k, v: (G, B, Hkv, T, hd). Query head h reads kv head h // (Hq / Hkv).
    windows: G rows of Hq per-head left windows (Python ints, so the mask decision is static under
    torch.compile). Returns (G, B, Hq, T, hd). SDPA's default scale 1 / sqrt(hd). (Attention over
    a KV cache is ``kv_cache.cached_attention``.)
    """
    rep = q.size(2) // k.size(2)
    if rep > 1:
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
    t = q.size(3)
    if min(min(row) for row in windows) >= t - 1:  # every window covers the whole sequence
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = window_mask(torch.tensor(windows), t, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
