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

Attention over a KV cache is ``kv_cache.KVCache.attend`` (``fused_sdpa``).

A fallback on CUDA: when the fused kernel SDPA picks raises a RuntimeError for a shape (a known
crash class: memory-efficient / cuDNN attention with a mask whose last dimension is not a multiple
of 8 / 16), the call is retried once under SDPA's math kernel, a warning names the shape, and
later eager calls of that shape go to the math kernel directly (``with_math_fallback``). Not
inside torch.compile (the compiled code has its own kernels), and never on the CPU.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Callable

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


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False, scale: float | None = None) -> Tensor:
    """4-D SDPA, (N, Hq, T, hd) x (N, Hkv, S, hd) -> (N, Hq, T, hd), grouped-query when Hkv < Hq;
    scale None = 1 / sqrt(hd)."""
    gqa = q.size(1) != k.size(1)
    if q.device.type == "cpu" and _cpu_kernel == "math":
        if mask is not None:  # the op takes an additive mask; SDPA converts a boolean one the same way
            mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        return _math_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa, scale=scale)[0]
    return fused_sdpa(q, k, v, mask, causal, scale)


def fused_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False, scale: float | None = None) -> Tensor:
    """``F.scaled_dot_product_attention`` (the kernel SDPA picks), grouped-query when Hkv < Hq; on
    CUDA, outside compiled code, with the math-kernel fallback of ``with_math_fallback``."""
    gqa = q.size(1) != k.size(1)
    call = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa, scale=scale)  # noqa: E731
    if not q.is_cuda or torch.compiler.is_compiling():
        return call()
    key = (tuple(q.shape), tuple(k.shape), None if mask is None else (tuple(mask.shape), mask.dtype), causal, q.dtype, scale)
    return with_math_fallback(call, key)


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
_math_shapes: set = set()  # the shapes whose fused kernel failed once: they go to the math kernel


def _math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def with_math_fallback(call: Callable[[], Tensor], key, math_kernel: Callable = _math_kernel) -> Tensor:
    """``call()``; if it raises a RuntimeError (not out-of-memory), ``call()`` again once under
    ``math_kernel()`` (SDPA's math kernel), warn once naming ``key`` (the call's shapes), and send
    every later call of ``key`` straight to the math kernel. A failure under the math kernel is
    raised. (An asynchronous CUDA error, e.g. a misaligned address reported later, is not caught:
    it surfaces outside the call and leaves the context unusable.)"""
    if key in _math_shapes:
        with math_kernel():
            return call()
    try:
        return call()
    except _OOM:
        raise
    except RuntimeError as err:
        with math_kernel():
            out = call()
        _math_shapes.add(key)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(
            f"scaled_dot_product_attention failed for shape {key} ({first[:200]}); using the math kernel for this shape",
            RuntimeWarning, stacklevel=2,
        )
        return out


def full_windows(windows: Windows, length: int) -> bool:
    """True when every head's window covers ``length`` positions (plain causal attention)."""
    return min(min(row) for row in windows) >= length - 1


def causal_attention(q: Tensor, k: Tensor, v: Tensor, windows: Windows, scale: float | None = None) -> Tensor:
    """Grouped-query causal attention of G independent (possibly fused) blocks over T positions.

    q: (G, B, T, Hq, hd); k, v: (G, B, T, Hkv, hd), as the projections produce them. Query head h
    reads kv head h // (Hq / Hkv). ``windows``: G rows of Hq left windows (Python ints, so the
    kernel choice is static under torch.compile). Returns (G, B, T, Hq, hd). ``scale``: of the
    scores, None = 1 / sqrt(hd) (Gemma 3 sets its own).
    """
    g, b, t, hq, hd = q.shape
    hkv = k.size(3)
    if full_windows(windows, t):
        # (G, B, T, H, hd) -> (G * B, H, T, hd): a view; SDPA reads the strided layout as is.
        y = sdpa(
            q.view(g * b, t, hq, hd).transpose(1, 2), k.view(g * b, t, hkv, hd).transpose(1, 2),
            v.view(g * b, t, hkv, hd).transpose(1, 2), causal=True, scale=scale,
        )
        return y.transpose(1, 2).view(g, b, t, hq, hd)
    # Windows differ between groups: groups move into the head axis, so one (G * Hq)-head window
    # table serves every row of the batch. Query head g * Hq + h reads kv head g * Hkv + h // rep.
    def heads(x: Tensor) -> Tensor:  # (G, B, T, H, hd) -> (B, G * H, T, hd)
        return x.permute(1, 0, 3, 2, 4).reshape(b, g * x.size(3), t, hd)

    flat = tuple(w for row in windows for w in row)
    if q.is_cuda:
        y = _flex(heads(q), heads(k), heads(v), block_mask=_block_mask(flat, t, q.device), enable_gqa=hq != hkv, scale=scale)
    else:
        y = sdpa(heads(q), heads(k), heads(v), mask=band_mask(flat, t, q.device), scale=scale)
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
