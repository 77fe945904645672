"""The surrogate Jacobians A_c of the SNLP update (spec section 2, checked in section 9).

One iteration evaluates all chunks at their old inputs in one batched call, F_c(x_{c-1}^old), then
solves the correction recurrence for the change of every chunk output, d_c = x_c^new - x_c^old:

    d_c = (F_c(x_{c-1}^old) - x_c^old) + A_c d_{c-1},     d_0 = 0 (h_init is exact)

A surrogate supplies the batched evaluation (with whatever it needs to know about A_c) and
``A_c @ d``. Shapes: chunk states are (C, B, T, n, D).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..models import BlockInputs, WideBlocks
from ..models.kv_cache import KVCache
from .plan import SolverPlan


def linear_scan(base: Tensor, apply_a: Callable[[int, Tensor], Tensor]) -> Tensor:
    """d_0 = base_0, d_c = base_c + A_c d_{c-1}, left to right over axis 0."""
    out = [base[0]]
    for c in range(1, base.size(0)):
        out.append(base[c] + apply_a(c, out[-1]))
    return torch.stack(out)


def rademacher(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Random +-1 entries shaped like ``like`` (drawn on the CPU so a CPU generator seeds them)."""
    bits = torch.randint(0, 2, like.shape, generator=generator, device="cpu")
    return (bits * 2 - 1).to(device=like.device, dtype=like.dtype)


class Surrogate:
    """Identity Newton (IDN): A = I, so the recurrence is a prefix sum over depth."""

    def evaluate(self, blocks: WideBlocks, x_in: Tensor, inputs: BlockInputs, cache: KVCache | None = None):
        """x_in: (C, B, T, n, D) chunk inputs -> (F(x_in), what ``correct`` needs to apply A)."""
        return blocks(x_in, inputs, cache)

    def correct(self, base: Tensor, info, blocks: WideBlocks, x_in: Tensor, inputs: BlockInputs) -> Tensor:
        return torch.cumsum(base, dim=0)


class Damped(Surrogate):
    """A = (1 - kappa) I; kappa = 1 is the fixed-point (Jacobi / Picard) iteration."""

    def __init__(self, kappa: float):
        self.keep = 1.0 - kappa

    def correct(self, base, info, blocks, x_in, inputs):
        if self.keep == 0.0:
            return base
        if self.keep == 1.0:
            return torch.cumsum(base, dim=0)
        return linear_scan(base, lambda c, d: self.keep * d)


class HyperConnectionNewton(Surrogate):
    """HCN: A_c = H_res_mlp,c @ H_res_attn,c acting on the stream axis (evaluated at the old input)."""

    def correct(self, base, info, blocks, x_in, inputs):
        return linear_scan(base, lambda c, d: torch.matmul(info[c], d))


class DiagonalNewton(Surrogate):
    """DiagN: A_c = diag(J_c) by Hutchinson probes z (Rademacher, drawn per chunk and iteration).

    ``fd``: z * (F(x + eps z) - F(x)) / eps, with F(x) and F(x + eps z) in one doubled batched call.
    ``vjp``: z * (J^T z) by reverse-mode autograd (needs grad mode, not inference_mode). No clamp.
    """

    def __init__(self, probes: int, eps: float, estimator: str, generator: torch.Generator | None = None):
        self.probes, self.eps, self.estimator, self.generator = probes, eps, estimator, generator

    def evaluate(self, blocks, x_in, inputs, cache=None):
        if cache is not None:
            raise ValueError("DiagN evaluates doubled batches; it does not decode over a KV cache")
        probes = [rademacher(x_in, self.generator) for _ in range(self.probes)]
        if self.estimator == "fd":
            batch = x_in.size(1)
            stacked = torch.cat([x_in] + [x_in + self.eps * z for z in probes], dim=1)
            out, _ = blocks(stacked, inputs)
            f_x = out[:, :batch]
            diags = [z * (out[:, (i + 1) * batch : (i + 2) * batch] - f_x) / self.eps for i, z in enumerate(probes)]
            return f_x, torch.stack(diags).mean(0)
        with torch.enable_grad():
            x_req = x_in.detach().requires_grad_(True)
            f_req, _ = blocks(x_req, inputs)
            diags = []
            for i, z in enumerate(probes):
                (jtz,) = torch.autograd.grad(f_req, x_req, z, retain_graph=i + 1 < len(probes))
                diags.append(z * jtz)
        f_x, _ = blocks(x_in, inputs)  # differentiable F for the caller's graph
        return f_x, torch.stack(diags).mean(0).detach()

    def correct(self, base, info, blocks, x_in, inputs):
        return linear_scan(base, lambda c, d: info[c] * d)


class ExactNewton(Surrogate):
    """A_c = J_c applied by a forward-mode Jacobian-vector product: sequential over c (reference)."""

    def correct(self, base, info, blocks, x_in, inputs):
        def jvp(c: int, d: Tensor) -> Tensor:
            chunk = blocks.select(c)
            # A private input cache, so nothing built inside the transform is kept outside it.
            local = inputs.private()
            fn = lambda x: chunk(x.unsqueeze(0), local)[0].squeeze(0)  # noqa: E731
            # Forward-mode AD through attention exists only in SDPA's math kernel.
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.jvp(fn, (x_in[c],), (d,))[1]

        return linear_scan(base, jvp)


def make_surrogate(plan: SolverPlan, generator: torch.Generator | None = None) -> Surrogate:
    if plan.method == "idn":
        return Surrogate()
    if plan.method == "fixed":
        return Damped(1.0)
    if plan.method == "damped":
        return Damped(plan.kappa)
    if plan.method == "hcn":
        return HyperConnectionNewton()
    if plan.method == "diagn":
        return DiagonalNewton(plan.probes, plan.eps, plan.estimator, generator)
    if plan.method == "newton":
        return ExactNewton()
    raise ValueError(f"method {plan.method!r} has no surrogate (it is not an iterative method)")
