"""The one layer-parallel executor: prefix loop, chunk solve, backout choice, head (spec section 2).

    result = execute(plan, inputs, h0, layer=run_block, chunks=stack, head=model.head, ...)

used by ``snlp_solve`` (training, validation, metrics) and by the decoder's prefill / decode
(``export.decoder``), which differ only in what they pass: the solver runs each prefix block
through its own module call and builds the chunk stack per call; the decoder passes its
pre-stacked inference weights and a KV cache.

One iteration evaluates all C chunks at their old inputs in one batched call, F_c(x_{c-1}^old),
and a surrogate solves the correction recurrence (``surrogates.py``); with K = C the result equals
the chunk-sequential forward (the sequential model when M = 1). Shapes: h (B, T, n, D); chunk
states (C, B, T, n, D).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..models import BlockInputs, WideBlocks
from ..models.kv_cache import KVCache
from .plan import PlanError, SolverPlan
from .surrogates import Surrogate


class SolverDivergence(FloatingPointError):
    """A solver iterate became NaN or infinite."""


@dataclass
class SolveResult:
    logits: Tensor
    states: Tensor | None  # final chunk outputs (C, B, T, n, D); None when every block ran sequentially
    trace: list[Tensor] | None = None
    residuals: list[float] | None = None


def chunk_sequential(chunks: WideBlocks, h_init: Tensor, inputs: BlockInputs, cache: KVCache | None = None) -> Tensor:
    """The fixed point of a fused plan: chunks one after another. h_init: (B, T, n, D) -> (C, B, T, n, D)."""
    states, x = [], h_init
    for c in range(chunks.groups):
        x = chunks.select(c)(x.unsqueeze(0), inputs, cache)[0].squeeze(0)
        states.append(x)
    return torch.stack(states)


def full_causal(chunks: WideBlocks, length: int) -> WideBlocks:
    """The stack with every window widened to cover ``length`` positions (plain causal attention,
    ``is_causal=True``): the authors' batched solvers' attention, the plan option ``aw``."""
    windows = tuple(tuple(max(w, length) for w in row) for row in chunks.windows)
    return dataclasses.replace(chunks, windows=windows)


def _check_finite(x: Tensor, plan: SolverPlan, k: int) -> None:
    # A host sync: skipped inside compiled graphs and while a CUDA graph is being captured.
    if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if not bool(torch.isfinite(x).all()):
        raise SolverDivergence(f"plan '{plan}' diverged: NaN/inf in the iterate after iteration {k}")


def _norm(t: Tensor) -> float:
    """Euclidean norm of a whole tensor, accumulated in at least float32."""
    t = t.detach()
    return float(torch.linalg.vector_norm(t.to(torch.promote_types(t.dtype, torch.float32))))


def solve_chunks(
    chunks: WideBlocks,
    surrogate: Surrogate,
    h_init: Tensor,
    inputs: BlockInputs,
    plan: SolverPlan,
    trace: bool = False,
    residuals: bool = False,
    cache: KVCache | None = None,
) -> tuple[Tensor, list[Tensor] | None, list[float] | None]:
    """K iterations of the SNLP update over C chunks. h_init: (B, T, n, D).

    Returns (final chunk outputs (C, B, T, n, D), iterates or None, residual norms or None). With a
    cache, every iteration writes its iterate's k, v at the new positions (spec section 6).
    """
    count = chunks.groups
    first = h_init.unsqueeze(0)
    if plan.init == "batch_fwd":
        x, _ = chunks(first.expand(count, *h_init.shape), inputs, cache)
    else:
        x = first.expand(count, *h_init.shape)
    iterates = [x] if trace else None
    norms: list[float] | None = [] if residuals else None
    for k in range(plan.iters):
        x_in = torch.cat([first, x[:-1]])  # chunk c reads chunk c-1's old output
        f_out, info = surrogate.evaluate(chunks, x_in, inputs, cache)
        base = f_out - x
        if norms is not None:
            norms.append(_norm(base))
        x = x + surrogate.correct(base, info, chunks, x_in, inputs)
        _check_finite(x, plan, k + 1)
        if iterates is not None:
            iterates.append(x)
    if norms is not None:
        f_out, _ = chunks(torch.cat([first, x[:-1]]), inputs)
        norms.append(_norm(f_out - x))
    return x, iterates, norms


def execute(
    plan: SolverPlan,
    inputs: BlockInputs,
    h: Tensor,
    *,
    layer: Callable[[int, Tensor], Tensor],
    chunks: Callable[[], WideBlocks],
    head: Callable[[Tensor, Tensor | None], Tensor],
    n_layer: int,
    backout_layer: int,
    surrogate: Surrogate | None = None,
    cache: KVCache | None = None,
    exact: bool = False,
    trace: bool = False,
    residuals: bool = False,
) -> SolveResult:
    """Logits of ``plan`` from the embedding h (B, T, n, D).

    layer(l, h): block l on h (the prefix, and every block when ``exact``); chunks(): the plan's C
    wide blocks; head(h_last, h_backout): the logits. ``surrogate`` None runs the parallel part to
    its fixed point (chunks one after another: prefill, and 'seq' plans). With a cache, a solve
    ends by writing every chunk's k, v from its final corrected input (spec section 6). A plan
    with ``authors_windows`` gets the chunk stack with full causal windows (``full_causal``).
    """
    if plan.authors_windows and cache is not None:
        raise PlanError(f"plan '{plan}': authors_windows (aw) is an evaluation switch of full forwards, not of KV-cached decoding")
    count = n_layer if exact or plan.n_par == 0 else plan.prefix_len(n_layer)
    backout = None
    for l in range(count):
        h = layer(l, h)
        if l == backout_layer:
            backout = h
    if count == n_layer:
        return SolveResult(logits=head(h, backout), states=None)
    stack = chunks()
    if plan.authors_windows:
        stack = full_causal(stack, h.size(1))
    iterates = norms = None
    if surrogate is None:
        states = chunk_sequential(stack, h, inputs, cache)
    else:
        states, iterates, norms = solve_chunks(stack, surrogate, h, inputs, plan, trace, residuals, cache)
        if cache is not None:
            stack.write_cache(torch.cat([h.unsqueeze(0), states[:-1]]), inputs, cache)
    if backout_layer >= count:
        # The first chunk whose last block is at or past L // 2 provides the backout state.
        backout = states[(backout_layer - count) // plan.fuse]
    return SolveResult(logits=head(states[-1], backout), states=states, trace=iterates, residuals=norms)
