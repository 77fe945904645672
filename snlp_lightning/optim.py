"""nanochat's optimizer setup as ONE torch optimizer, and its warmup / warmdown schedules.

Lightning's automatic optimization drives a single optimizer (clipping, accumulation, schedulers
and LearningRateMonitor assume it), so Muon and AdamW live in one optimizer with parameter groups
tagged ``kind``: Muon for the 2-D block matrices, AdamW for the embeddings, the head, the per-layer
scalars and the mHC connections. ``OptimConfig.optimizer`` picks the update:

    muon_adamw  torch's own Muon update (``torch.optim._muon.muon``, reached through
                ``compat.torch_muon``) + this file's AdamW                      (``MuonAdamW``)
    adamw       every parameter on AdamW (e.g. under FSDP)                      (``MuonAdamW``)
    nanochat    the authors' update (their fork's ``nanochat/optim.py``): Nesterov momentum, Polar
                Express orthogonalization, NorMuon variance reduction, cautious weight decay, and
                their AdamW                                                     (``NanochatMuonAdamW``)

One scheduler (``StepSchedule``) sets, every optimizer step, the LR of every group (initial LR x
``lr_multiplier``) and, when the config asks for it, the momentum (``muon_momentum_at``) and weight
decay (``weight_decay_at``) of the Muon groups. ``nanochat_weight_decay`` and the batch-size LR
scaling reproduce the authors' muP-style transfer from their d12 reference (``scripts/base_train.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import compat
from .config import ConfigError, ModelConfig
from .models import GPT, build


# Far above any useful rate, and low enough that lr / (1 - beta1) and lr * weight decay stay finite
# in float32 (a rate of 1e38 made the AdamW step fail with an overflow instead of training).
MAX_LR = 1e6

OPTIMIZERS = ("muon_adamw", "adamw", "nanochat")
WEIGHT_DECAY_SCHEDULES = ("constant", "cosine")
POLAR_DTYPES = ("auto", "float32", "bfloat16")

# The authors' reference batch (their B_REF: the best batch of their d12 model, in tokens), the
# reference depth of their LR / weight-decay transfer, and its tokens : scaling-params ratio.
NANOCHAT_BATCH_REFERENCE = 2**19
NANOCHAT_REFERENCE_DEPTH = 12
NANOCHAT_PARAM_DATA_RATIO = 12.0

# Polar Express coefficients (a, b, c) per iteration, X <- a X + (b A + c A^2) X with A = X X^T,
# for 5 iterations, safety factor 2e-2, cushion 2 (Amsel et al. 2025, arXiv:2505.16932, as
# published and as the authors use them).
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


@dataclass(frozen=True)
class OptimConfig:
    """Learning rates and schedule (nanochat's defaults, AdamW rates scaled by (d / 768)^-0.5).

    The defaults are the quickstart's (``muon_adamw``, constant momentum and weight decay); the
    authors' recipe is ``optimizer: nanochat`` with the schedule and scaling fields below set.
    """

    optimizer: str = "muon_adamw"  # or "adamw": every parameter on AdamW (e.g. under FSDP); or "nanochat"
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    scalar_lr: float = 0.5
    mhc_lr: float = 0.01
    # Weight decay of the matrix groups; with scale_weight_decay it is the reference lambda of the
    # authors' d12 model at B_REF tokens per step (their default 0.28), scaled to this model and batch.
    weight_decay: float = 0.0
    muon_momentum: float = 0.95
    warmup_steps: int = 0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    # Length of the LR schedule and of the regularizer ramp; None = the trainer's step budget.
    # Set it when a run is split into legs (max_steps < the planned length) and resumed.
    schedule_steps: int | None = None
    # -- the authors' recipe (scripts/base_train.py); the defaults leave every optimizer as before --
    # Batch-size LR scaling: > 0 multiplies the LRs of the head, embeddings, value embeddings, resid
    # and x0 lambdas and the matrices (not smear's 0.2 nor mHC's mhc_lr) by
    # sqrt(tokens per optimizer step / lr_batch_reference); the authors' reference is 524288 (2^19).
    lr_batch_reference: int = 0
    # Scale weight_decay by sqrt(B / lr_batch_reference) * (D_ref / D) (nanochat_weight_decay).
    scale_weight_decay: bool = False
    # D = target_param_data_ratio x scaling params (block parameters + lm_head), the authors' horizon.
    target_param_data_ratio: float = NANOCHAT_PARAM_DATA_RATIO
    # The authors' --aspect-ratio (width = depth x aspect, rounded up to a multiple of head_dim), which
    # sizes their d12 reference model; None = n_embd / n_layer (right when no rounding happened).
    aspect_ratio: float | None = None
    # Muon momentum: muon_momentum throughout, or (schedule on) start -> peak over the warmup steps,
    # peak until the LR warmdown starts, then -> final at the end of the schedule (muon_momentum_at).
    muon_momentum_schedule: bool = False
    muon_momentum_start: float = 0.85
    muon_momentum_peak: float = 0.97
    muon_momentum_final: float = 0.90
    muon_momentum_warmup_steps: int = 400
    # Weight decay of the Muon groups over the run: "constant", or "cosine" from its value to 0.
    weight_decay_schedule: str = "constant"
    # optimizer="nanochat" only: NorMuon's second-moment decay, and the dtype of the Polar Express
    # iteration ("auto": bfloat16 for CUDA parameters as the authors run it, else the parameters' dtype).
    muon_beta2: float = 0.9
    polar_dtype: str = "auto"

    def validate(self) -> "OptimConfig":
        def bad(name: str, allowed: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r} is not allowed: {allowed}")

        def number(value) -> bool:
            return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", "one of " + ", ".join(repr(o) for o in OPTIMIZERS))
        for name in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "mhc_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_LR:
                raise ConfigError(f"{name}={value!r} is not allowed: a learning rate must lie in [0, {MAX_LR:g}]")
        if isinstance(self.weight_decay, bool) or not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay!r} is not allowed: must be a finite number >= 0")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ConfigError(f"muon_momentum={self.muon_momentum} is not allowed: must lie in [0, 1)")
        if not 0.0 <= self.final_lr_frac <= 1.0:
            raise ConfigError(f"final_lr_frac={self.final_lr_frac} is not allowed: must lie in [0, 1]")
        if not 0.0 <= self.warmdown_ratio <= 1.0:
            raise ConfigError(f"warmdown_ratio={self.warmdown_ratio} is not allowed: must lie in [0, 1]")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ConfigError(f"schedule_steps={self.schedule_steps} is not allowed: None or a positive integer")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} is not allowed: must be >= 0")
        if not integer(self.lr_batch_reference) or self.lr_batch_reference < 0:
            raise bad("lr_batch_reference", f"0 (off) or the reference batch in tokens per step, e.g. {NANOCHAT_BATCH_REFERENCE}")
        for name in ("scale_weight_decay", "muon_momentum_schedule"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if self.scale_weight_decay and not self.lr_batch_reference:
            raise ConfigError(
                "scale_weight_decay=True needs lr_batch_reference > 0 (the reference batch B_REF of "
                f"sqrt(B / B_REF), the authors' {NANOCHAT_BATCH_REFERENCE})"
            )
        if self.aspect_ratio is not None and (not number(self.aspect_ratio) or self.aspect_ratio <= 0):
            raise bad("aspect_ratio", "None (n_embd / n_layer) or a finite number > 0 (the authors' --aspect-ratio)")
        if not number(self.target_param_data_ratio) or self.target_param_data_ratio <= 0:
            raise bad("target_param_data_ratio", "must be a finite number > 0 (tokens per scaling parameter, the authors' 12)")
        for name in ("muon_momentum_start", "muon_momentum_peak", "muon_momentum_final", "muon_beta2"):
            if not number(getattr(self, name)) or not 0.0 <= getattr(self, name) < 1.0:
                raise bad(name, "must lie in [0, 1)")
        if not integer(self.muon_momentum_warmup_steps) or self.muon_momentum_warmup_steps < 0:
            raise bad("muon_momentum_warmup_steps", "must be an integer >= 0")
        if self.weight_decay_schedule not in WEIGHT_DECAY_SCHEDULES:
            raise bad("weight_decay_schedule", "one of " + ", ".join(repr(s) for s in WEIGHT_DECAY_SCHEDULES))
        if self.polar_dtype not in POLAR_DTYPES:
            raise bad("polar_dtype", "one of " + ", ".join(repr(s) for s in POLAR_DTYPES))
        return self


# -- the authors' Muon: Polar Express, NorMuon, cautious weight decay ------------------------------
def polar_express(g: Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> Tensor:
    """Approximate orthogonalization U V^T of g = U S V^T (singular values land near 1, not at 1).

    g: (..., rows, cols), a batch of matrices -> same shape, in ``dtype`` (None: g's dtype).
    The iteration runs on the smaller Gram matrix: X^T X for tall matrices, X X^T otherwise.
    """
    x = g if dtype is None else g.to(dtype)
    # Frobenius norm bounds the spectral norm; the 1.01 and 1e-6 keep every singular value below 1.
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = g.size(-2) > g.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS[:steps]:
        if tall:
            gram = x.mT @ x
            x = a * x + x @ (b * gram + c * (gram @ gram))
        else:
            gram = x @ x.mT
            x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x


def normuon_reduce_dim(shape: torch.Size | tuple[int, ...]) -> int:
    """The axis NorMuon averages over: -1 (a second moment per row) when rows >= cols, else -2 (per column)."""
    return -1 if shape[-2] >= shape[-1] else -2


def normuon_scale(g: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """NorMuon variance reduction (arXiv:2510.05491): each row (or column) of the orthogonalized
    update divided by the root of its EMA of mean squares, then the whole matrix rescaled to its
    Frobenius norm before the division.

    g: (K, rows, cols) orthogonalized updates; second_moment: (K, rows, 1) or (K, 1, cols), updated
    in place (EMA with decay beta2). Returns the rescaled updates in g's dtype.
    """
    dim = normuon_reduce_dim(g.shape)
    size = g.size(dim)
    wide = torch.promote_types(g.dtype, torch.float32)  # statistics in at least float32 (bf16 updates)
    beta2_t = _hyper(beta2, g)  # the authors cast beta2 to g's dtype (bfloat16: 0.8984375)
    v_mean = g.to(wide).square().mean(dim=dim, keepdim=True)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt()
    second_moment.lerp_(v_mean.to(second_moment.dtype), float(1 - beta2_t))
    step_size = second_moment.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * size) * step_size.to(wide).square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)


def cautious_update(params: Tensor, update: Tensor, lr: float, weight_decay: float) -> None:
    """params <- params - lr * update - lr * wd * params, the decay only where update * params >= 0
    (it then pulls the same way as the update). params: (K, rows, cols) in place; update: same shape."""
    lr_t = _hyper(lr, update)
    wd_t = _hyper(weight_decay, update)
    mask = (update * params) >= 0
    params.sub_(lr_t * update + lr_t * wd_t * params * mask)


def normuon_step(
    grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_moment: Tensor, *,
    lr: float, momentum: float, weight_decay: float, beta2: float, ns_steps: int = 5,
    polar_dtype: torch.dtype | None = None,
) -> None:
    """One step of the authors' Muon for a stack of same-shape matrices, all updated in place.

    grads, params, momentum_buffer: (K, rows, cols); second_moment: (K, rows, 1) or (K, 1, cols).
    ``lr`` already holds the shape factor max(1, rows / cols)^0.5 (``NanochatMuonAdamW`` adds it).
    ``grads`` is overwritten (it becomes the Nesterov direction).
    """
    m = _hyper(momentum, grads)
    # Nesterov in lerp form: buf <- m buf + (1 - m) g;  direction = (1 - m) g + m buf.
    momentum_buffer.lerp_(grads, float(1 - m))
    direction = grads.lerp_(momentum_buffer, float(m))
    update = polar_express(direction, ns_steps, polar_dtype)
    update = normuon_scale(update, second_moment, beta2)
    cautious_update(params, update, lr, weight_decay)


def _scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    # The authors hold hyperparameters in float32 0-D tensors; float64 stays exact for float64 tests.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _hyper(value: float, like: Tensor) -> Tensor:
    """A hyperparameter as the authors' kernel sees it: a 0-D tensor cast to the update's dtype
    (in bfloat16 that rounds it: lr 0.02 -> 0.0200195..., beta2 0.9 -> 0.8984375). It stays on the
    CPU, where torch treats it as a scalar in CUDA ops: no copy to the device, no sync."""
    return torch.tensor(value, dtype=_scalar_dtype(like.dtype)).to(like.dtype)


# -- the optimizers -------------------------------------------------------------------------------
class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups with kind='muon' (2-D parameters), AdamW for kind='adamw'."""

    uses_torch_muon = True

    def __init__(self, param_groups: list[dict]):
        defaults = dict(lr=1e-3, kind="adamw", betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0, momentum=0.95)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["kind"] == "muon" and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D parameters only")
        if self.uses_torch_muon and any(group["kind"] == "muon" for group in self.param_groups):
            compat.torch_muon()  # torch's private Muon update, checked now rather than at the first step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["kind"] == "muon":
                self._muon_step(group, params)
            else:
                self._adamw_step(group, params)
        return loss

    def _muon_step(self, group: dict, params: list[Tensor]) -> None:
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        muon_update, ns_coefficients = compat.torch_muon()
        muon_update(
            params, [p.grad for p in params], bufs, lr=group["lr"], weight_decay=group["weight_decay"],
            momentum=group["momentum"], nesterov=True, ns_coefficients=ns_coefficients,
            ns_steps=5, eps=1e-7, adjust_lr_fn=None, has_complex=False,
        )

    def _adamw_step(self, group: dict, params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = float(state["step"])
            grad = p.grad
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))


class NanochatMuonAdamW(MuonAdamW):
    """The authors' MuonAdamW (their fork's ``nanochat/optim.py``), eager and single-process.

    Muon groups (one per matrix shape): ``normuon_step`` on the group's matrices stacked into one
    (K, rows, cols) batch, LR x max(1, rows / cols)^0.5. AdamW groups: decoupled weight decay
    first, then the moments (second moment by lerp towards grad^2), bias-corrected.

    State is per parameter (``momentum_buffer``, ``second_momentum_buffer`` (rows, 1) or (1, cols);
    ``step``, ``exp_avg``, ``exp_avg_sq``), so ``state_dict`` / ``load_state_dict`` resume exactly;
    stacking and unstacking copy values without changing them.
    """

    uses_torch_muon = False

    def __init__(self, param_groups: list[dict]):
        for group in param_groups:
            if group.get("kind") == "muon":
                group.setdefault("beta2", 0.9)
                group.setdefault("ns_steps", 5)
                group.setdefault("polar_dtype", "auto")
                if len({tuple(p.shape) for p in group["params"]}) > 1:
                    raise ValueError("a nanochat Muon group stacks its matrices: all must have one shape")
        super().__init__(param_groups)

    def _muon_step(self, group: dict, params: list[Tensor]) -> None:
        rows, cols = params[0].shape
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
                moment_shape = (rows, 1) if normuon_reduce_dim(p.shape) == -1 else (1, cols)
                state["second_momentum_buffer"] = torch.zeros(moment_shape, dtype=p.dtype, device=p.device)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        moments = [self.state[p]["second_momentum_buffer"] for p in params]
        stacked_params, stacked_bufs, stacked_moments = torch.stack(params), torch.stack(bufs), torch.stack(moments)
        normuon_step(
            torch.stack([p.grad for p in params]), stacked_params, stacked_bufs, stacked_moments,
            lr=group["lr"] * max(1.0, rows / cols) ** 0.5, momentum=group["momentum"],
            weight_decay=group["weight_decay"], beta2=group["beta2"], ns_steps=group["ns_steps"],
            polar_dtype=_polar_dtype(group["polar_dtype"], params[0]),
        )
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))
        torch._foreach_copy_(bufs, list(stacked_bufs.unbind(0)))
        torch._foreach_copy_(moments, list(stacked_moments.unbind(0)))

    def _adamw_step(self, group: dict, params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            # The authors form these scalars from float32 0-D tensors; so do we, rounding alike.
            dtype = _scalar_dtype(p.dtype)
            lr_t, wd_t, eps_t, step_t = (torch.tensor(v, dtype=dtype) for v in (lr, wd, eps, state["step"]))
            beta1_t, beta2_t = torch.tensor(beta1, dtype=dtype), torch.tensor(beta2, dtype=dtype)
            bias1, bias2 = 1 - beta1_t**step_t, 1 - beta2_t**step_t
            grad = p.grad
            p.mul_(float(1 - lr_t * wd_t))  # decoupled weight decay, before the moments
            state["exp_avg"].lerp_(grad, float(1 - beta1_t))
            state["exp_avg_sq"].lerp_(grad.square(), float(1 - beta2_t))
            denom = (state["exp_avg_sq"] / float(bias2)).sqrt() + float(eps_t)
            p.add_(state["exp_avg"] / denom, alpha=-float(lr_t / bias1))


def _polar_dtype(name: str, p: Tensor) -> torch.dtype | None:
    """None = no cast (the parameters' dtype)."""
    if name == "auto":
        return torch.bfloat16 if p.is_cuda else None
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# -- groups ---------------------------------------------------------------------------------------
def param_groups(model: GPT, cfg: OptimConfig, lr_scale: float = 1.0, matrix_weight_decay: float | None = None) -> list[dict]:
    """nanochat's groups; parameters with requires_grad=False (unused features) are left out.

    lr_scale: the batch-size LR factor for the head, embeddings, value embeddings, resid / x0
    lambdas and matrices (smear's 0.2 and mHC's mhc_lr stay fixed, as in the authors' code).
    matrix_weight_decay: the matrices' weight decay (None: cfg.weight_decay).
    """
    wd = cfg.weight_decay if matrix_weight_decay is None else matrix_weight_decay
    live = lambda ps: [p for p in ps if p.requires_grad]  # noqa: E731
    if model.config.is_hf:
        return _hf_groups(model, cfg, lr_scale, wd, live)
    scale = (model.config.n_embd / 768) ** -0.5
    hc_ids = {id(p) for blk in model.transformer.h for name, p in blk.named_parameters() if name.startswith("hc_")}
    matrices = [p for p in model.transformer.h.parameters() if id(p) not in hc_ids]
    matrices += list(model.mtp_projs.parameters())  # MTP heads are D x D matrices: Muon, as the authors do
    # (x * 1.0 is x exactly: without batch scaling every rate is bit-for-bit the one before it existed.)
    adamw = [
        dict(params=live(model.lm_head.parameters()), lr=cfg.unembedding_lr * lr_scale * scale, betas=(0.8, 0.96), weight_decay=0.01),
        dict(params=live(model.transformer.wte.parameters()), lr=cfg.embedding_lr * lr_scale * scale, betas=(0.8, 0.995), weight_decay=0.001),
        dict(params=live(model.value_embeds.parameters()), lr=cfg.embedding_lr * lr_scale * scale * 0.5, betas=(0.8, 0.995), weight_decay=0.01),
        dict(params=live([model.resid_lambdas]), lr=cfg.scalar_lr * lr_scale * 0.01, betas=(0.8, 0.95), weight_decay=0.05),
        dict(params=live([model.x0_lambdas]), lr=cfg.scalar_lr * lr_scale, betas=(0.96, 0.95), weight_decay=0.0),
        dict(params=live([model.smear_gate.weight, model.smear_lambda, model.backout_lambda]), lr=0.2, betas=(0.8, 0.95), weight_decay=0.0),
        dict(params=live(p for p in model.transformer.h.parameters() if id(p) in hc_ids), lr=cfg.mhc_lr, betas=(0.9, 0.999), weight_decay=0.0),
    ]
    groups = [dict(kind="adamw", eps=1e-10, **g) for g in adamw if g["params"]]
    if cfg.optimizer == "adamw":
        groups.append(dict(kind="adamw", params=live(matrices), lr=cfg.matrix_lr * lr_scale * 0.1, betas=(0.9, 0.95), eps=1e-10, weight_decay=wd))
    else:
        groups += _muon_groups(live(matrices), cfg, cfg.matrix_lr * lr_scale, wd)
    return groups


def _muon_groups(matrices: list, cfg: OptimConfig, lr: float, wd: float) -> list[dict]:
    """One Muon group per matrix shape (the update orthogonalises same-shape matrices together)."""
    extra = dict(beta2=cfg.muon_beta2, ns_steps=5, polar_dtype=cfg.polar_dtype) if cfg.optimizer == "nanochat" else {}
    return [dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape], lr=lr, momentum=cfg.muon_momentum,
                 weight_decay=wd, **extra) for shape in sorted({tuple(p.shape) for p in matrices})]


