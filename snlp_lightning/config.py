"""Typed model configuration and the named architectures.

Field names follow nanochat's ``GPTConfig`` so a nanochat config dict maps onto ``ModelConfig``
one to one; the extra fields (``smear``, ``backout``, ``mhc_variant``, ``short_window``) are ours.

Every named architecture is defined once, below: the presets (``PRESETS``, tiny default sizes),
the paper's sizes (``PAPER_SIZES``) and the model of each run in ``configs/`` (``NAMED_MODELS``, a
preset at a size). A config can be made the way litgpt's ``Config`` classmethods do it::

    ModelConfig.from_name("paper-0.5b")                    # the model of configs/paper-0.5b.yaml
    ModelConfig.from_name("nanochat", n_layer=4)           # a preset, with overrides
    ModelConfig.from_checkpoint("runs/quickstart/checkpoints/last.ckpt")   # what snlp fit trained
    ModelConfig.from_nanochat("path/to/checkpoint_folder")                  # a nanochat checkpoint
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import CheckpointError, UserError, first_line, path_kind


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
    # Multi-token prediction (training only): k heads, head k predicting the token k + 1 steps
    # beyond the next one from the same hidden state; their CE is added with mtp_loss_weight each.
    num_mtp_steps: int = 0
    mtp_loss_weight: float = 0.3

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
        if not isinstance(self.num_mtp_steps, int) or isinstance(self.num_mtp_steps, bool) or self.num_mtp_steps < 0:
            raise bad("num_mtp_steps", "must be an integer >= 0 (0 = no multi-token prediction heads)")
        if isinstance(self.mtp_loss_weight, bool) or not isinstance(self.mtp_loss_weight, (int, float)) \
                or not math.isfinite(self.mtp_loss_weight) or self.mtp_loss_weight < 0:
            raise bad("mtp_loss_weight", "must be a finite number >= 0")
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
        _check_fields(changes)
        return dataclasses.replace(self, **changes)

    # -- named and saved configs (litgpt's Config.from_name / from_checkpoint) ----------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A named architecture, with field overrides: a preset (``plain``, ``nanochat``, ``mhc``,
        ``mhc-dynamic``; tiny default sizes) or the model of a run in configs/ (``quickstart``,
        ``quickstart-mhc``, ``paper-0.5b``, ``paper-0.5b-plain``, ``paper-0.5b-mhc``, ``paper-3b``)."""
        named = {**PRESETS, **NAMED_MODELS}
        if not isinstance(name, str) or name not in named:
            raise ConfigError(f"unknown model name {name!r}; allowed: {sorted(named)}")
        fields = {**named[name], **overrides}
        _check_fields(fields)
        return cls(**fields)

    @classmethod
    def from_checkpoint(cls, path, checkpoint: dict | None = None) -> "ModelConfig":
        """The architecture a checkpoint of ``snlp fit`` (a Lightning ``.ckpt``) was trained with,
        its ``hyper_parameters.config``. ``checkpoint``: the file's contents when already loaded.

        A missing, corrupt or foreign file, or one without a usable model config, is a
        CheckpointError naming it. nanochat checkpoints: ``from_nanochat``."""
        if checkpoint is None:
            from .checkpoint_io import AtomicCheckpointIO  # Lightning's IO: imported only when a file is read

            checkpoint = AtomicCheckpointIO().load_checkpoint(path, map_location="cpu", weights_only=True)
        hyper = checkpoint.get("hyper_parameters")
        fields = hyper.get("config") if isinstance(hyper, dict) else None
        if not isinstance(fields, dict):
            raise CheckpointError(
                f"checkpoint {path} has no model config (hyper_parameters.config): it was not written by snlp fit "
                "(a nanochat checkpoint goes in --model.init_from)"
            )
        try:
            return cls(**fields)
        except (TypeError, ConfigError) as err:  # TypeError: fields this version does not know
            raise CheckpointError(f"checkpoint {path} has a model config this version cannot use: {first_line(err)}") from None

    @classmethod
    def from_nanochat(cls, source) -> "ModelConfig":
        """The architecture of a nanochat checkpoint: a ``model_*.pt`` file (``meta_*.json`` beside
        it), a folder holding one (the newest is read), or nanochat's GPTConfig dict itself.

        Only the meta file is read. Errors name the file and what is wrong (CheckpointError), or the
        field (ConfigError, for a dict)."""
        if isinstance(source, Mapping):
            return _from_nanochat_fields(source)
        if not isinstance(source, (str, os.PathLike)):
            raise CheckpointError(f"from_nanochat takes a checkpoint path or nanochat's config dict, got {type(source).__name__}")
        _, meta = nanochat_files(Path(source))
        return nanochat_meta_config(meta)


