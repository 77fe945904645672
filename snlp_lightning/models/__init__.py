"""Model families and their registry.

A family is one file whose model class supplies what the solvers, the regularizer, the decoder,
export and the metrics use, and nothing else:

    h0 = model.embed(tokens, positions, prev)  -> (BlockInputs, (B, T, n, D))
    blocks = model.stack(groups)               -> a stack of any grouping of layers, fused per group
    out, A = blocks(x, inputs, cache=None)     -> all G wide blocks in one call; A = surrogate (None: I)
    blocks.write_cache(x, inputs, cache)       -> the k, v of inputs x into a KV cache
    logits = model.head(h_last, h_backout)

A new family adds its file and one line to ``FAMILIES`` (plus, if its architecture has knobs no
family had before, their fields in ``ModelConfig``). ``ModelConfig.family`` picks the entry:
nanochat (mHC when ``use_mhc``), or one of the Hugging Face families of ``llama.py``.
"""

from __future__ import annotations

from ..config import ModelConfig
from .mhc import MHCGPT
from .family import FamilyModel, TokenRangeError
from .llama import Llama
from .nanochat import GPT, BlockInputs, WideBlocks

FAMILIES: dict[str, type[FamilyModel]] = {
    "nanochat": GPT,
    "mhc": MHCGPT,
    "llama": Llama,
    "qwen2": Llama,
    "gemma3": Llama,
}


def family_name(config: ModelConfig) -> str:
    """The registry key of a config's family (mHC: a nanochat config with use_mhc)."""
    return "mhc" if config.use_mhc else config.family


def build(config: ModelConfig) -> FamilyModel:
    """A freshly initialised model of the config's family."""
    return FAMILIES[family_name(config)](config)


__all__ = ["FAMILIES", "GPT", "MHCGPT", "Llama", "FamilyModel", "BlockInputs", "TokenRangeError", "WideBlocks", "build", "family_name"]
