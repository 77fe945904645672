"""SNLP-aware regularization (spec section 4, details of section 9).

For each N in ``n_par_configs`` the sequential trace gives h_init = h_S (S = L - N); the N suffix
blocks are evaluated on h_init in ONE batched call, a K = 1, h0-init surrogate step builds the
corrected states, and the relative error against the sequential states is penalised:

    term = sum_N sum_j mean_{b,t(,stream)} ||xhat_j - h_{S+j+1}|| / max(||h_{S+j+1}||, 1e-6)

(float32). Compared suffix indices j (from 0): ``(j + 1) % stride == 0 or j == N - 1``, j >= 1.
Total loss: CE + w(step) * (lambda_idn L_idn + lambda_hcn L_hcn + lambda_diag L_diag + lambda_jacobi L_jacobi).

``per_block=True`` evaluates the N suffix blocks one ``model.block`` call each instead of one batched
call over stacked weights: the same values, but every block runs through its own module call, so
FSDP (one unit per Block) gathers that block's sharded parameters for it.

Options the authors' code has (nanochat-snlp ``GPT.forward`` / ``base_train.py``), off by default:

- ``diag_estimator``: how DiagN estimates diag(J_j): ``"fd"`` (finite difference, clamped to [-2, 2])
  or ``"vjp"`` (backward-mode Hutchinson ``z * (J_j^T z)`` by ``torch.autograd.grad`` w.r.t. the
  pre-blend h_init, detached, not clamped). ``diag_stride`` s: only suffix blocks with j % s == 0
  are estimated; the others use J ~ I (the IDN step: d_j = base_j + d_{j-1}).
- ``lambda_jacobi``: the contractive regularizer, per block l of the sequential forward, with x the
  block's input AFTER its lambda blend and f the block without the blend (``model.block(...,
  blended=True)``): sigma_l = mean_{b,t(,stream)} ||(f(x + eps v) - f(x)) / eps|| (no grad, eps 1e-2,
  v a random unit vector per token), and when sigma_l > 0.9 the penalty
  min(sigma_l, 3) * mean ||F(h_l) - x|| / (||x|| + 1e-6) on the main path (F(h_l) = h_{l+1} of the
  trace); L_jacobi = sum_l penalty_l / n_layer, weighted by w(t) like the other terms. The vectors
  (n_layer x the hidden-state size per step) are drawn on the CPU like the DiagN probes.
  Under ``compile: true`` the Jacobi term stays in the one graph; the VJP estimator's
  ``torch.autograd.grad`` breaks the graph (same values, several graphs).
- ``spectral_norm``: torch's spectral-norm parametrization on every linear layer of the blocks
  (``apply_spectral_norm``); checkpoints then hold ``...parametrizations.weight.original`` and the
  power-iteration vectors; ``fold_spectral_norm`` turns such a state dict into a plain one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from .config import ConfigError, ModelConfig
from .models import GPT, BlockInputs
from .solvers.surrogates import linear_scan, rademacher

DIAG_EPS = 1e-2
DIAG_CLAMP = 2.0
DIAG_ESTIMATORS = ("fd", "vjp")
JACOBI_EPS = 1e-2  # finite-difference step of the Jacobi gain estimate
JACOBI_THRESHOLD = 0.9  # a block is penalised only when its estimated gain exceeds this
JACOBI_MAX_WEIGHT = 3.0  # the penalty weight min(sigma, 3)
JACOBI_SEED_OFFSET = 1 << 40  # the Jacobi vectors' generator seed = the DiagN probes' seed + this


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
    diag_estimator: str = "fd"  # DiagN diag(J): "fd" finite difference (clamped) | "vjp" z * (J^T z) by autograd
    diag_stride: int = 1  # DiagN estimates diag(J_j) only for suffix blocks j % diag_stride == 0; others J ~ I
    lambda_jacobi: float = 0.0  # the authors' contractive (Jacobi) regularizer, see the module docstring
    spectral_norm: bool = False  # spectral-norm parametrization on every linear layer of the blocks

    @property
    def active(self) -> bool:
        return any(x != 0.0 for x in (self.lambda_idn, self.lambda_hcn, self.lambda_diag, self.lambda_jacobi))

    def validate(self, cfg: ModelConfig) -> "RegularizerConfig":
        for name in ("lambda_idn", "lambda_hcn", "lambda_diag", "lambda_jacobi"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ConfigError(f"regularizer {name}={value} is not allowed: must be a finite number >= 0")
        if self.lambda_hcn and not cfg.use_mhc:
            raise ConfigError("regularizer lambda_hcn > 0 needs an mHC model (use_mhc=True); use lambda_idn or lambda_diag")
        if self.stride < 0:
            raise ConfigError(f"regularizer stride={self.stride} is not allowed: 0 (last block only) or a positive integer")
        if self.diag_estimator not in DIAG_ESTIMATORS:
            raise ConfigError(f"regularizer diag_estimator={self.diag_estimator!r} is not allowed: one of 'fd', 'vjp'")
        if isinstance(self.diag_stride, bool) or not isinstance(self.diag_stride, int) or self.diag_stride < 1:
            raise ConfigError(
                f"regularizer diag_stride={self.diag_stride!r} is not allowed: a positive integer (1 = estimate diag(J) of every block)"
            )
        if not isinstance(self.spectral_norm, bool):
            raise ConfigError(f"regularizer spectral_norm={self.spectral_norm!r} is not allowed: true or false")
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


def _block_outputs(model: GPT, inputs: BlockInputs, layers: list[int], x: Tensor, per_block: bool = False):
    """F_{layers[g]}(x[g]) for x (G, B, T, n, D): (G, B, T, n, D), and the A's (G, b, t, n, n) or None."""
    if per_block:
        outs, mixing = zip(*(model.block(layer, x[g], inputs) for g, layer in enumerate(layers)))
        return torch.stack(outs), None if mixing[0] is None else torch.stack(mixing)
    return model.stack([[layer] for layer in layers])(x, inputs)


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


