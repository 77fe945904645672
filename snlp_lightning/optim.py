"""nanochat's optimizer setup as ONE torch optimizer, and its warmup / warmdown schedule.

Lightning's automatic optimization drives a single optimizer (clipping, accumulation, schedulers
and LearningRateMonitor assume it), so Muon and AdamW live in one ``MuonAdamW`` with parameter
groups tagged ``kind``: Muon (torch's own Muon update, ``torch.optim._muon.muon``, reached through
``compat.torch_muon``) for the 2-D block matrices, AdamW for the embeddings, the head, the per-layer
scalars and the mHC connections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import compat
from .models import GPT


# Far above any useful rate, and low enough that lr / (1 - beta1) and lr * weight decay stay finite
# in float32 (a rate of 1e38 made the AdamW step fail with an overflow instead of training).
MAX_LR = 1e6


@dataclass(frozen=True)
class OptimConfig:
    """Learning rates and schedule (nanochat's defaults, AdamW rates scaled by (d / 768)^-0.5)."""

    optimizer: str = "muon_adamw"  # or "adamw": every parameter on AdamW (e.g. under FSDP)
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    scalar_lr: float = 0.5
    mhc_lr: float = 0.01
    weight_decay: float = 0.0
    muon_momentum: float = 0.95
    warmup_steps: int = 0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    # Length of the LR schedule and of the regularizer ramp; None = the trainer's step budget.
    # Set it when a run is split into legs (max_steps < the planned length) and resumed.
    schedule_steps: int | None = None

    def validate(self) -> "OptimConfig":
        from .config import ConfigError

        if self.optimizer not in ("muon_adamw", "adamw"):
            raise ConfigError(f"optimizer={self.optimizer!r} is not allowed: one of 'muon_adamw', 'adamw'")
        import math

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
        return self


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups with kind='muon' (2-D parameters), AdamW for kind='adamw'."""

    def __init__(self, param_groups: list[dict]):
        defaults = dict(lr=1e-3, kind="adamw", betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0, momentum=0.95)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["kind"] == "muon" and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D parameters only")
        if any(group["kind"] == "muon" for group in self.param_groups):
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


def param_groups(model: GPT, cfg: OptimConfig) -> list[dict]:
    """nanochat's groups; parameters with requires_grad=False (unused features) are left out."""
    scale = (model.config.n_embd / 768) ** -0.5
    live = lambda ps: [p for p in ps if p.requires_grad]  # noqa: E731
    hc_ids = {id(p) for blk in model.transformer.h for name, p in blk.named_parameters() if name.startswith("hc_")}
    matrices = [p for p in model.transformer.h.parameters() if id(p) not in hc_ids]
    adamw = [
        dict(params=live(model.lm_head.parameters()), lr=cfg.unembedding_lr * scale, betas=(0.8, 0.96), weight_decay=0.01),
        dict(params=live(model.transformer.wte.parameters()), lr=cfg.embedding_lr * scale, betas=(0.8, 0.995), weight_decay=0.001),
        dict(params=live(model.value_embeds.parameters()), lr=cfg.embedding_lr * scale * 0.5, betas=(0.8, 0.995), weight_decay=0.01),
        dict(params=live([model.resid_lambdas]), lr=cfg.scalar_lr * 0.01, betas=(0.8, 0.95), weight_decay=0.05),
        dict(params=live([model.x0_lambdas]), lr=cfg.scalar_lr, betas=(0.96, 0.95), weight_decay=0.0),
        dict(params=live([model.smear_gate.weight, model.smear_lambda, model.backout_lambda]), lr=0.2, betas=(0.8, 0.95), weight_decay=0.0),
        dict(params=live(p for p in model.transformer.h.parameters() if id(p) in hc_ids), lr=cfg.mhc_lr, betas=(0.9, 0.999), weight_decay=0.0),
    ]
    groups = [dict(kind="adamw", eps=1e-10, **g) for g in adamw if g["params"]]
    if cfg.optimizer == "adamw":
        groups.append(dict(kind="adamw", params=live(matrices), lr=cfg.matrix_lr * 0.1, betas=(0.9, 0.95), eps=1e-10, weight_decay=cfg.weight_decay))
    else:
        for shape in sorted({tuple(p.shape) for p in live(matrices)}):
            same = [p for p in live(matrices) if tuple(p.shape) == shape]
            groups.append(dict(kind="muon", params=same, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay))
    return groups


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup over warmup_steps, flat, then linear warmdown to final_lr_frac."""
    warmdown = round(cfg.warmdown_ratio * total_steps)
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if step <= total_steps - warmdown:
        return 1.0
    progress = (total_steps - step) / max(warmdown, 1)
    return progress + (1 - progress) * cfg.final_lr_frac


def build_optimizer(model: GPT, cfg: OptimConfig, total_steps: int):
    """(optimizer, LambdaLR scheduler stepping every optimizer step)."""
    optimizer = MuonAdamW(param_groups(model, cfg.validate()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
    return optimizer, scheduler
