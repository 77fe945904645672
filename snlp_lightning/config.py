"""Typed model configuration and the named presets.

Field names follow nanochat's ``GPTConfig`` so a nanochat config dict maps onto ``ModelConfig``
one to one; the extra fields (``smear``, ``backout``, ``mhc_variant``, ``short_window``) are ours.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from .errors import UserError


class ConfigError(UserError):
    """A config value that is not allowed; the message names the value and what is allowed."""


MhcVariant = Literal["static", "dynamic"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a nanochat GPT or an mHC Transformer (spec sections 5 and 9)."""

    sequence_len: int = 256
    vocab_size: int = 4096
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 128
    # "S" = short window, "L" = long (full context); tiled over layers, the last layer is always "L".
    window_pattern: str = "L"
    # Short-window size in tokens; None = nanochat's rule ceil(sequence_len / 4 / 128) * 128.
    short_window: int | None = None
    no_x0_resid: bool = True  # True: no resid / x0 lambda blend at the block inputs
    no_ve: bool = True  # True: no value embeddings
    smear: bool = True  # previous-token embedding mixed in through a gate (authors: always on)
    backout: bool = True  # subtract backout_lambda * h_{L//2} before the final norm (authors: always on)
    use_mhc: bool = False
    mhc_variant: MhcVariant = "static"
    mhc_num_streams: int = 4
    mhc_sinkhorn_iters: int = 10
    mhc_sinkhorn_tau: float = 0.05
    rope_base: float = 100000.0
    logit_softcap: float = 15.0
    pad_vocab_to: int = 64

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to
        return ((self.vocab_size + m - 1) // m) * m

    @property
    def n_streams(self) -> int:
        """Width of the stream axis of the hidden state: n for mHC, 1 for nanochat."""
        return self.mhc_num_streams if self.use_mhc else 1

    @property
    def uses_lambdas(self) -> bool:
        return not self.no_x0_resid and not self.use_mhc

    def has_value_embedding(self, layer: int) -> bool:
        """nanochat's rule: alternating layers, always including the last one."""
        return (not self.no_ve) and layer % 2 == (self.n_layer - 1) % 2

    def window_sizes(self) -> list[int]:
        """Left window per layer: a query at position i sees keys i - w .. i (w + 1 keys)."""
        long_w = self.sequence_len
        short_w = self.short_window
        if short_w is None:
            short_w = max(128, math.ceil(self.sequence_len / 4 / 128) * 128)
        pattern = self.window_pattern.upper()
        sizes = [long_w if pattern[i % len(pattern)] == "L" else short_w for i in range(self.n_layer)]
        sizes[-1] = long_w
        return sizes

    # -- checks --------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(field: str, allowed: str) -> ConfigError:
            return ConfigError(f"{field}={getattr(self, field)!r} is not allowed: {allowed}")

        # Types first: a config read from JSON / YAML may hold "false" (a true string) or 2.5.
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "pad_vocab_to",
                     "mhc_num_streams", "mhc_sinkhorn_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "must be a positive integer")
        for name in ("no_x0_resid", "no_ve", "smear", "backout", "use_mhc"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        for name in ("rope_base", "logit_softcap", "mhc_sinkhorn_tau"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise bad(name, "must be a finite number > 0")
        if not isinstance(self.window_pattern, str):
            raise bad("window_pattern", "a string of the letters S (short) and L (long), e.g. 'SSSL' or 'L'")
        if self.short_window is not None and (not isinstance(self.short_window, int) or isinstance(self.short_window, bool)):
            raise bad("short_window", "must be None or a positive integer")
        if self.n_embd % self.n_head:
            raise bad("n_embd", f"must be a multiple of n_head={self.n_head}")
        if self.head_dim % 2:
            raise bad("n_embd", f"n_embd / n_head must be even for rotary embeddings (got head_dim {self.head_dim})")
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head:
            raise bad("n_kv_head", f"must divide n_head={self.n_head}")
        if not self.window_pattern or any(c not in "SLsl" for c in self.window_pattern):
            raise bad("window_pattern", "use only the letters S (short) and L (long), e.g. 'SSSL' or 'L'")
        if self.short_window is not None and self.short_window < 1:
            raise bad("short_window", "must be None or a positive integer")
        if self.smear and self.n_embd < 24:
            raise bad("n_embd", "smear gates on the first 24 channels: need n_embd >= 24 or smear=False")
        if not self.no_ve and self.n_embd < 12:
            raise bad("n_embd", "value-embedding gates read 12 channels: need n_embd >= 12 or no_ve=True")
        if self.mhc_variant not in ("static", "dynamic"):
            raise bad("mhc_variant", "one of 'static', 'dynamic'")
        if self.use_mhc and not self.no_x0_resid:
            # The authors' mHC forces no_x0_resid; a blend on top of stream mixing is not defined.
            raise bad("no_x0_resid", "mHC models have no resid / x0 lambdas: set no_x0_resid=True")

    def replace(self, **changes) -> "ModelConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; allowed: {sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)


# The named presets. Sizes are tiny defaults; pass overrides for real runs (see PAPER_SIZES).
PRESETS: dict[str, dict] = {
    # The paper's "w/o x0ve" model: no lambdas, no value embeddings, smear and backout on.
    "plain": dict(no_x0_resid=True, no_ve=True, smear=True, backout=True, use_mhc=False),
    # Newest nanochat: every extra on, sliding windows "SSSL".
    "nanochat": dict(no_x0_resid=False, no_ve=False, smear=True, backout=True, use_mhc=False, window_pattern="SSSL"),
    # The paper's mHC model (static H, log-space Sinkhorn); value embeddings stay on.
    "mhc": dict(no_x0_resid=True, no_ve=False, use_mhc=True, mhc_variant="static", mhc_sinkhorn_iters=10),
    # DeepSeek's dynamic mHC: coefficients computed from the normed input, 20 Sinkhorn iterations.
    "mhc-dynamic": dict(no_x0_resid=True, no_ve=False, use_mhc=True, mhc_variant="dynamic", mhc_sinkhorn_iters=20),
}

# The paper's model sizes (spec section 8); combine with a preset.
PAPER_SIZES: dict[str, dict] = {
    "0.5b": dict(n_layer=32, n_embd=640, n_head=5, n_kv_head=5, vocab_size=32768, sequence_len=2048),
    "3b": dict(n_layer=32, n_embd=2048, n_head=16, n_kv_head=16, vocab_size=32768, sequence_len=2048),
}


def make_config(preset: str = "plain", size: str | None = None, **overrides) -> ModelConfig:
    """``make_config("nanochat", n_layer=4)`` -> a validated ModelConfig."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; allowed: {sorted(PRESETS)}")
    fields = dict(PRESETS[preset])
    if size is not None:
        if size not in PAPER_SIZES:
            raise ConfigError(f"unknown size {size!r}; allowed: {sorted(PAPER_SIZES)}")
        fields.update(PAPER_SIZES[size])
    fields.update(overrides)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown ModelConfig field(s) {unknown}; allowed: {sorted(known)}")
    return ModelConfig(**fields)