def diag_estimated(n_par: int, diag_stride: int) -> list[int]:
    """Suffix indices j whose diag(J_j) DiagN estimates: j % diag_stride == 0 (all for stride 1);
    the others use J ~ I. (j = 0 is estimated like in the authors' code but never used.)"""
    return [j for j in range(n_par) if diag_stride <= 1 or j % diag_stride == 0]


def diag_term(
    model: GPT,
    inputs: BlockInputs,
    trace: list[Tensor],
    n_par: int,
    z: Tensor,
    per_block: bool = False,
    estimator: str = "fd",
    diag_stride: int = 1,
) -> Tensor:
    """DiagN K = 1 with one Rademacher z (B, T, n, D) shared by the N blocks; compares the last block, detached.

    diag(J_j) of the estimated blocks (``diag_estimated``), no gradient: ``"fd"`` clamp(z (F_j(h + eps z)
    - F_j(h)) / eps, -2, 2); ``"vjp"`` z * (J_j^T z), J_j the Jacobian of F_j (with its blend) at h_init.
    The other blocks take the IDN step (diag = 1).
    """
    L = model.config.n_layer
    start = L - n_par
    h_init = trace[start]
    outs, _ = _suffix_outputs(model, inputs, h_init, start, per_block)
    z = z.to(device=h_init.device, dtype=h_init.dtype)
    estimated = diag_estimated(n_par, diag_stride)
    layers = [start + j for j in estimated]
    if estimator == "vjp":
        diag = _vjp_diagonals(model, inputs, h_init, z, layers, per_block)
    else:
        with torch.no_grad():
            if len(estimated) == n_par:  # every block: one call on the shared perturbed input
                perturbed, _ = _suffix_outputs(model, inputs, h_init + DIAG_EPS * z, start, per_block)
                base = outs.detach()
            else:
                shifted = (h_init + DIAG_EPS * z).unsqueeze(0).expand(len(layers), *h_init.shape)
                perturbed, _ = _block_outputs(model, inputs, layers, shifted, per_block)
                base = outs.detach()[estimated]
            wide = torch.promote_types(outs.dtype, torch.float32)
            diag = (z * (perturbed.to(wide) - base.to(wide)) / DIAG_EPS).clamp(-DIAG_CLAMP, DIAG_CLAMP).to(outs.dtype)
    row = {j: i for i, j in enumerate(estimated)}
    corrected = h_init + linear_scan(outs - h_init, lambda c, d: diag[row[c]] * d if c in row else d)
    return relative_error(corrected[-1], trace[L].detach())


def _vjp_diagonals(model: GPT, inputs: BlockInputs, h_init: Tensor, z: Tensor, layers: list[int], per_block: bool) -> Tensor:
    """z * (J_l^T z) for each layer l of ``layers``, J_l = dF_l/dh at h_init: (len(layers), B, T, n, D), detached.

    Each block gets its own copy of h_init (a leaf), so one backward pass gives every block's VJP.
    """
    with torch.enable_grad():
        x = h_init.detach().unsqueeze(0).repeat(len(layers), *([1] * h_init.dim())).requires_grad_(True)
        out, _ = _block_outputs(model, inputs, layers, x, per_block)
        (vjp,) = torch.autograd.grad(out, x, grad_outputs=z.unsqueeze(0).expand_as(out))
    return (z * vjp).detach()


