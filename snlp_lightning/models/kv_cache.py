"""The static KV cache of decoding (spec section 6): buffers plus one ``update``, as in gpt-fast.

    cache = KVCache(k, v, masks, mask_windows)     # tensors owned by the decoder (or graph inputs)
    keys, values = cache.update(first_layer, positions, k_new, v_new)
    y = cache.attend(q, keys, values, positions, windows)

Layout: k, v of shape (B, L, Hkv, Tmax, hd). Consecutive layers ``first .. first + G * M - 1`` (G
wide blocks of M fused layers) are then one (B, G * M * Hkv, Tmax, hd) view, so attention over
them is one 4-D SDPA call with the groups merged into the head axis.

Every position is absolute and given per row, ``positions`` (B, T), so rows may sit at different
lengths (self-speculative decoding accepts a different number of tokens per row). A call writes
its own k, v at its positions, then attends over every cached key at or before each query (and
inside its window). Entries past a row's position are stale but never read, so rolling a row back
is decoding from an earlier position again. The masks are precomputed tables (one (Tmax, Tmax)
band per distinct window) that a step only indexes with its positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .attention import band_mask, fused_sdpa


def mask_tables(windows: list[int], max_len: int, device) -> tuple[Tensor, tuple[int, ...]]:
    """One (Tmax, Tmax) boolean band per distinct window, True = may attend: ((W, Tmax, Tmax), the windows)."""
    distinct = tuple(sorted({min(w, max_len - 1) for w in windows}))
    return band_mask(distinct, max_len, device), distinct


@dataclass(frozen=True)
class KVCache:
    """k, v: (B, L, Hkv, Tmax, hd); masks: (W, Tmax, Tmax) from ``mask_tables``; mask_windows: their windows."""

    k: Tensor
    v: Tensor
    masks: Tensor
    mask_windows: tuple[int, ...]

    @staticmethod
    def allocate(batch: int, layers: int, kv_heads: int, max_len: int, head_dim: int, dtype, device) -> tuple[Tensor, Tensor]:
        """Zeroed k, v buffers (B, L, Hkv, Tmax, hd)."""
        shape = (batch, layers, kv_heads, max_len, head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def layers(self, first: int, count: int) -> "KVCache":
        """Layers first .. first + count - 1 as a cache of their own (views of k and v, read and
        written in place). For compiled regions (``export.compiled``): the view is made outside the
        compiled code and is the region's input, so inside it ``update`` still writes a whole tensor."""
        return KVCache(self.k[:, first : first + count], self.v[:, first : first + count], self.masks, self.mask_windows)

    def update(self, first: int, positions: Tensor, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (G, B, T, M * Hkv, hd) of layers first .. first + G * M - 1 at ``positions`` (B, T).

        Returns those layers' keys and values, (B, G * M * Hkv, Tmax, hd) views. The write is one
        ``index_put_`` into the whole tensor (whatever the compiled graph takes as its input: the
        whole cache in a graph of a whole step, a ``layers`` view in a region), never through a
        view made inside the graph: under torch.compile a write through a view becomes a scatter of
        the view into its base, which inductor materialises as a copy of the whole cache every step.
        """
        g, b, t, heads, hd = k_new.shape
        hkv = self.k.size(2)
        fuse = heads // hkv
        device = self.k.device
        row = torch.arange(b, device=device).view(1, b, 1, 1, 1)
        layer = (first + torch.arange(g * fuse, device=device)).view(g, 1, 1, fuse, 1)
        head = torch.arange(hkv, device=device).view(1, 1, 1, 1, hkv)
        index = (row, layer, head, positions.view(1, b, t, 1, 1))
        self.k.index_put_(index, k_new.view(g, b, t, fuse, hkv, hd).to(self.k.dtype))
        self.v.index_put_(index, v_new.view(g, b, t, fuse, hkv, hd).to(self.v.dtype))
        stop = first + g * fuse
        t_max = self.k.size(3)
        return self.k[:, first:stop].view(b, -1, t_max, hd), self.v[:, first:stop].view(b, -1, t_max, hd)

    def attend(self, q: Tensor, keys: Tensor, values: Tensor, positions: Tensor, windows: tuple[tuple[int, ...], ...],
               scale: float | None = None) -> Tensor:
        """Attention of new queries over the cache (which already holds their own k, v).

        q: (G, B, T, M * nh, hd) at ``positions`` (B, T); keys, values: from ``update``; windows: G rows
        of M * nh per-head left windows; scale: of the scores (None = 1 / sqrt(hd)). Returns (G, B, T, M * nh, hd).
        """
        g, b, t, hq, hd = q.shape
        t_max = keys.size(2)
        heads = q.permute(1, 0, 3, 2, 4).reshape(b, g * hq, t, hd)  # groups into the head axis
        flat = [min(w, t_max - 1) for row in windows for w in row]
        if len(set(flat)) == 1:
            mask = self.masks[self.mask_windows.index(flat[0])][positions].unsqueeze(1)  # (B, 1, T, Tmax)
        else:
            index = torch.tensor([self.mask_windows.index(w) for w in flat], device=q.device)
            mask = self.masks[index][:, positions].transpose(0, 1)  # (B, G * Hq, T, Tmax)
        y = fused_sdpa(heads, keys, values, mask, scale=scale)  # F.scaled_dot_product_attention (+ the CUDA fallback)
        return y.view(b, g, hq, t, hd).permute(1, 0, 3, 2, 4)
