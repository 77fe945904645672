"""snlp-lightning: Structured Newton Layer Parallelism for nanochat, mHC and Hugging Face Llama /
Qwen2 / Gemma 3 Transformers.

    from snlp_lightning import build_model, SolverPlan, snlp_forward
    model = build_model("plain", n_layer=8)
    logits = snlp_forward(model, tokens, SolverPlan.parse("idn:n6:3xF2:K2"))
"""

from __future__ import annotations

from .config import PAPER_SIZES, PRESETS, ConfigError, ModelConfig, make_config
from .models import FAMILIES, GPT, TokenRangeError, build
from .models.hf_io import load_hf, save_hf
from .models.nanochat_io import CheckpointError, export_nanochat, load_nanochat
from .solvers import PlanError, SolveResult, SolverDivergence, SolverPlan, snlp_forward, snlp_solve

__version__ = "0.1.0"


def build_model(preset: str | ModelConfig = "plain", size: str | None = None, **overrides) -> GPT:
    """A freshly initialised model from a preset name (plus overrides) or a ModelConfig."""
    cfg = preset if isinstance(preset, ModelConfig) else make_config(preset, size, **overrides)
    return build(cfg)


__all__ = [
    "FAMILIES", "GPT", "ModelConfig", "PRESETS", "PAPER_SIZES", "ConfigError", "PlanError", "CheckpointError",
    "TokenRangeError", "SolverDivergence", "SolverPlan", "SolveResult", "build_model", "make_config",
    "snlp_forward", "snlp_solve", "load_nanochat", "export_nanochat", "load_hf", "save_hf",
]
