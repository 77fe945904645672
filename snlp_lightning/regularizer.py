"""SNLP-aware regularization (spec section 4, details of section 9).

For each N in ``n_par_configs`` the sequential trace gives h_init = h_S (S = L - N); the N suffix
blocks are evaluated on h_init in ONE batched call, a K = 1, h0-init surrogate step builds the
corrected states, and the relative error against the sequential states is penalised:

    term = sum_N sum_j mean_{b,t(,stream)} ||xhat_j - h_{S+j+1}|| / max(||h_{S+j+1}||, 1e-6)

(float32). Compared suffix indices j (from 0): ``(j + 1) % stride == 0 or j == N - 1``, j >= 1.
Total loss: CE + w(step) * (lambda_idn L_idn + lambda_hcn L_hcn + lambda_diag L_diag).

``per_block=True`` evaluates the N suffix blocks one ``model.block`` call each instead of one batched
call over stacked weights: the same values, but every block runs through its own module call, so
FSDP (one unit per Block) gathers that block's sharded parameters for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import ConfigError, ModelConfig
from .models import GPT, BlockInputs
from .solvers.surrogates import linear_scan, rademacher

DIAG_EPS = 1e-2
DIAG_CLAMP = 2.0


@dataclass(frozen=True)
class RegularizerConfig:
    """Weights and shape of the SNLP regularizer. All lambdas 0 = plain CE training (the baseline)."""

    lambda_idn: float = 0.0
    lambda_hcn: float = 0.0
    lambda_diag: float = 0.0
    n_par_configs: list[int] | None = None  # None = the authors' default for the depth
    stride: int = 0  # 0: compare only the last block
    detach: bool = False  # stop gradients through the sequential target (IDN / HCN)
    warmup_fraction: float = 0.2  # w ramps 0 -> 1 over this fraction of the training steps

    @property
    def active(self) -> bool:
        return any(x != 0.0 for x in (self.lambda_idn, self.lambda_hcn, self.lambda_diag))

    def validate(self, cfg: ModelConfig) -> "RegularizerConfig":
        for name in ("lambda_idn", "lambda_hcn", "lambda_diag"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ConfigError(f"regularizer {name}={value} is not allowed: must be a finite number >= 0")
        if self.lambda_hcn and not cfg.use_mhc:
            raise ConfigError("regularizer lambda_hcn > 0 needs an mHC model (use_mhc=True); use lambda_idn or lambda_diag")
        if self.stride < 0:
            raise ConfigError(f"regularizer stride={self.stride} is not allowed: 0 (last block only) or a positive integer")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise ConfigError(f"regularizer warmup_fraction={self.warmup_fraction} is not allowed: must lie in [0, 1]")
        for n in self.n_par_list(cfg.n_layer):
            if not 1 <= n <= cfg.n_layer:
                raise ConfigError(f"regularizer n_par_configs entry {n} is not allowed: each N must lie in 1..{cfg.n_layer}")
        return self

    def n_par_list(self, n_layer: int) -> list[int]:
        if self.n_par_configs is not None:
            return list(self.n_par_configs)
        return default_n_par_configs(n_layer)


def default_n_par_configs(n_layer: int) -> list[int]:
    """The authors' default when none is given: [3, 5, 7, 10, 12, 16] capped by the depth."""
    L = n_layer
    return [3, 5, min(7, L - 1), min(10, L - 1), min(12, L - 1), min(16, L - 2)]


def warmup_weight(step: int, total_steps: int, fraction: float = 0.2) -> float:
    """w(t) = min(1, t / max(int(fraction * total), 1)): 0 at step 0, 1 after the ramp."""
    if fraction == 0.0:
        return 1.0
    return min(1.0, step / max(int(fraction * total_steps), 1))


def relative_error(estimate: Tensor, target: Tensor) -> Tensor:
    """mean over (b, t, stream) of ||estimate - target||_2 / max(||target||_2, 1e-6), in >= float32."""
    dtype = torch.promote_types(target.dtype, torch.float32)
    est, tgt = estimate.to(dtype), target.to(dtype)
    return ((est - tgt).norm(dim=-1) / tgt.norm(dim=-1).clamp(min=1e-6)).mean()


def compared_indices(n_par: int, stride: int) -> list[int]:
    """Suffix indices j >= 1 whose corrected state is compared (stride > 0)."""
    return [j for j in range(1, n_par) if (j + 1) % stride == 0 or j == n_par - 1]


def _suffix_error(corrected: Tensor, trace: list[Tensor], start: int, indices: list[int], detach: bool) -> Tensor:
    """Sum over suffix indices j of the relative error of corrected[j] against h_{start + j + 1}."""
    total = corrected.new_zeros((), dtype=torch.promote_types(corrected.dtype, torch.float32))
    for j in indices:
        target = trace[start + j + 1]
        total = total + relative_error(corrected[j], target.detach() if detach else target)
    return total


