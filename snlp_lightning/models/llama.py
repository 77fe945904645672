"""Llama, Qwen2 and Gemma 3 (text): Hugging Face decoder-only Transformers as SNLP families.

    inputs, h0 = model.embed(tokens)              # h0: (B, T, 1, D); inputs: the RoPE tables
    blocks = model.stack(groups)                  # weights of any grouping of layers, fused per group
    out, A = blocks(x, inputs, cache=None)        # (G, B, T, 1, D) -> same; A = None (IDN)
    logits = model.head(h_last, None)             # (B, T, vocab_size)

One pre-norm block (``config.family`` picks the differences, each marked below):

    a = attn(norm_1(h));  a = norm_post_attn(a)          # post norm: Gemma 3 only
    h = h + a
    m = mlp(norm_2(h));   m = norm_post_mlp(m)           # post norm: Gemma 3 only
    h = h + m

    attn: q, k, v projections (+ biases: Qwen2 q/k/v, Llama attention_bias all four), per-head
          RMS norms of q and k (Gemma 3), RoPE (rotate-half), grouped-query causal attention with
          per-layer sliding windows (Qwen2, Gemma 3 ``layer_types``), scale head_dim^-0.5 or
          query_pre_attn_scalar^-0.5 (Gemma 3), output projection.
    mlp:  down(act(gate x) * up x), act = silu (Llama, Qwen2) or tanh-approximated gelu (Gemma 3).
    norm: RMSNorm, x / rms(x) * w (Llama, Qwen2) or * (1 + w) (Gemma 3), eps ``norm_eps``.

Embedding: the token table, times sqrt(D) rounded to float32 and then to the table's dtype (Gemma
3, as transformers does). Head: final norm, lm_head (tied to the table when ``tie_embeddings``),
softcap when ``logit_softcap`` is set. RoPE tables are computed in float32 as transformers computes
them (default, linear or llama3 scaling; Gemma 3's sliding layers use ``rope_local_base``), so a
float64 model uses the same angles as transformers' float64 model.

Fusion (spec section 3) as M branches on one shared input: a pre-norm's gain is folded into the
projections that read it (W diag(g)), so a wide block normalises once without a gain while every
fused layer keeps its own gain (no averaging). Branch outputs are summed; Gemma 3's post norms act
on each branch's own output, so there the M outputs are projected, normed and summed one by one.
Every weight carries a leading G axis: one batched matmul per projection evaluates all G blocks.
Names follow transformers (``self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``) inside
``transformer.h.{i}``; ``models/hf_io.py`` maps them to and from Hugging Face folders.

Initialisation (training from scratch; ``Llama.init_weights``), transformers' rule:

    parameter                                   init
    transformer.wte, every projection weight   normal, std 0.02
    lm_head (untied)                            normal, std 0.02
    biases                                      zeros
    norm gains                                  ones (Llama, Qwen2), zeros (Gemma 3: gain 1 + w)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .attention import Windows, causal_attention
from .family import FamilyModel, GroupStack, check_tokens
from .kv_cache import KVCache
from .nanochat import _project, _stack, apply_rotary

INIT_STD = 0.02  # transformers' initializer_range


def rms(x: Tensor, eps: float) -> Tensor:
    """Gain-free RMS norm over the last axis (the gains live in the projections / gain tensors)."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def rope_tables(cfg: ModelConfig, base: float, scaled: bool) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (sequence_len, head_dim // 2), float32, as transformers computes them:
    inverse frequencies and angles in float32; ``scaled``: apply ``rope_type`` (full-attention layers)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    if scaled and cfg.rope_type == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif scaled and cfg.rope_type == "llama3":
        # Long wavelengths are divided by the factor, short ones kept, the band between blended.
        low_wavelen = cfg.rope_original_len / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_len / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled_freq = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (cfg.rope_original_len / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * scaled_freq / cfg.rope_factor + smooth * scaled_freq
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, blended, scaled_freq)
    angles = torch.arange(cfg.sequence_len, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """transformers' rotate-half RoPE, x * cos + rotate_half(x) * sin: nanochat's rotation with
    the angle negated. x: (..., T, H, hd); cos, sin: (T, hd / 2) or (B, T, hd / 2)."""
    return apply_rotary(x, cos, -sin)


# -- the per-layer parameters (names match transformers') -----------------------------------------
class RMSNorm(nn.Module):
    """A norm's gain; the normalisation itself happens in the wide block (``rms``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.n_embd, cfg.head_dim
        qkv_bias = cfg.attention_bias in ("qkv", "all")
        self.q_proj = nn.Linear(d, cfg.n_head * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_head * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_head * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * hd, d, bias=cfg.attention_bias == "all")
        if cfg.family == "gemma3":
            self.q_norm, self.k_norm = RMSNorm(hd), RMSNorm(hd)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.n_embd, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.mlp_bias)


class DecoderLayer(nn.Module):
    """One block's weights. Its own ``forward`` (a stack of one) exists for FSDP, which unshards a
    wrapped block's parameters in the block's forward pre-hook."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.config, self.layer = cfg, layer
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.n_embd)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd)  # Gemma 3: after attention; others: before the MLP
        if cfg.family == "gemma3":
            self.pre_feedforward_layernorm = RMSNorm(cfg.n_embd)
            self.post_feedforward_layernorm = RMSNorm(cfg.n_embd)

    def forward(self, h: Tensor, inputs: "RopeInputs") -> tuple[Tensor, None]:
        """h: (B, T, 1, D) -> (block output, None)."""
        out, _ = DecoderStack.build([[self]], self.config)(h.unsqueeze(0), inputs)
        return out.squeeze(0), None


