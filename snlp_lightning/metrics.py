"""How close a layer-parallel model's logits are to the sequential model's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def plan_metrics(reference: Tensor, logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """A plan's logits against the sequential ``reference`` (both (B, T, V)) and the next tokens
    ``targets`` (B, T): "nll" the summed cross entropy (a scalar), "top1" 1.0 per token where the
    argmaxes agree, "cosine" the logit cosine per token (both flattened to (B * T,))."""
    return {
        "nll": F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"),
        "top1": (logits.argmax(-1) == reference.argmax(-1)).float().flatten(),
        "cosine": F.cosine_similarity(logits, reference, dim=-1).flatten(),
    }


@torch.no_grad()
def compare_logits(reference: Tensor, logits: Tensor) -> dict[str, float]:
    """reference, logits: (..., V). Max abs difference, top-1 agreement, mean cosine similarity."""
    if reference.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference.shape)} vs {tuple(logits.shape)}")
    ref, out = reference.double(), logits.double()
    return {
        "max_abs": float((ref - out).abs().max()),
        "top1": float((ref.argmax(-1) == out.argmax(-1)).double().mean()),
        "cosine": float(F.cosine_similarity(ref, out, dim=-1).mean()),
    }