def jacobi_term(model: GPT, inputs: BlockInputs, trace: list[Tensor], vectors: Tensor) -> Tensor:
    """The authors' contractive regularizer (module docstring): sum_l [sigma_l > 0.9] min(sigma_l, 3) r_l / L.

    vectors: (L, B, T, n, D) random unit vectors (norm 1 over D per token), one per block. Every block
    is evaluated through its own module call (``model.block(..., blended=True)``), one call on the
    doubled batch [x + eps v, x] per block, under no_grad. The authors read sigma with ``.item()``
    (a host sync per block) and branch in Python; ``torch.where`` gives the same values with no
    sync and no data-dependent branch (one compiled graph).
    """
    L = model.config.n_layer
    wide = torch.promote_types(trace[-1].dtype, torch.float32)
    zero = trace[-1].new_zeros((), dtype=wide)
    total = zero
    for layer in range(L):
        x = model.blend(layer, trace[layer], inputs)  # the block's input after its blend (with grad)
        residual = (trace[layer + 1] - x).to(wide).norm(dim=-1) / (x.to(wide).norm(dim=-1) + 1e-6)
        penalty = residual.mean()
        with torch.no_grad():
            v = vectors[layer].to(device=x.device, dtype=x.dtype)
            both, _ = model.block(layer, torch.cat([x + JACOBI_EPS * v, x]), inputs, blended=True)
            perturbed, base = both.chunk(2)
            sigma = ((perturbed - base) / JACOBI_EPS).to(wide).norm(dim=-1).mean()
        total = total + torch.where(sigma > JACOBI_THRESHOLD, sigma.clamp(max=JACOBI_MAX_WEIGHT) * penalty, zero)
    return total / L