# -- what every block of one forward pass reads ---------------------------------------------------
@dataclass
class RopeInputs:
    """cos, sin: (T, hd/2) tables of the positions being computed, or (B, T, hd/2) when rows sit at
    different positions; cos_local, sin_local: Gemma 3's sliding-layer tables (None elsewhere);
    positions: (B, T) absolute positions (KV-cache calls)."""

    cos: Tensor
    sin: Tensor
    cos_local: Tensor | None = None
    sin_local: Tensor | None = None
    positions: Tensor | None = None

    def private(self) -> "RopeInputs":
        return self  # nothing is cached in it


# -- G wide blocks as one batched call ------------------------------------------------------------
@dataclass
class DecoderStack(GroupStack):
    """G wide blocks of M fused layers each, weights stacked on a leading G axis, pre-norm gains
    folded in. wq: (G, Hq*hd, D), wk / wv: (G, Hkv*hd, D), wo: (G, D, Hq*hd), w_gate / w_up:
    (G, F, D), w_down: (G, D, F) with Hq = M * n_head, Hkv = M * n_kv_head, F = M * ffn; biases
    (G, out) or None. Gemma 3: q_gain (G, Hq, hd), k_gain (G, Hkv, hd), post_attn / post_mlp
    (G, M, D), the (1 + w) gains. local_rope: G rows of M flags (layer uses the sliding-layer
    RoPE table). Calling it evaluates all G wide blocks."""

    layers: tuple[tuple[int, ...], ...]
    wq: Tensor
    wk: Tensor
    wv: Tensor
    wo: Tensor
    w_gate: Tensor
    w_up: Tensor
    w_down: Tensor
    head_dim: int
    windows: Windows
    local_rope: tuple[tuple[bool, ...], ...]
    eps: float
    gelu: bool = False
    scale: float | None = None
    bq: Tensor | None = None
    bk: Tensor | None = None
    bv: Tensor | None = None
    bo: Tensor | None = None
    b_gate: Tensor | None = None
    b_up: Tensor | None = None
    b_down: Tensor | None = None
    q_gain: Tensor | None = None
    k_gain: Tensor | None = None
    post_attn: Tensor | None = None
    post_mlp: Tensor | None = None
    branch_scale: float = 1.0

    @classmethod
    def build(cls, blocks: list[list[DecoderLayer]], cfg: ModelConfig, average_branches: bool = False) -> "DecoderStack":
        """Stack (and fuse) ``blocks[g]``, the M layers of wide block g. Differentiable: the stacked
        weights are built from the parameters. ``average_branches`` divides the branch sum by M."""
        fuse = len(blocks[0])
        if fuse == 0 or any(len(g) != fuse for g in blocks):
            raise ValueError(f"fusion groups must be non-empty and of one size, got sizes {sorted({len(g) for g in blocks})}")
        gemma = cfg.family == "gemma3"

        def gain(norm: RMSNorm) -> Tensor:
            return 1.0 + norm.weight if gemma else norm.weight

        def gather(get, cat_dim: int) -> Tensor:
            return _stack([[get(b) for b in g] for g in blocks], cat_dim)

        def gather_bias(get) -> Tensor | None:
            return None if get(blocks[0][0]) is None else gather(get, 0)

        attn_in = lambda b: gain(b.input_layernorm)  # noqa: E731
        mlp_in = lambda b: gain(b.pre_feedforward_layernorm if gemma else b.post_attention_layernorm)  # noqa: E731
        windows = cfg.window_sizes()
        types = cfg.layer_types or ("full_attention",) * cfg.n_layer
        bo = None
        if blocks[0][0].self_attn.o_proj.bias is not None:  # the M branch outputs are summed: so are their biases
            bo = torch.stack([sum(b.self_attn.o_proj.bias for b in g) for g in blocks])
        b_down = None
        if blocks[0][0].mlp.down_proj.bias is not None:
            b_down = torch.stack([sum(b.mlp.down_proj.bias for b in g) for g in blocks])
        return cls(
            layers=tuple(tuple(b.layer for b in g) for g in blocks),
            wq=gather(lambda b: b.self_attn.q_proj.weight * attn_in(b), 0),
            wk=gather(lambda b: b.self_attn.k_proj.weight * attn_in(b), 0),
            wv=gather(lambda b: b.self_attn.v_proj.weight * attn_in(b), 0),
            wo=gather(lambda b: b.self_attn.o_proj.weight, 1),
            w_gate=gather(lambda b: b.mlp.gate_proj.weight * mlp_in(b), 0),
            w_up=gather(lambda b: b.mlp.up_proj.weight * mlp_in(b), 0),
            w_down=gather(lambda b: b.mlp.down_proj.weight, 1),
            head_dim=cfg.head_dim,
            windows=tuple(tuple(windows[b.layer] for b in g for _ in range(cfg.n_head)) for g in blocks),
            local_rope=tuple(tuple(gemma and types[b.layer] == "sliding_attention" for b in g) for g in blocks),
            eps=cfg.norm_eps,
            gelu=gemma,
            scale=None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5,
            bq=gather_bias(lambda b: b.self_attn.q_proj.bias),
            bk=gather_bias(lambda b: b.self_attn.k_proj.bias),
            bv=gather_bias(lambda b: b.self_attn.v_proj.bias),
            bo=bo,
            b_gate=gather_bias(lambda b: b.mlp.gate_proj.bias),
            b_up=gather_bias(lambda b: b.mlp.up_proj.bias),
            b_down=b_down,
            q_gain=gather(lambda b: gain(b.self_attn.q_norm).expand(cfg.n_head, -1), 0) if gemma else None,
            k_gain=gather(lambda b: gain(b.self_attn.k_norm).expand(cfg.n_kv_head, -1), 0) if gemma else None,
            post_attn=torch.stack([torch.stack([gain(b.post_attention_layernorm) for b in g]) for g in blocks]) if gemma else None,
            post_mlp=torch.stack([torch.stack([gain(b.post_feedforward_layernorm) for b in g]) for g in blocks]) if gemma else None,
            branch_scale=1.0 / fuse if average_branches else 1.0,
        )

    # -- the wide block: h -> + attention branch(es) -> + MLP branch(es) ---------------------------
    def __call__(self, x: Tensor, inputs: RopeInputs, cache: KVCache | None = None) -> tuple[Tensor, None]:
        """x: (G, B, T, 1, D) -> (F(x) of the same shape, None: the identity surrogate). With a
        ``cache`` the new k, v are written at ``inputs.positions`` and queries attend over the cache."""
        h = x[..., 0, :]
        h = h + self.attention(rms(h, self.eps), inputs, cache)
        h = h + self.mlp(rms(h, self.eps))
        return h.unsqueeze(-2), None

    def linear(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """(G, B, T, in) -> (G, B, T, out), one batched matmul, + the (G, out) bias."""
        y = _project(x, w)
        return y if b is None else y + b.to(y.dtype)[:, None, None, :]

    def rope(self, x: Tensor, inputs: RopeInputs, per_layer: int) -> Tensor:
        """RoPE of q or k (G, B, T, M * per_layer, hd); Gemma 3's sliding layers use the local table."""
        flags = [f for row in self.local_rope for f in row]
        if not any(flags):
            return rotate(x, inputs.cos, inputs.sin)
        if all(flags):
            return rotate(x, inputs.cos_local, inputs.sin_local)
        local = torch.tensor(self.local_rope, device=x.device).repeat_interleave(per_layer, dim=1)  # (G, heads)
        return torch.where(local[:, None, None, :, None], rotate(x, inputs.cos_local, inputs.sin_local), rotate(x, inputs.cos, inputs.sin))

    def keys_values(self, xn: Tensor, inputs: RopeInputs) -> tuple[Tensor, Tensor]:
        """k (normed, rotated) and v of the normed attention input xn (G, B, T, D): (G, B, T, Hkv, hd)."""
        g, b, t, _ = xn.shape
        k = self.linear(xn, self.wk, self.bk).view(g, b, t, -1, self.head_dim)
        v = self.linear(xn, self.wv, self.bv).view(g, b, t, -1, self.head_dim)
        if self.k_gain is not None:  # Gemma 3: per-head RMS norm of k
            k = rms(k, self.eps) * self.k_gain.to(k.dtype)[:, None, None]
        return self.rope(k, inputs, k.size(3) // self.fuse), v

    @property
    def fuse(self) -> int:
        return len(self.layers[0])

    def attention(self, xn: Tensor, inputs: RopeInputs, cache: KVCache | None = None) -> Tensor:
        """The attention branches of the normed input xn (G, B, T, D), summed over the M fused layers."""
        g, b, t, _ = xn.shape
        q = self.linear(xn, self.wq, self.bq).view(g, b, t, -1, self.head_dim)
        if self.q_gain is not None:  # Gemma 3: per-head RMS norm of q
            q = rms(q, self.eps) * self.q_gain.to(q.dtype)[:, None, None]
        q = self.rope(q, inputs, q.size(3) // self.fuse)
        k, v = self.keys_values(xn, inputs)
        if cache is None:
            y = causal_attention(q, k, v, self.windows, self.scale)
        else:
            keys, values = cache.update(self.first_layer(), inputs.positions, k, v)
            y = cache.attend(q, keys, values, inputs.positions, self.windows, self.scale)
        return self.branches(y.reshape(g, b, t, -1), self.wo, self.bo, self.post_attn)

    def mlp(self, xn: Tensor) -> Tensor:
        """The MLP branches of the normed input xn (G, B, T, D), summed: down(act(gate xn) * up xn)."""
        gate = self.linear(xn, self.w_gate, self.b_gate)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.branches(act * self.linear(xn, self.w_up, self.b_up), self.w_down, self.b_down, self.post_mlp)

    def branches(self, y: Tensor, w: Tensor, b: Tensor | None, post: Tensor | None) -> Tensor:
        """The output projection of the M concatenated branch inputs y (G, B, T, M * width),
        summed over branches: one matmul, or (post norms, Gemma 3) each branch projected, normed
        with its own gain and then summed."""
        if post is None:
            out = self.linear(y, w, b)
        else:
            g, bsz, t, _ = y.shape
            m = self.fuse
            per_branch = torch.einsum("gbtmi,gdmi->gbtmd", y.view(g, bsz, t, m, -1), w.view(g, w.size(1), m, -1).to(y.dtype))
            out = (rms(per_branch, self.eps) * post.to(y.dtype)[:, None, None]).sum(3)
        return out if self.branch_scale == 1.0 else out * self.branch_scale

    def local(self, inputs: RopeInputs, cache: KVCache) -> tuple["DecoderStack", RopeInputs, KVCache]:
        """The same call with no layer index left in it (layers renumbered from 0, the cache narrowed
        to its layers), so one compiled region serves every stack of one shape."""
        first, count = self.first_layer(), sum(len(g) for g in self.layers)
        layers = tuple(tuple(l - first for l in g) for g in self.layers)
        return dataclasses.replace(self, layers=layers), inputs, cache.layers(first, count)

    def write_cache(self, x: Tensor, inputs: RopeInputs, cache: KVCache) -> None:
        """Write the k, v that attention computes from the inputs x (G, B, T, 1, D) at ``inputs.positions``."""
        k, v = self.keys_values(rms(x[..., 0, :], self.eps), inputs)
        cache.update(self.first_layer(), inputs.positions, k, v)


# -- the model ------------------------------------------------------------------------------------
class Llama(FamilyModel):
    """A Llama / Qwen2 / Gemma 3 text model (``config.family``) on the family interface."""

    block_type = DecoderLayer

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not config.is_hf:
            raise ValueError(f"family {config.family!r} is not a Hugging Face family: use build_model(config)")
        self.config = cfg = config
        self.family = cfg.family
        vocab, d = cfg.padded_vocab_size, cfg.n_embd
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, d),
            "h": nn.ModuleList([self.block_type(cfg, i) for i in range(cfg.n_layer)]),
            "ln_f": RMSNorm(d),
        })
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.mtp_projs = nn.ModuleList()  # no multi-token heads: the interface's empty list
        cos, sin = rope_tables(cfg, cfg.rope_base, scaled=True)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.family == "gemma3":
            cos_l, sin_l = rope_tables(cfg, cfg.rope_local_base or cfg.rope_base, scaled=False)
            self.register_buffer("rope_cos_local", cos_l, persistent=False)
            self.register_buffer("rope_sin_local", sin_l, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The init table of the module docstring."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=INIT_STD)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(0.0 if self.config.family == "gemma3" else 1.0)

    # -- embed ------------------------------------------------------------------------------------
    def embed(self, idx: Tensor, positions: Tensor | None = None, prev_idx: Tensor | None = None) -> tuple[RopeInputs, Tensor]:
        """idx: (B, T) token ids -> (RoPE inputs, h0 of shape (B, T, 1, D)). ``positions`` (B, T):
        absolute positions for KV-cache calls (default 0 .. T - 1); ``prev_idx`` is not read (no smear)."""
        cfg = self.config
        check_tokens(idx, cfg, positions)
        h = self.transformer.wte(idx)
        if cfg.family == "gemma3":  # sqrt(D), rounded as transformers' float32 buffer, in the table's dtype
            h = h * torch.tensor(cfg.n_embd**0.5, dtype=torch.float32).to(h.dtype)
        t = idx.size(1)

        def at(table: Tensor) -> Tensor:
            return table[:t] if positions is None else table[positions]

        local = (at(self.rope_cos_local), at(self.rope_sin_local)) if cfg.family == "gemma3" else (None, None)
        return RopeInputs(at(self.rope_cos), at(self.rope_sin), *local, positions=positions), h.unsqueeze(-2)

    # -- blocks -----------------------------------------------------------------------------------
    def stack(self, groups, average_branches: bool = False) -> DecoderStack:
        """Weights of G wide blocks: ``groups[g]`` lists the layers fused into wide block g (one size M)."""
        groups = [list(g) for g in groups]
        for g in groups:
            for layer in g:
                if not 0 <= layer < self.config.n_layer:
                    raise ValueError(f"layer index {layer} out of range 0..{self.config.n_layer - 1}")
        return DecoderStack.build([[self.transformer.h[l] for l in g] for g in groups], self.config, average_branches)

    def block(self, layer: int, h: Tensor, inputs: RopeInputs, blended: bool = False) -> tuple[Tensor, None]:
        """Block ``layer`` on h (B, T, 1, D) -> (its output, None), through the block's own module
        call (FSDP hooks). There is no input blend in these families: ``blended`` changes nothing."""
        return self.transformer.h[layer](h, inputs)

    def blend(self, layer: int, h: Tensor, inputs: RopeInputs) -> Tensor:
        """No blend in these families: h itself."""
        return h

    # -- head -------------------------------------------------------------------------------------
    def hidden(self, h_last: Tensor, h_backout: Tensor | None) -> Tensor:
        """The last block's output (B, T, 1, D) -> (B, T, D); there is no backout."""
        return h_last.sum(-2)

    def logits(self, x: Tensor) -> Tensor:
        """Hidden x (B, T, D) -> final norm -> lm_head -> logits (B, T, vocab_size), float32 (float64 stays)."""
        cfg = self.config
        gain = 1.0 + self.transformer.ln_f.weight if cfg.family == "gemma3" else self.transformer.ln_f.weight
        logits = F.linear(rms(x, cfg.norm_eps) * gain.to(x.dtype), self.lm_head.weight.to(x.dtype))[..., : cfg.vocab_size]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if cfg.logit_softcap is not None:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        return logits

    def mtp_logits(self, x: Tensor) -> list[Tensor]:
        return []
