"""The SNLP solver loop (spec section 2): S sequential blocks, then K batched parallel iterations.

    result = snlp_solve(model, tokens, SolverPlan.parse("idn:n8:4xF2:K2"), trace=True)
    result.logits       (B, T, vocab)
    result.trace        [x^(0), ..., x^(K)], each (C, B, T, n, D): chunk outputs per iterate
    result.residuals    [||G(x^(0))||, ..., ||G(x^(K))||], G_c(x) = x_c - F_c(x_{c-1})

Every iteration evaluates all C chunks in one batched call; with K = C the result equals the
chunk-sequential forward (the sequential model when M = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.gpt import GPT
from ..models.stack import BlockInputs, WideBlocks, wide_block_forward
from .plan import SolverPlan
from .surrogates import Surrogate, make_surrogate


class SolverDivergence(FloatingPointError):
    """A solver iterate became NaN or infinite."""


@dataclass
class SolveResult:
    logits: Tensor
    states: Tensor | None  # final chunk outputs (C, B, T, n, D); None for the plain sequential plan
    trace: list[Tensor] | None = None
    residuals: list[float] | None = None


def _prefix(model: GPT, inputs: BlockInputs, h: Tensor, prefix_len: int) -> tuple[Tensor, Tensor | None]:
    """Run blocks 0..S-1 sequentially; returns (h_S, the backout state if it lies in the prefix)."""
    backout = None
    for layer in range(prefix_len):
        h, _ = model.block(layer, h, inputs)
        if layer == model.backout_layer:
            backout = h
    return h, backout


def chunk_sequential(blocks: WideBlocks, h_init: Tensor, inputs: BlockInputs) -> Tensor:
    """The fixed point of a fused plan: chunks one after another (each writes its KV cache, if it
    has one, on the way). h_init: (B, T, n, D) -> (C, B, T, n, D)."""
    states, x = [], h_init
    for c in range(blocks.groups):
        x = wide_block_forward(blocks.select(c), x.unsqueeze(0), inputs)[0].squeeze(0)
        states.append(x)
    return torch.stack(states)


def _check_finite(x: Tensor, plan: SolverPlan, k: int) -> None:
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
        raise SolverDivergence(f"plan '{plan}' diverged: NaN/inf in the iterate after iteration {k}")


def _norm(t: Tensor) -> float:
    """Euclidean norm of a whole tensor, accumulated in at least float32."""
    t = t.detach()
    return float(torch.linalg.vector_norm(t.to(torch.promote_types(t.dtype, torch.float32))))


def solve_chunks(
    blocks: WideBlocks,
    surrogate: Surrogate,
    h_init: Tensor,
    inputs: BlockInputs,
    plan: SolverPlan,
    trace: bool = False,
    residuals: bool = False,
) -> tuple[Tensor, list[Tensor] | None, list[float] | None]:
    """K iterations of the SNLP update over C chunks. h_init: (B, T, n, D).

    Returns (final chunk outputs (C, B, T, n, D), iterates or None, residual norms or None).
    """
    chunks = blocks.groups
    first = h_init.unsqueeze(0)
    if plan.init == "batch_fwd":
        x, _ = wide_block_forward(blocks, first.expand(chunks, *h_init.shape), inputs)
    else:
        x = first.expand(chunks, *h_init.shape)
    iterates = [x] if trace else None
    norms: list[float] | None = [] if residuals else None
    for k in range(plan.iters):
        x_in = torch.cat([first, x[:-1]])  # chunk c reads chunk c-1's old output
        f_out, info = surrogate.evaluate(blocks, x_in, inputs)
        base = f_out - x
        if norms is not None:
            norms.append(_norm(base))
        x = x + surrogate.correct(base, info, blocks, x_in, inputs)
        _check_finite(x, plan, k + 1)
        if iterates is not None:
            iterates.append(x)
    if norms is not None:
        f_out, _ = wide_block_forward(blocks, torch.cat([first, x[:-1]]), inputs)
        norms.append(_norm(f_out - x))
    return x, iterates, norms


def snlp_solve(
    model: GPT,
    tokens: Tensor,
    plan: SolverPlan | str,
    *,
    trace: bool = False,
    residuals: bool = False,
    generator: torch.Generator | None = None,
) -> SolveResult:
    """Logits of ``model`` on ``tokens`` (B, T) under ``plan``; trace / residuals on request.

    ``generator`` seeds the DiagN probes.
    """
    plan = SolverPlan.parse(plan).validate(model.config)
    if plan.method == "seq" and plan.n_par == 0:
        return SolveResult(logits=model(tokens), states=None)
    n_layer = model.config.n_layer
    prefix_len = plan.prefix_len(n_layer)
    inputs, h = model.embed(tokens)
    h_init, backout = _prefix(model, inputs, h, prefix_len)
    blocks = model.stack(plan.chunk_layers(n_layer), plan.average_branches)
    iterates = norms = None
    if plan.method == "seq":
        states = chunk_sequential(blocks, h_init, inputs)
    else:
        surrogate = make_surrogate(plan, generator)
        states, iterates, norms = solve_chunks(blocks, surrogate, h_init, inputs, plan, trace, residuals)
    if model.backout_layer >= prefix_len:
        # The first chunk whose last block is at or past L // 2 provides the backout state.
        backout = states[(model.backout_layer - prefix_len) // plan.fuse]
    logits = model.head(states[-1], backout)
    return SolveResult(logits=logits, states=states, trace=iterates, residuals=norms)


def snlp_forward(model: GPT, tokens: Tensor, plan: SolverPlan | str, generator: torch.Generator | None = None) -> Tensor:
    """Logits (B, T, vocab) of ``model`` on ``tokens`` (B, T) under the solver ``plan``."""
    return snlp_solve(model, tokens, plan, generator=generator).logits