def _suffix_outputs(model: GPT, inputs: BlockInputs, h_init: Tensor, first: int, per_block: bool = False):
    """F_j(h_init) for every block j >= first: (N, B, T, n, D), and A_j (N, b, t, n, n) or None.

    One batched call over the stacked weights, or (``per_block``) one ``model.block`` call per block.
    """
    if per_block:
        outs, mixing = zip(*(model.block(layer, h_init, inputs) for layer in range(first, model.config.n_layer)))
        return torch.stack(outs), None if mixing[0] is None else torch.stack(mixing)
    layers = [[layer] for layer in range(first, model.config.n_layer)]
    stacked = h_init.unsqueeze(0).expand(len(layers), *h_init.shape)
    return model.stack(layers)(stacked, inputs)


def idn_term(
    model: GPT, inputs: BlockInputs, trace: list[Tensor], n_par: int, stride: int, detach: bool, per_block: bool = False
) -> Tensor:
    L = model.config.n_layer
    start = L - n_par
    h_init = trace[start]
    if stride <= 0:  # only the last block, fed h_init directly: f_L(blend(h_init)) vs h_L
        out, _ = model.block(L - 1, h_init, inputs)
        target = trace[L].detach() if detach else trace[L]
        return relative_error(out, target)
    outs, _ = _suffix_outputs(model, inputs, h_init, start, per_block)
    corrected = h_init + torch.cumsum(outs - h_init, dim=0)  # IDN, K = 1, h0 init
    return _suffix_error(corrected, trace, start, compared_indices(n_par, stride), detach)


def hcn_term(
    model: GPT, inputs: BlockInputs, trace: list[Tensor], n_par: int, stride: int, detach: bool, per_block: bool = False
) -> Tensor:
    L = model.config.n_layer
    start = L - n_par
    h_init = trace[start]
    outs, mixing = _suffix_outputs(model, inputs, h_init, start, per_block)  # mixing: differentiable H_res products
    deltas = linear_scan(outs - h_init, lambda c, d: torch.matmul(mixing[c], d))
    corrected = h_init + deltas
    indices = compared_indices(n_par, stride) if stride > 0 else [n_par - 1]
    return _suffix_error(corrected, trace, start, indices, detach)


def diag_term(model: GPT, inputs: BlockInputs, trace: list[Tensor], n_par: int, z: Tensor, per_block: bool = False) -> Tensor:
    """DiagN K = 1 with one Rademacher z (B, T, n, D) shared by the N blocks; compares the last block, detached."""
    L = model.config.n_layer
    start = L - n_par
    h_init = trace[start]
    outs, _ = _suffix_outputs(model, inputs, h_init, start, per_block)
    z = z.to(device=h_init.device, dtype=h_init.dtype)
    with torch.no_grad():
        perturbed, _ = _suffix_outputs(model, inputs, h_init + DIAG_EPS * z, start, per_block)
        wide = torch.promote_types(outs.dtype, torch.float32)
        diag = (z * (perturbed.to(wide) - outs.detach().to(wide)) / DIAG_EPS).clamp(-DIAG_CLAMP, DIAG_CLAMP).to(outs.dtype)
    corrected = h_init + linear_scan(outs - h_init, lambda c, d: diag[c] * d)
    return relative_error(corrected[-1], trace[L].detach())


def diag_probes(shape: tuple[int, ...], count: int, generator: torch.Generator | None = None) -> Tensor:
    """``count`` Rademacher probes of ``shape`` (B, T, n, D), one per N config: (count, B, T, n, D), float32, CPU.

    Drawn in order from ``generator`` on the CPU, so the values do not depend on the device.
    """
    like = torch.empty(()).expand(*shape)  # shape only, no memory
    return torch.stack([rademacher(like, generator) for _ in range(count)])


def snlp_regularizer(
    model: GPT,
    inputs: BlockInputs,
    trace: list[Tensor],
    cfg: RegularizerConfig,
    generator: torch.Generator | None = None,
    probes: Tensor | None = None,
    per_block: bool = False,
) -> dict[str, Tensor]:
    """The weighted regularizer terms from a sequential trace [h_0..h_L] (each (B, T, n, D)).

    DiagN probes: ``probes`` (len(n_par_configs), B, T, n, D) if given (e.g. drawn outside a compiled
    graph), else drawn from ``generator`` with ``diag_probes``. ``per_block``: see the module docstring.
    Returns {"idn": L_idn, "hcn": L_hcn, "diag": L_diag, "total": sum_k lambda_k L_k} (float32);
    a term whose lambda is 0 is not computed (returned as 0).
    """
    zero = trace[-1].new_zeros((), dtype=torch.promote_types(trace[-1].dtype, torch.float32))
    terms = {"idn": zero, "hcn": zero, "diag": zero}
    n_list = cfg.n_par_list(model.config.n_layer)
    if cfg.lambda_idn:
        terms["idn"] = sum((idn_term(model, inputs, trace, n, cfg.stride, cfg.detach, per_block) for n in n_list), zero)
    if cfg.lambda_hcn:
        terms["hcn"] = sum((hcn_term(model, inputs, trace, n, cfg.stride, cfg.detach, per_block) for n in n_list), zero)
    if cfg.lambda_diag:
        if probes is None:
            probes = diag_probes(tuple(trace[0].shape), len(n_list), generator)
        terms["diag"] = sum((diag_term(model, inputs, trace, n, z, per_block) for n, z in zip(n_list, probes)), zero)
    terms["total"] = cfg.lambda_idn * terms["idn"] + cfg.lambda_hcn * terms["hcn"] + cfg.lambda_diag * terms["diag"]
    return terms
