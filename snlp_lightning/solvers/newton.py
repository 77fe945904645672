"""The SNLP solver API (spec section 2): S sequential blocks, then K batched parallel iterations.

    result = snlp_solve(model, tokens, SolverPlan.parse("idn:n8:4xF2:K2"), trace=True)
    result.logits       (B, T, vocab)
    result.trace        [x^(0), ..., x^(K)], each (C, B, T, n, D): chunk outputs per iterate
    result.residuals    [||G(x^(0))||, ..., ||G(x^(K))||], G_c(x) = x_c - F_c(x_{c-1})

The work is ``executor.execute``; here the model supplies its blocks (each prefix block through
its own module call) and the chunk stack, built from the live (differentiable) weights per call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models import GPT
from .executor import SolveResult, SolverDivergence, execute
from .plan import SolverPlan
from .surrogates import make_surrogate

__all__ = ["SolveResult", "SolverDivergence", "snlp_forward", "snlp_solve"]


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
    n_layer = model.config.n_layer
    inputs, h = model.embed(tokens)
    return execute(
        plan, inputs, h,
        layer=lambda l, x: model.block(l, x, inputs)[0],
        chunks=lambda: model.stack(plan.chunk_layers(n_layer), plan.average_branches),
        head=model.head,
        n_layer=n_layer,
        backout_layer=model.backout_layer,
        surrogate=None if plan.method == "seq" else make_surrogate(plan, generator),
        trace=trace,
        residuals=residuals,
    )


def snlp_forward(model: GPT, tokens: Tensor, plan: SolverPlan | str, generator: torch.Generator | None = None) -> Tensor:
    """Logits (B, T, vocab) of ``model`` on ``tokens`` (B, T) under the solver ``plan``."""
    return snlp_solve(model, tokens, plan, generator=generator).logits
