"""How close a layer-parallel model's logits are to the sequential model's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
