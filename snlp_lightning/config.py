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
Family = Literal["nanochat", "llama", "qwen2", "gemma3"]
FAMILY_NAMES = ("nanochat", "llama", "qwen2", "gemma3")  # mHC is nanochat with use_mhc=True
AttentionBias = Literal["none", "qkv", "all"]
RopeType = Literal["default", "linear", "llama3"]
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's names


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a nanochat GPT, an mHC Transformer (spec sections 5 and 9), or a Hugging
    Face Llama / Qwen2 / Gemma 3 text model (``family``; ``models/llama.py``)."""

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
    logit_softcap: float | None = 15.0  # None: no softcap (HF families without final_logit_softcapping)
    pad_vocab_to: int = 64
    # Multi-token prediction (training only): k heads, head k predicting the token k + 1 steps
    # beyond the next one from the same hidden state; their CE is added with mtp_loss_weight each.
    num_mtp_steps: int = 0
    mtp_loss_weight: float = 0.3
    # -- the Hugging Face families (family != "nanochat"); nanochat models leave these at their
    # defaults. Names follow the transformers config where they differ from nanochat's. ------------
    family: Family = "nanochat"
    intermediate_size: int | None = None  # the MLP's hidden width (HF families need it)
    head_size: int | None = None  # explicit head width (HF head_dim); None = n_embd // n_head
    norm_eps: float = 1e-6  # RMSNorm epsilon of the HF families (nanochat: torch's default)
    attention_bias: AttentionBias = "none"  # "qkv": Qwen2's q, k, v biases; "all": Llama attention_bias
    mlp_bias: bool = False  # Llama mlp_bias
    tie_embeddings: bool = False  # lm_head shares the embedding table (tie_word_embeddings)
    rope_type: RopeType = "default"  # RoPE scaling of the full-attention layers
    rope_factor: float = 1.0  # linear / llama3 scaling factor
    rope_low_freq_factor: float = 1.0  # llama3 scaling
    rope_high_freq_factor: float = 4.0  # llama3 scaling
    rope_original_len: int = 8192  # llama3 scaling: original_max_position_embeddings
    rope_local_base: float | None = None  # Gemma 3: RoPE theta of the sliding layers (None: rope_base)
    sliding_window: int | None = None  # HF sliding window: a query sees this many keys, itself included
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention" / "sliding_attention"
    query_pre_attn_scalar: float | None = None  # Gemma 3: attention scale is its ^-0.5 (None: head_dim)

    def __post_init__(self) -> None:
        if isinstance(self.layer_types, list):  # YAML / JSON give lists; a frozen config keeps tuples
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.n_embd // self.n_head

    @property
    def is_hf(self) -> bool:
        """A Hugging Face family (Llama, Qwen2, Gemma 3) rather than nanochat / mHC."""
        return self.family != "nanochat"

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
        if self.is_hf:  # HF's sliding window W counts the query itself: w = W - 1
            types = self.layer_types or ("full_attention",) * self.n_layer
            return [self.sliding_window - 1 if t == "sliding_attention" else long_w for t in types]
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
        for name in ("rope_base", "logit_softcap", "mhc_sinkhorn_tau", "norm_eps", "rope_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor", "rope_local_base", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is None and name in ("logit_softcap", "rope_local_base", "query_pre_attn_scalar"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise bad(name, "must be a finite number > 0" + (" or None" if name in ("logit_softcap", "rope_local_base", "query_pre_attn_scalar") else ""))
        if not isinstance(self.window_pattern, str):
            raise bad("window_pattern", "a string of the letters S (short) and L (long), e.g. 'SSSL' or 'L'")
        if self.short_window is not None and (not isinstance(self.short_window, int) or isinstance(self.short_window, bool)):
            raise bad("short_window", "must be None or a positive integer")
        if self.head_size is None and self.n_embd % self.n_head:
            raise bad("n_embd", f"must be a multiple of n_head={self.n_head} (or set head_size)")
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
        self._validate_family(bad)

    def _validate_family(self, bad) -> None:
        """The HF families' fields: set only for them, and the nanochat features off for them."""
        if self.family not in FAMILY_NAMES:
            raise bad("family", f"one of {', '.join(FAMILY_NAMES)} (mHC: family nanochat with use_mhc=True)")
        for name in ("intermediate_size", "head_size", "sliding_window", "rope_original_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise bad(name, "must be a positive integer" + ("" if name == "rope_original_len" else " or None"))
        if self.attention_bias not in ("none", "qkv", "all"):
            raise bad("attention_bias", "one of 'none', 'qkv' (Qwen2), 'all' (Llama attention_bias)")
        if self.rope_type not in ("default", "linear", "llama3"):
            raise bad("rope_type", "one of 'default', 'linear', 'llama3'")
        for name in ("mlp_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if not self.is_hf:
            if self.logit_softcap is None:
                raise bad("logit_softcap", "nanochat's head softcaps its logits: a number > 0")
            hf_only = [f.name for f in dataclasses.fields(self) if f.name in _HF_ONLY and getattr(self, f.name) != f.default]
            if hf_only:
                raise bad(hf_only[0], f"is a field of the Hugging Face families (family llama / qwen2 / gemma3), not of family {self.family!r}")
            return
        nanochat_on = [(n, v) for n, v in (("smear", False), ("backout", False), ("no_ve", True), ("no_x0_resid", True),
                                          ("use_mhc", False), ("num_mtp_steps", 0)) if getattr(self, n) != v]
        if nanochat_on:
            name, want = nanochat_on[0]
            raise bad(name, f"is a nanochat feature; family {self.family!r} needs {name}={want}")
        if self.intermediate_size is None:
            raise bad("intermediate_size", f"family {self.family!r} needs the MLP width (HF intermediate_size)")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.n_layer or any(t not in LAYER_TYPES for t in self.layer_types):
                raise bad("layer_types", f"None or {self.n_layer} entries (n_layer), each one of {', '.join(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise bad("sliding_window", "must be set when layer_types has sliding_attention layers")

    def replace(self, **changes) -> "ModelConfig":
        _check_fields(changes)
        return dataclasses.replace(self, **changes)

    # -- named and saved configs (litgpt's Config.from_name / from_checkpoint) ----------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A named architecture, with field overrides: a preset (``plain``, ``nanochat``, ``mhc``,
        ``mhc-dynamic``, ``llama``; tiny default sizes) or the model of a run in configs/ (``quickstart``,
        ``quickstart-mhc``, ``quickstart-llama``, ``paper-0.5b``, ``paper-0.5b-plain``, ``paper-0.5b-mhc``, ``paper-3b``)."""
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


    @classmethod
    def from_hf(cls, source, **overrides) -> "ModelConfig":
        """The architecture of a Hugging Face Llama / Qwen2 / Gemma 3 text model: a model folder
        (its ``config.json``), the file itself, or the parsed dict. ``overrides``: fields to change,
        e.g. ``sequence_len`` (default: the model's max_position_embeddings). transformers is not
        needed. Errors name the file or the field and what is allowed."""
        if isinstance(source, Mapping):
            return cls(**{**hf_config_fields(source), **overrides})
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist: a Hugging Face model folder holds config.json")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise CheckpointError(f"{path} is not a JSON file ({first_line(err)})") from None
        try:
            fields = hf_config_fields(raw)
            _check_fields(overrides)
            return cls(**{**fields, **overrides})
        except ConfigError as err:
            raise CheckpointError(f"{path}: {err}") from None

    def to_hf(self) -> dict:
        """This config as a transformers ``config.json`` dict (the inverse of ``from_hf``)."""
        if not self.is_hf:
            raise ConfigError(f"family {self.family!r} has no Hugging Face config: export_nanochat writes nanochat checkpoints")
        model_type, arch = HF_MODEL_TYPES[self.family]
        out = dict(
            architectures=[arch], model_type=model_type, vocab_size=self.vocab_size, hidden_size=self.n_embd,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.n_layer, num_attention_heads=self.n_head,
            num_key_value_heads=self.n_kv_head, head_dim=self.head_dim, max_position_embeddings=self.sequence_len,
            rms_norm_eps=self.norm_eps, tie_word_embeddings=self.tie_embeddings, rope_theta=self.rope_base,
        )
        if self.rope_type != "default":
            scaling = {"rope_type": self.rope_type, "factor": self.rope_factor}
            if self.rope_type == "llama3":
                scaling.update(low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                               original_max_position_embeddings=self.rope_original_len)
            out["rope_scaling"] = scaling
        if self.family == "llama":
            out.update(hidden_act="silu", attention_bias=self.attention_bias == "all", mlp_bias=self.mlp_bias)
        elif self.family == "qwen2":
            sliding = self.layer_types is not None and "sliding_attention" in self.layer_types
            out.update(hidden_act="silu", use_sliding_window=sliding, sliding_window=self.sliding_window,
                       max_window_layers=self.layer_types.index("sliding_attention") if sliding else self.n_layer)
        else:
            out.update(hidden_activation="gelu_pytorch_tanh", attention_bias=self.attention_bias == "all",
                       query_pre_attn_scalar=self.query_pre_attn_scalar, sliding_window=self.sliding_window,
                       rope_local_base_freq=self.rope_local_base or self.rope_base,
                       final_logit_softcapping=self.logit_softcap, attn_logit_softcapping=None)
        if self.family != "llama":  # written out, so transformers derives no other pattern
            out["layer_types"] = list(self.layer_types or ("full_attention",) * self.n_layer)
        return out


# -- Hugging Face config.json ---------------------------------------------------------------------
HF_MODEL_TYPES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                  "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
_HF_FAMILY = {model_type: family for family, (model_type, _) in HF_MODEL_TYPES.items()}
_HF_ROPE_THETA = {"llama": 10000.0, "qwen2": 10000.0, "gemma3": 1_000_000.0}  # transformers' defaults


# The config.json sizes every family states (transformers' defaults are not this project's).
_HF_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def hf_config_fields(raw: Mapping) -> dict:
    """transformers' config.json dict (old and new RoPE formats) -> ModelConfig fields. ConfigError
    names a field this project does not support and what it does support."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a Hugging Face config must be a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in _HF_FAMILY:
        hint = " (a multimodal Gemma 3: use a text-only gemma3_text model)" if model_type == "gemma3" else ""
        raise ConfigError(f"model_type={model_type!r} is not supported{hint}: one of {', '.join(_HF_FAMILY)}")
    family = _HF_FAMILY[model_type]
    need = [k for k in _HF_SIZES if k not in raw]
    if need:
        raise ConfigError(f"the config lacks {', '.join(need)}")
    for key in (*_HF_SIZES, "num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = raw.get(key)
        if (value is not None or key in _HF_SIZES) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{key}={value!r} is not allowed: must be a positive integer")
    want_act = "gelu_pytorch_tanh" if family == "gemma3" else "silu"  # transformers' defaults
    act = (raw.get("hidden_activation") or raw.get("hidden_act", want_act)) if family == "gemma3" else raw.get("hidden_act", want_act)
    if act != want_act:
        raise ConfigError(f"hidden_act={act!r} is not supported for {model_type}: only {want_act!r}")
    if raw.get("attn_logit_softcapping") is not None:
        raise ConfigError(f"attn_logit_softcapping={raw['attn_logit_softcapping']!r} is not supported: only null (Gemma 3 has none)")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"partial_rotary_factor={raw['partial_rotary_factor']!r} is not supported: only 1.0")
    if raw.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=true is not supported: SNLP families are causal")
    n_layer, n_head = raw["num_hidden_layers"], raw["num_attention_heads"]
    fields = dict(
        family=family, vocab_size=raw["vocab_size"], n_embd=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        n_layer=n_layer, n_head=n_head, n_kv_head=raw.get("num_key_value_heads") or n_head,
        head_size=raw.get("head_dim") or raw["hidden_size"] // n_head,
        sequence_len=raw.get("max_position_embeddings", 2048), norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", family == "gemma3")), pad_vocab_to=1,
        smear=False, backout=False, no_ve=True, no_x0_resid=True, logit_softcap=None,
    )
    if family == "llama":
        fields.update(attention_bias="all" if raw.get("attention_bias") else "none", mlp_bias=bool(raw.get("mlp_bias", False)))
    elif family == "qwen2":
        fields["attention_bias"] = "qkv"
    else:
        fields.update(attention_bias="all" if raw.get("attention_bias") else "none",
                      query_pre_attn_scalar=raw.get("query_pre_attn_scalar", 256),
                      logit_softcap=raw.get("final_logit_softcapping"))
    fields.update(_hf_rope(raw, family))
    fields.update(_hf_windows(raw, family, n_layer))
    return fields


def _hf_rope(raw: Mapping, family: str) -> dict:
    """RoPE fields from the new ``rope_parameters`` or the old ``rope_theta`` / ``rope_scaling`` keys."""
    params = raw.get("rope_parameters")
    local = None
    if isinstance(params, Mapping) and "full_attention" in params:  # Gemma 3's per-layer-type dict
        local = params.get("sliding_attention", {}).get("rope_theta")
        params = params["full_attention"]
    if not isinstance(params, Mapping):
        params = {**(raw.get("rope_scaling") or {}), "rope_theta": raw.get("rope_theta", _HF_ROPE_THETA[family])}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ConfigError(f"rope_type={kind!r} is not supported: one of default, linear, llama3")
    out = dict(rope_base=float(params.get("rope_theta", _HF_ROPE_THETA[family])), rope_type=kind)
    if kind != "default":
        out["rope_factor"] = float(params["factor"])
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(params["low_freq_factor"]), rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_len=int(params["original_max_position_embeddings"]))
    if family == "gemma3":
        out["rope_local_base"] = float(local if local is not None else raw.get("rope_local_base_freq", 10000.0))
    return out


def _hf_windows(raw: Mapping, family: str, n_layer: int) -> dict:
    """sliding_window and layer_types as transformers derives them for each family."""
    types = raw.get("layer_types")
    window = raw.get("sliding_window")
    if family == "llama":
        return {}
    if family == "qwen2":
        window = window if raw.get("use_sliding_window") else None
        if types is None:
            start = raw.get("max_window_layers", 28)
            types = ["sliding_attention" if window is not None and i >= start else "full_attention" for i in range(n_layer)]
    else:
        window = window if window is not None else 4096
        if types is None:
            pattern = raw.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)]
    sliding = "sliding_attention" in types
    return dict(sliding_window=window if sliding else None, layer_types=tuple(types) if sliding else None)


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


# Fields only the HF families read; a nanochat config must leave them at their defaults.
_HF_ONLY = ("intermediate_size", "head_size", "norm_eps", "attention_bias", "mlp_bias", "tie_embeddings", "rope_type",
            "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_len", "rope_local_base",
            "sliding_window", "layer_types", "query_pre_attn_scalar")


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
    # A Llama (models/llama.py) of the tiny default width: SwiGLU of ~8/3 D, RoPE theta 10000, no
    # nanochat extras; real Llama / Qwen2 / Gemma 3 models come from their folders (ModelConfig.from_hf).
    "llama": dict(family="llama", no_x0_resid=True, no_ve=True, smear=False, backout=False, use_mhc=False,
                  intermediate_size=352, rope_base=10000.0, pad_vocab_to=1, logit_softcap=None),
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
    "quickstart-llama": {**PRESETS["llama"], **QUICKSTART_SIZE, "tie_embeddings": True},
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