def jacobi_vectors(shape: tuple[int, ...], count: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """``count`` Gaussian vectors of ``shape`` (B, T, n, D), normalised to norm 1 over D per token:
    (count, B, T, n, D), float32.

    By default drawn on the CPU from a CPU ``generator`` (device-independent values). ``device``
    (e.g. "cuda"): drawn on that device from ``generator``, which must then be a generator of that
    device; the values depend on the device type (the same seed gives other vectors than on the CPU).
    """
    v = torch.randn((count, *shape), generator=generator, device="cpu" if device is None else device)
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def diag_probes(shape: tuple[int, ...], count: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """``count`` Rademacher probes of ``shape`` (B, T, n, D), one per N config: (count, B, T, n, D), float32.

    By default drawn in order from ``generator`` on the CPU, so the values do not depend on the
    device. ``device`` (e.g. "cuda"): drawn on that device from ``generator``, a generator of that
    device, with no host copy; the values then depend on the device type.
    """
    if device is not None and torch.device(device).type != "cpu":
        bits = torch.randint(0, 2, (count, *shape), generator=generator, device=device)
        return (bits * 2 - 1).to(torch.float32)
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
    vectors: Tensor | None = None,
) -> dict[str, Tensor]:
    """The weighted regularizer terms from a sequential trace [h_0..h_L] (each (B, T, n, D)).

    DiagN probes: ``probes`` (len(n_par_configs), B, T, n, D) if given (e.g. drawn outside a compiled
    graph), else drawn from ``generator`` with ``diag_probes``. Jacobi vectors: ``vectors``
    (n_layer, B, T, n, D) if given, else drawn from ``generator`` (after the probes) with
    ``jacobi_vectors``. ``per_block``: see the module docstring.
    Returns {"idn", "hcn", "diag", "jacobi", "total": sum_k lambda_k L_k} (float32); a term whose
    lambda is 0 is not computed (returned as 0).
    """
    zero = trace[-1].new_zeros((), dtype=torch.promote_types(trace[-1].dtype, torch.float32))
    terms = {"idn": zero, "hcn": zero, "diag": zero, "jacobi": zero}
    n_list = cfg.n_par_list(model.config.n_layer)
    if cfg.lambda_idn:
        terms["idn"] = sum((idn_term(model, inputs, trace, n, cfg.stride, cfg.detach, per_block) for n in n_list), zero)
    if cfg.lambda_hcn:
        terms["hcn"] = sum((hcn_term(model, inputs, trace, n, cfg.stride, cfg.detach, per_block) for n in n_list), zero)
    if cfg.lambda_diag:
        if probes is None:
            probes = diag_probes(tuple(trace[0].shape), len(n_list), generator)
        terms["diag"] = sum(
            (diag_term(model, inputs, trace, n, z, per_block, cfg.diag_estimator, cfg.diag_stride) for n, z in zip(n_list, probes)),
            zero,
        )
    if cfg.lambda_jacobi:
        if vectors is None:
            vectors = jacobi_vectors(tuple(trace[0].shape), model.config.n_layer, generator)
        terms["jacobi"] = jacobi_term(model, inputs, trace, vectors)
    terms["total"] = cfg.lambda_idn * terms["idn"] + cfg.lambda_hcn * terms["hcn"] + cfg.lambda_diag * terms["diag"]
    if cfg.lambda_jacobi:
        terms["total"] = terms["total"] + cfg.lambda_jacobi * terms["jacobi"]
    return terms


# -- spectral normalisation (the authors' --spectral-norm) ----------------------------------------
def _block_linears(model: GPT) -> list[tuple[str, nn.Module]]:
    return [
        (f"transformer.h.{i}.{name}", module)
        for i, block in enumerate(model.transformer.h)
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    ]


def spectral_norm_targets(model: GPT) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear inside the blocks whose weight has more than one row and
    no parametrization yet (the authors' rule: ``weight.shape[0] > 1``)."""
    return [(n, m) for n, m in _block_linears(model) if not parametrize.is_parametrized(m, "weight") and m.weight.shape[0] > 1]


def spectral_normalized(model: GPT) -> list[tuple[str, nn.Module]]:
    """(name, module) of the linear layers of the blocks that carry a weight parametrization."""
    return [(n, m) for n, m in _block_linears(model) if parametrize.is_parametrized(m, "weight")]


def apply_spectral_norm(model: GPT) -> int:
    """Put torch's spectral-norm parametrization (1 power iteration per weight access in training
    mode) on every linear layer of the blocks with more than one row; returns how many.

    The authors apply the old ``torch.nn.utils.spectral_norm`` hook; the parametrization computes
    the same W / (u^T W v) and converges to the same W / sigma_max(W). It differs in the order of
    the two half-steps of an iteration (u first, the hook v first) and in running 15 iterations
    when registered. The blocks read ``.weight`` once per call (when a stack is built), so, like
    the hook, every block evaluation in training mode advances the iteration once.

    A weight that is all zero when registered (nanochat zero-initialises the output projections)
    leaves u = v = 0 after those 15 iterations, for good; such vectors are re-drawn at random (as
    the hook draws them), so weights loaded or set later (a checkpoint, ``init_from``) still
    converge. A zero weight itself has sigma = 0 and a NaN normalised weight: see
    ``check_spectral_norm``.
    """
    targets = spectral_norm_targets(model)
    for _, module in targets:
        parametrizations.spectral_norm(module, n_power_iterations=1)
        sn = module.parametrizations.weight[0]
        with torch.no_grad():
            for vec in (sn._u, sn._v):
                if not bool(vec.any()):
                    vec.copy_(F.normalize(torch.randn_like(vec), dim=0, eps=sn.eps))
    return len(targets)


def check_spectral_norm(model: GPT) -> None:
    """A ConfigError naming the all-zero weights of a spectral-norm model: their normalised weight is
    0 / 0 = NaN (the authors' --spectral-norm from a fresh init fails the same way, silently)."""
    zero = [
        name
        for name, module in spectral_normalized(model)
        if not bool(module.parametrizations.weight.original.any())
    ]
    if zero:
        raise ConfigError(
            f"regularizer spectral_norm=true cannot normalise all-zero weights ({', '.join(zero[:3])}"
            + (f" ... {len(zero)} in all" if len(zero) > 3 else "")
            + "; nanochat zero-initialises the output projections): start from trained weights (model.init_from or a checkpoint)"
        )


def fold_spectral_norm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict of a spectral-norm model with plain weights: every ``P.parametrizations.weight.original``
    with its ``P.parametrizations.weight.0._u`` / ``._v`` becomes ``P.weight`` = original / (u . original v),
    the weight the model uses in eval mode; other entries are kept. A plain state dict comes back unchanged.
    (For export / loading into a model built without spectral norm, e.g. ``export.checkpoint.load_model``.)
    """
    suffix = ".parametrizations.weight.original"
    out = {}
    for key, value in state.items():
        if key.endswith(suffix):
            prefix = key[: -len(suffix)]
            u, v = state[f"{prefix}.parametrizations.weight.0._u"], state[f"{prefix}.parametrizations.weight.0._v"]
            sigma = torch.vdot(u, torch.mv(value.flatten(1), v))
            out[f"{prefix}.weight"] = value / sigma
        elif ".parametrizations.weight.0._" not in key:
            out[key] = value
    return out
