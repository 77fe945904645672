"""Causal attention in the shapes the fast kernels take: 4-D SDPA, never a dense mask for full windows.

Flash, memory-efficient and cuDNN attention accept (N, H, T, hd) inputs only; a 5-D call or an
explicit T x T mask sends CUDA to the math kernel, which materialises every score matrix. So:

- G wide blocks (groups) over a batch of B rows are merged into the batch axis, N = G * B
  (a view of the projection output, no copy);
- windows that cover the whole sequence use ``is_causal=True``;
- sliding windows go through ``flex_attention`` with a block mask on CUDA (no T x T tensor); on
  the CPU, where flex attention only runs compiled, through SDPA with a boolean band mask;
- grouped-query heads use SDPA's ``enable_gqa`` instead of repeating k, v.

On the CPU these calls run SDPA's math kernel by default: it is the kernel every CPU number the
project records was computed with (the README table, docs/), and with it the results are bitwise
those of the earlier 5-D code. ``set_cpu_kernel("fast")`` (an entry point's choice, e.g. the
benchmarks' ``--cpu-attention fast``) lets SDPA pick its CPU flash kernel instead: faster, equal
in float64 to about 1e-15, different in float32 rounding (about 1e-6 per call), so a 300-step
training run ends a few tenths of a PPL point elsewhere. CUDA always gets the fast kernels.

Attention over a KV cache is ``kv_cache.KVCache.attend``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compat import sdpa_math
from ..errors import UserError

Windows = tuple[tuple[int, ...], ...]  # G rows of per-head left windows: query i sees keys i - w .. i
CPU_KERNELS = ("math", "fast")
_cpu_kernel = "math"
_math_attention = sdpa_math()


def set_cpu_kernel(name: str) -> None:
    """The CPU attention kernel of this process: "math" (default; the recorded numbers) or "fast"."""
    global _cpu_kernel
    if name not in CPU_KERNELS:
        raise UserError(f"CPU attention kernel {name!r} is not allowed: one of {', '.join(CPU_KERNELS)}")
    _cpu_kernel = name


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """4-D SDPA, (N, Hq, T, hd) x (N, Hkv, S, hd) -> (N, Hq, T, hd), grouped-query when Hkv < Hq."""
    gqa = q.size(1) != k.size(1)
    if q.device.type == "cpu" and _cpu_kernel == "math":
        if mask is not None:  # the op takes an additive mask; SDPA converts a boolean one the same way
            mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        return _math_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def full_windows(windows: Windows, length: int) -> bool:
    """True when every head's window covers ``length`` positions (plain causal attention)."""
    return min(min(row) for row in windows) >= length - 1


def causal_attention(q: Tensor, k: Tensor, v: Tensor, windows: Windows) -> Tensor:
    """Grouped-query causal attention of G independent (possibly fused) blocks over T positions.

    q: (G, B, T, Hq, hd); k, v: (G, B, T, Hkv, hd), as the projections produce them. Query head h
    reads kv head h // (Hq / Hkv). ``windows``: G rows of Hq left windows (Python ints, so the
    kernel choice is static under torch.compile). Returns (G, B, T, Hq, hd). Scale 1 / sqrt(hd).
    """
    g, b, t, hq, hd = q.shape
    hkv = k.size(3)
    if full_windows(windows, t):
        # (G, B, T, H, hd) -> (G * B, H, T, hd): a view; SDPA reads the strided layout as is.
        y = sdpa(
            q.view(g * b, t, hq, hd).transpose(1, 2), k.view(g * b, t, hkv, hd).transpose(1, 2),
            v.view(g * b, t, hkv, hd).transpose(1, 2), causal=True,
        )
        return y.transpose(1, 2).view(g, b, t, hq, hd)
    # Windows differ between groups: groups move into the head axis, so one (G * Hq)-head window
    # table serves every row of the batch. Query head g * Hq + h reads kv head g * Hkv + h // rep.
    def heads(x: Tensor) -> Tensor:  # (G, B, T, H, hd) -> (B, G * H, T, hd)
        return x.permute(1, 0, 3, 2, 4).reshape(b, g * x.size(3), t, hd)

    flat = tuple(w for row in windows for w in row)
    if q.is_cuda:
        y = _flex(heads(q), heads(k), heads(v), block_mask=_block_mask(flat, t, q.device), enable_gqa=hq != hkv)
    else:
        y = sdpa(heads(q), heads(k), heads(v), mask=band_mask(flat, t, q.device))
    return y.view(b, g, hq, t, hd).permute(1, 0, 3, 2, 4)


def band_mask(windows: tuple[int, ...], length: int, device) -> Tensor:
    """(H, T, T) boolean, True = may attend: key j <= query i and i - j <= windows[h]."""
    pos = torch.arange(length, device=device)
    dist = pos[:, None] - pos[None, :]
    return (dist >= 0) & (dist <= torch.tensor(windows, device=device)[:, None, None])


@lru_cache(maxsize=64)
def _block_mask(windows: tuple[int, ...], length: int, device):
    """flex_attention's block mask of per-head sliding windows (built once per shape and device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    width = torch.tensor(windows, device=device)

    def allowed(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= width[h])

    return create_block_mask(allowed, None, len(windows), length, length, device=device)


def _flex(*args, **kwargs) -> Tensor:
    """flex_attention, compiled once: uncompiled it materialises the scores it exists to avoid."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(*args, **kwargs)


_compiled_flex = None