def _hf_groups(model, cfg: OptimConfig, lr_scale: float, wd: float, live) -> list[dict]:
    """The Hugging Face families' groups, at the configured rates as given (no width scaling: a
    pretrained model is fine-tuned at the rates its config names): the embedding table
    (embedding_lr; with tied embeddings it is also the head), the untied head (unembedding_lr), the
    block matrices (Muon at matrix_lr, or AdamW at matrix_lr under ``adamw``) and every vector
    (norm gains, biases; AdamW at scalar_lr, no weight decay)."""
    blocks = list(model.transformer.h.parameters())
    matrices = [p for p in blocks if p.dim() == 2]
    vectors = [p for p in blocks if p.dim() != 2] + list(model.transformer.ln_f.parameters())
    head = [] if model.config.tie_embeddings else list(model.lm_head.parameters())
    adamw = [
        dict(params=live(head), lr=cfg.unembedding_lr * lr_scale, betas=(0.8, 0.95), weight_decay=0.0),
        dict(params=live(model.transformer.wte.parameters()), lr=cfg.embedding_lr * lr_scale, betas=(0.8, 0.95), weight_decay=0.0),
        dict(params=live(vectors), lr=cfg.scalar_lr * lr_scale, betas=(0.8, 0.95), weight_decay=0.0),
    ]
    groups = [dict(kind="adamw", eps=1e-10, **g) for g in adamw if g["params"]]
    if cfg.optimizer == "adamw":
        groups.append(dict(kind="adamw", params=live(matrices), lr=cfg.matrix_lr * lr_scale, betas=(0.9, 0.95), eps=1e-10, weight_decay=wd))
        return groups
    return groups + _muon_groups(live(matrices), cfg, cfg.matrix_lr * lr_scale, wd)


