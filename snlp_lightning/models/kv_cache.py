"""Static, preallocated KV cache attention for decoding (spec section 6).

Cache layout: (G, M, B, Hkv, Tmax, hd) for G (wide) blocks of M fused layers. Layer-by-layer
stacks use M = 1; a fused chunk of M layers reads its M layers' kv heads as one M * Hkv-head
cache, so the per-layer cache of all L layers, viewed as (L, 1, ...), and the chunk caches of a
fused plan, viewed as (C, M, ...), are the same memory.

Every position is absolute and given per row, ``positions`` (B, T), so rows of a batch may sit at
different lengths (self-speculative decoding accepts a different number of tokens per row).
A call writes its own k, v at its positions, then attends over every cached key at or before each
query (and inside its sliding window). Entries past a row's position are stale but never read, so
rolling a row back is just decoding from an earlier position again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def new_cache(layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device) -> Tensor:
    """A zeroed cache for ``layers`` single layers: (layers, 1, batch, kv_heads, max_len, head_dim)."""
    return torch.zeros(layers, 1, batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)


@dataclass(frozen=True)
class StackCache:
    """The KV cache of a stack of G wide blocks of M fused layers: layers ``start`` ..
    ``start + G * M - 1`` of the whole per-layer caches ``k``, ``v`` (L, 1, B, Hkv, Tmax, hd).

    Writes go into the whole tensors with one ``index_put_`` each, never through a view of them:
    under torch.compile a write through a view is functionalized into a scatter of the view back
    into its base, which inductor materialises as a copy of the whole cache on every step (it made
    compiled batch-8 decoding slower than eager). Reads are views: ``keys()`` / ``values()``.
    """

    k: Tensor
    v: Tensor
    start: int
    groups: int
    fuse: int = 1

    def take(self, start: int, stop: int) -> "StackCache":
        """The cache of wide blocks start .. stop - 1 of this stack."""
        return StackCache(self.k, self.v, self.start + start * self.fuse, stop - start, self.fuse)

    def _view(self, whole: Tensor) -> Tensor:
        stop = self.start + self.groups * self.fuse
        return whole[self.start : stop].view(self.groups, self.fuse, *whole.shape[2:])

    def keys(self) -> Tensor:
        """(G, M, B, Hkv, Tmax, hd), a view."""
        return self._view(self.k)

    def values(self) -> Tensor:
        """(G, M, B, Hkv, Tmax, hd), a view."""
        return self._view(self.v)

    def write(self, k_new: Tensor, v_new: Tensor, positions: Tensor) -> None:
        """Write k, v (G, B, T, M * Hkv, hd) of this stack's layers at ``positions`` (B, T)."""
        _write(self.k, k_new, positions, self.start, self.fuse)
        _write(self.v, v_new, positions, self.start, self.fuse)


def _write(whole: Tensor, new: Tensor, positions: Tensor, start: int, fuse: int) -> None:
    """whole (L, 1, B, Hkv, Tmax, hd)[start + g * M + m, 0, b, h, positions[b, t]] = new[g, b, t, m * Hkv + h]."""
    g, b, t, _, hd = new.shape
    h = whole.size(3)
    device = whole.device
    layer = (start + torch.arange(g * fuse, device=device)).view(g, 1, 1, fuse, 1)
    row = torch.arange(b, device=device).view(1, b, 1, 1, 1)
    head = torch.arange(h, device=device).view(1, 1, 1, 1, h)
    index = (layer, torch.zeros_like(row), row, head, positions.view(1, b, t, 1, 1))
    whole.index_put_(index, new.view(g, b, t, fuse, h, hd).to(whole.dtype))


def cached_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, windows: tuple[tuple[int, ...], ...]) -> Tensor:
    """Attention of new queries over the cache (which already holds their own k, v).

    q: (G, B, T, M * nh, hd) at ``positions`` (B, T); caches: (G, M, B, Hkv, Tmax, hd); windows: G rows
    of M * nh per-head left windows (query at p sees keys p - w .. p). Returns (G, B, T, M * nh, hd).
    """
    g, m, b, hkv, t_max, hd = k_cache.shape
    t = q.size(2)
    nh = q.size(3) // m
    q = q.view(g, b, t, m, nh, hd).permute(0, 3, 1, 4, 2, 5).reshape(g * m * b, nh, t, hd)
    dist = positions[:, :, None] - torch.arange(t_max, device=positions.device)  # (B, T, Tmax)
    allowed = (dist >= 0).view(1, 1, b, 1, t, t_max)
    if min(min(row) for row in windows) < t_max - 1:  # some head's window is shorter than the cache
        width = torch.tensor(windows, device=q.device).view(g, m, 1, nh, 1, 1)
        allowed = allowed & (dist.view(1, 1, b, 1, t, t_max) <= width)
    allowed = allowed.expand(g, m, b, allowed.size(3), t, t_max).reshape(g * m * b, -1, t, t_max)
    y = F.scaled_dot_product_attention(
        q, k_cache.view(g * m * b, hkv, t_max, hd), v_cache.view(g * m * b, hkv, t_max, hd),
        attn_mask=allowed, enable_gqa=nh != hkv,
    )
    return y.view(g, m, b, nh, t, hd).permute(0, 2, 4, 1, 3, 5).reshape(g, b, t, m * nh, hd)