# -- where a nanochat checkpoint keeps its config -------------------------------------------------
# Sizes a nanochat config must state: our defaults are not nanochat's, so a missing one is an error.
REQUIRED_NANOCHAT_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")


def _from_nanochat_fields(fields: Mapping) -> ModelConfig:
    """nanochat's GPTConfig dict (plus our extension fields) -> ModelConfig."""
    if not isinstance(fields, Mapping):
        raise ConfigError(f"a nanochat model config must be a mapping of GPTConfig fields, got {type(fields).__name__}")
    missing = [k for k in REQUIRED_NANOCHAT_FIELDS if k not in fields]
    if missing:
        raise ConfigError(f"the model config lacks {', '.join(missing)}; a nanochat GPTConfig states all of {', '.join(REQUIRED_NANOCHAT_FIELDS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown model config field(s) {unknown}; allowed: {sorted(known)}")
    # nanochat's own model always has smear and backout; its mHC is the static variant.
    return ModelConfig(**{"smear": True, "backout": True, "mhc_variant": "static", **fields})


def nanochat_files(path: Path) -> tuple[Path, Path]:
    """A nanochat ``model_*.pt`` file, or a folder holding some (the newest), -> (it, its meta_*.json)."""
    if path.is_dir():
        candidates = sorted(path.glob("model_*.pt"))
        if not candidates:
            raise CheckpointError(f"no model_*.pt checkpoint in {path}")
        path = candidates[-1]
    kind = path_kind(path)
    if kind == "missing":
        raise CheckpointError(f"checkpoint {path} does not exist")
    if kind != "a file":
        raise CheckpointError(f"checkpoint {path} is {kind}, not a nanochat model_*.pt file")
    if path.suffix == ".ckpt":
        raise CheckpointError(f"{path} is a checkpoint of snlp fit: resume it with --ckpt_path; a nanochat model_*.pt goes here")
    meta = path.with_name(path.name.replace("model_", "meta_", 1)).with_suffix(".json")
    if not meta.is_file():
        raise CheckpointError(f"checkpoint {path} has no {meta.name} beside it (needed for the model config)")
    return path, meta


def nanochat_meta_config(meta: Path) -> ModelConfig:
    """The ModelConfig of a nanochat ``meta_*.json`` (its "model_config" entry); CheckpointError naming it."""
    try:
        fields = json.loads(meta.read_text(encoding="utf-8"))["model_config"]
    except (ValueError, KeyError, TypeError) as err:  # ValueError: bad JSON or not UTF-8
        raise CheckpointError(f"{meta} is not a nanochat meta file with a 'model_config' entry ({first_line(err)})") from None
    try:
        return _from_nanochat_fields(fields)
    except ConfigError as err:
        raise CheckpointError(f"{meta}: {err}") from None


def _check_fields(fields) -> None:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown ModelConfig field(s) {unknown}; allowed: {sorted(known)}")


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

# The quickstart's toy size: 8 blocks of width 128 over the bundled corpus's 4096-token vocabulary.
QUICKSTART_SIZE: dict = dict(n_layer=8, n_embd=128, n_head=4, n_kv_head=4, vocab_size=4096, sequence_len=128)

# The model of each run in configs/ (configs/<name>.yaml, with its overlays); tests/test_configs.py
# checks that every config file resolves to its model here.
NAMED_MODELS: dict[str, dict] = {
    "quickstart": {**PRESETS["plain"], **QUICKSTART_SIZE},
    "quickstart-mhc": {**PRESETS["mhc"], **QUICKSTART_SIZE},
    "paper-0.5b": {**PRESETS["nanochat"], **PAPER_SIZES["0.5b"]},
    "paper-0.5b-plain": {**PRESETS["plain"], **PAPER_SIZES["0.5b"], "window_pattern": "SSSL"},
    "paper-0.5b-mhc": {**PRESETS["mhc"], **PAPER_SIZES["0.5b"], "window_pattern": "SSSL"},
    "paper-0.5b-mtp": {**PRESETS["nanochat"], **PAPER_SIZES["0.5b"], "num_mtp_steps": 1, "mtp_loss_weight": 0.3},
    "paper-3b": {**PRESETS["nanochat"], **PAPER_SIZES["3b"]},
}


def make_config(preset: str = "plain", size: str | None = None, **overrides) -> ModelConfig:
    """``make_config("nanochat", n_layer=4)``, ``make_config("plain", size="0.5b")`` -> a validated
    ModelConfig (a preset at one of PAPER_SIZES; ``ModelConfig.from_name`` also knows NAMED_MODELS)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; allowed: {sorted(PRESETS)}")
    sizes = {}
    if size is not None:
        if size not in PAPER_SIZES:
            raise ConfigError(f"unknown size {size!r}; allowed: {sorted(PAPER_SIZES)}")
        sizes = PAPER_SIZES[size]
    return ModelConfig.from_name(preset, **{**sizes, **overrides})