# -- the authors' batch and weight-decay transfer -------------------------------------------------
def scaling_params(config: ModelConfig) -> int:
    """The authors' scaling-law parameter count: every block parameter (matrices, value-embedding
    gates, mHC connections), the MTP heads, plus lm_head (their ``transformer_matrices + lm_head``). Built on the
    meta device: no memory, no init."""
    with torch.device("meta"):
        model = build(config)
    matrices = [*model.transformer.h.parameters(), *model.mtp_projs.parameters(), *model.lm_head.parameters()]
    return sum(p.numel() for p in matrices)


def reference_config(config: ModelConfig, depth: int = NANOCHAT_REFERENCE_DEPTH, aspect_ratio: float | None = None) -> ModelConfig:
    """The authors' reference model for ``config``: ``depth`` layers, the same aspect ratio
    (``aspect_ratio``, their --aspect-ratio; None = n_embd / n_layer) and head_dim, the width
    rounded up to a multiple of head_dim, n_kv_head = n_head (their ``build_model_meta(12)``);
    every other field as in ``config``."""
    head_dim = config.head_dim
    if aspect_ratio is None:
        width = -(-depth * config.n_embd // (config.n_layer * head_dim)) * head_dim  # ceil(depth * aspect / hd) * hd
    else:
        width = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    heads = width // head_dim
    return config.replace(n_layer=depth, n_embd=width, n_head=heads, n_kv_head=heads)


def nanochat_weight_decay(
    model_config: ModelConfig, weight_decay: float, tokens_per_step: int, *,
    batch_reference: int = NANOCHAT_BATCH_REFERENCE, target_param_data_ratio: float = NANOCHAT_PARAM_DATA_RATIO,
    reference_depth: int = NANOCHAT_REFERENCE_DEPTH, aspect_ratio: float | None = None,
) -> float:
    """The authors' weight decay for this model and batch: wd * sqrt(B / B_ref) * (D_ref / D),
    D = int(ratio x scaling params of the model), D_ref = ratio x scaling params of the reference
    model (``reference_config``), B = tokens per optimizer step (their T_epoch argument, keeping
    B / (lr * wd * D) fixed under lr ~ sqrt(B))."""
    target_tokens = int(target_param_data_ratio * scaling_params(model_config))
    reference_tokens = target_param_data_ratio * scaling_params(reference_config(model_config, reference_depth, aspect_ratio))
    return weight_decay * math.sqrt(tokens_per_step / batch_reference) * (reference_tokens / target_tokens)


# -- schedules ------------------------------------------------------------------------------------
def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup over warmup_steps, flat, then linear warmdown to final_lr_frac."""
    warmdown = round(cfg.warmdown_ratio * total_steps)
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if step <= total_steps - warmdown:
        return 1.0
    progress = (total_steps - step) / max(warmdown, 1)
    return progress + (1 - progress) * cfg.final_lr_frac


def muon_momentum_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The Muon momentum at ``step``: cfg.muon_momentum, or (muon_momentum_schedule) the authors'
    linear start -> peak over muon_momentum_warmup_steps, peak, then peak -> final over the LR
    warmdown. Past total_steps it holds its final value."""
    if not cfg.muon_momentum_schedule:
        return cfg.muon_momentum
    step = min(step, total_steps)
    start, peak, final = cfg.muon_momentum_start, cfg.muon_momentum_peak, cfg.muon_momentum_final
    warmdown = round(cfg.warmdown_ratio * total_steps)
    warmdown_start = total_steps - warmdown
    if step < cfg.muon_momentum_warmup_steps:
        frac = step / cfg.muon_momentum_warmup_steps
        return (1 - frac) * start + frac * peak
    if step >= warmdown_start:
        progress = (step - warmdown_start) / max(warmdown, 1)  # warmdown 0: only step == total gets here
        return peak * (1 - progress) + final * progress
    return peak


def weight_decay_at(step: int, total_steps: int, cfg: OptimConfig, weight_decay: float) -> float:
    """The Muon groups' weight decay at ``step``: ``weight_decay`` throughout, or ("cosine") the
    authors' wd * 0.5 * (1 + cos(pi * step / total_steps)), 0 at the end and after it."""
    if cfg.weight_decay_schedule == "constant":
        return weight_decay
    step = min(step, total_steps)
    return weight_decay * 0.5 * (1 + math.cos(math.pi * step / total_steps))


class StepSchedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR (every group's lr = its initial lr x ``lr_multiplier(step)``) that also sets the
    Muon groups' momentum and weight decay for the step when the config schedules them.

    Stepped once per optimizer step, like the authors' loop: after ``k`` steps every group holds
    the values of step ``k``. Its state is LambdaLR's (``last_epoch``, ``base_lrs``); the
    momentum and weight decay are functions of ``last_epoch`` and the config, re-applied on load.
    """

    _PRIVATE = ("_cfg", "_total_steps", "_base_weight_decay")

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
        # Set before LambdaLR's __init__: its first step() (step 0) already applies the schedule.
        self._cfg, self._total_steps = cfg, total_steps
        self._base_weight_decay = [g["weight_decay"] for g in optimizer.param_groups if g["kind"] == "muon"]
        super().__init__(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))

    def step(self, epoch=None) -> None:
        super().step(epoch)
        self._apply_muon_schedule()

    def _apply_muon_schedule(self) -> None:
        cfg, step, total = self._cfg, self.last_epoch, self._total_steps
        muon = [g for g in self.optimizer.param_groups if g["kind"] == "muon"]
        for group, wd in zip(muon, self._base_weight_decay):
            if cfg.muon_momentum_schedule:
                group["momentum"] = muon_momentum_at(step, total, cfg)
            if cfg.weight_decay_schedule != "constant":
                group["weight_decay"] = weight_decay_at(step, total, cfg, wd)

    def state_dict(self) -> dict:
        # The config lives in the run's hyperparameters; only plain values go into the checkpoint.
        return {k: v for k, v in super().state_dict().items() if k not in self._PRIVATE}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in self._PRIVATE})
        self._apply_muon_schedule()


def build_optimizer(model: GPT, cfg: OptimConfig, total_steps: int, *, tokens_per_step: int | None = None):
    """(optimizer, StepSchedule stepping every optimizer step).

    tokens_per_step: tokens per optimizer step over all ranks (world size x batch x gradient
    accumulation x seq_len); needed only for lr_batch_reference / scale_weight_decay.
    """
    cfg = cfg.validate()
    needs_batch = cfg.lr_batch_reference > 0 or cfg.scale_weight_decay
    if needs_batch and (not isinstance(tokens_per_step, int) or isinstance(tokens_per_step, bool) or tokens_per_step < 1):
        raise ConfigError(
            f"optim.lr_batch_reference={cfg.lr_batch_reference} needs the tokens per optimizer step (world size x batch "
            f"x accumulate_grad_batches x seq_len), got {tokens_per_step!r}: use a datamodule with batch_size and seq_len"
        )
    lr_scale = math.sqrt(tokens_per_step / cfg.lr_batch_reference) if cfg.lr_batch_reference > 0 else 1.0
    weight_decay = cfg.weight_decay
    if cfg.scale_weight_decay:
        weight_decay = nanochat_weight_decay(
            model.config, cfg.weight_decay, tokens_per_step,
            batch_reference=cfg.lr_batch_reference, target_param_data_ratio=cfg.target_param_data_ratio,
            aspect_ratio=cfg.aspect_ratio,
        )
    groups = param_groups(model, cfg, lr_scale=lr_scale, matrix_weight_decay=weight_decay)
    optimizer = (NanochatMuonAdamW if cfg.optimizer == "nanochat" else MuonAdamW)(groups)
    return optimizer, StepSchedule(optimizer, cfg, total_steps)
