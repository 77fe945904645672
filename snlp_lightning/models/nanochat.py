"""The nanochat family: karpathy/nanochat's GPT as the four pieces every solver uses.

    h0, inputs = model.embed(tokens)                  # h0: (B, T, n, D), inputs: what every block reads
    blocks = model.stack(groups)                      # weights of any grouping of layers, fused per group
    out, A = blocks(x, inputs, cache=None)            # (G, B, T, n, D) -> same, all groups in one call
    logits = model.head(h_last, h_backout)            # (B, T, vocab_size), float32 (float64 stays)

A = None is the identity surrogate (IDN); the mHC family (``mhc.py``) returns its H_res product.
``forward(tokens)`` is the sequential model. Module names follow nanochat so state dicts map 1:1.
Hidden states carry a stream axis n (1 here, mHC's streams there): (B, T, n, D).

Spec section 3's fusion: a group of M layers becomes one wide block whose Q/K/V and MLP up-
projections are the M blocks' weights concatenated (M * n_head heads, hidden M * 4D) and whose
output projections are concatenated along their inputs (the M branch outputs summed). Every
weight carries a leading G axis, so one matmul per projection evaluates all G wide blocks.

Initialisation (spec section 5; ``GPT.init_weights``), with s = 3^0.5 * D^-0.5 (uniform of std D^-0.5):

    parameter                        init
    transformer.wte                  normal, std 0.8
    lm_head                          normal, std 0.001
    attn.c_q, c_k, c_v               uniform(-s, s)
    attn.c_proj, mlp.c_proj          zeros (every block starts as the identity)
    mlp.c_fc                         uniform(-0.4 s, 0.4 s)
    attn.ve_gate                     uniform(0, 0.02)
    value_embeds                     uniform(-s, s)
    resid_lambdas, x0_lambdas        1.15 - 0.10 d, 0.20 - 0.15 d   (d = layer / (L - 1))
    smear_gate, smear_lambda         nn.Linear default, 0
    backout_lambda                   0.2
    mtp_projs (num_mtp_steps > 0)    uniform(-s, s)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import UserError
from .attention import Windows, causal_attention
from .family import FamilyModel, GroupStack, check_tokens
from .kv_cache import KVCache

SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels of the normed embedding
VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels of the attention input
QK_SCALE = 1.2  # nanochat sharpens attention by scaling the normed q and k


# -- stateless pieces -----------------------------------------------------------------------------
def rms_norm(x: Tensor) -> Tensor:
    """Parameter-free RMS norm over the last axis."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(max_len: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin tables of shape (max_len, head_dim // 2), float64 (cast at use)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split rotation. x: (..., T, H, hd); cos, sin: (T, hd // 2), or (B, T, hd // 2) for x of
    shape (..., B, T, H, hd) whose rows sit at different positions."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos.unsqueeze(-2).to(x.dtype)  # broadcast over the heads
    sin = sin.unsqueeze(-2).to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


# -- the per-layer parameters (names match nanochat's state dict) ---------------------------------
def _linear(fan_in: int, fan_out: int) -> nn.Linear:
    return nn.Linear(fan_in, fan_out, bias=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d, hd = cfg.n_embd, cfg.head_dim
        self.c_q = _linear(d, cfg.n_head * hd)
        self.c_k = _linear(d, cfg.n_kv_head * hd)
        self.c_v = _linear(d, cfg.n_kv_head * hd)
        self.c_proj = _linear(cfg.n_head * hd, d)
        # nanochat creates the gate only where the layer reads a value embedding.
        self.ve_gate = _linear(VE_GATE_CHANNELS, cfg.n_kv_head) if cfg.has_value_embedding(layer) else None


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = _linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = _linear(4 * cfg.n_embd, cfg.n_embd)


class Block(nn.Module):
    """One Transformer block's weights. Its own ``forward`` (a stack of one) exists for FSDP, which
    unshards a wrapped block's parameters in the block's forward pre-hook."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.config, self.layer = cfg, layer
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)

    @torch.no_grad()
    def init_weights(self, bound: float) -> None:
        """This block's rows of the init table; ``bound`` = 3^0.5 * D^-0.5."""
        for w in (self.attn.c_q.weight, self.attn.c_k.weight, self.attn.c_v.weight):
            nn.init.uniform_(w, -bound, bound)
        nn.init.uniform_(self.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
        nn.init.zeros_(self.attn.c_proj.weight)
        nn.init.zeros_(self.mlp.c_proj.weight)
        if self.attn.ve_gate is not None:
            nn.init.uniform_(self.attn.ve_gate.weight, 0.0, 0.02)

    @staticmethod
    def stack_type() -> type["WideBlocks"]:
        return WideBlocks

    def forward(self, h: Tensor, inputs: "BlockInputs", lambdas: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """h: (B, T, n, D) -> (block output, surrogate A or None); lambdas: (1, 2) (resid, x0) or None."""
        out, a = self.stack_type().build([[self]], self.config, lambdas)(h.unsqueeze(0), inputs)
        return out.squeeze(0), None if a is None else a.squeeze(0)


# -- what every block of one forward pass reads ---------------------------------------------------
@dataclass
class BlockInputs:
    """x0: (B, T, n, D) the (smeared) embedding, for the x0 blend; cos, sin: (T, hd/2) rotary tables
    of the positions being computed, or (B, T, hd/2) when rows sit at different positions;
    value_embeds: layer -> (B, T, Hkv * hd); positions: (B, T) absolute positions (KV-cache calls).
    """

    x0: Tensor
    cos: Tensor
    sin: Tensor
    value_embeds: dict[int, Tensor]
    positions: Tensor | None = None
    _ve_stacks: dict = field(default_factory=dict)

    def private(self) -> "BlockInputs":
        """A copy with its own (empty) cache of value-embedding stacks, for code whose tensors must
        not outlive it (a torch.func transform, a power iteration)."""
        return dataclasses.replace(self, _ve_stacks={})

    def value_embeds_for(self, layers: tuple[int | None, ...], batch: int) -> Tensor:
        """(G, batch, T, Hkv * hd): layer l's value embedding per group, zeros where None."""
        key = (layers, batch)
        if key not in self._ve_stacks:
            some = next(iter(self.value_embeds.values()))
            rows = [self.value_embeds[l] if l is not None else torch.zeros_like(some) for l in layers]
            self._ve_stacks[key] = repeat_batch(torch.stack(rows), batch, dim=1)
        return self._ve_stacks[key]


def repeat_batch(t: Tensor, batch: int, dim: int = 0) -> Tensor:
    """Tile t along ``dim`` up to ``batch`` rows (probe-doubled batches of the DiagN solver)."""
    reps = batch // t.size(dim)
    if reps == 1:
        return t
    sizes = [1] * t.dim()
    sizes[dim] = reps
    return t.repeat(*sizes)


# -- G wide blocks as one batched call ------------------------------------------------------------
def _stack(groups: list[list[Tensor]], cat_dim: int) -> Tensor:
    """Concatenate each group's tensors along ``cat_dim``, stack the groups on a new axis 0."""
    per_group = [g[0] if len(g) == 1 else torch.cat(g, dim=cat_dim) for g in groups]
    return per_group[0].unsqueeze(0) if len(per_group) == 1 else torch.stack(per_group)


def _project(x: Tensor, w: Tensor) -> Tensor:
    """x: (G, B, T, in), w: (G, out, in) -> (G, B, T, out); one batched matmul."""
    g, b, t, _ = x.shape
    return torch.bmm(x.reshape(g, b * t, -1), w.to(x.dtype).transpose(1, 2)).view(g, b, t, -1)


@dataclass
class WideBlocks(GroupStack):
    """G wide blocks of M fused layers each, weights stacked on a leading G axis.

    wq: (G, Hq*hd, D), wk/wv: (G, Hkv*hd, D), wo: (G, D, Hq*hd), w_fc: (G, F, D), w_proj: (G, D, F),
    with Hq = M * n_head, Hkv = M * n_kv_head, F = M * 4D. lambdas: (G, 2) averaged (resid, x0)
    or None; ve_gate: (G, n_kv_head, 12) or None (only when M = 1). Calling it evaluates them.
    """

    layers: tuple[tuple[int, ...], ...]
    wq: Tensor
    wk: Tensor
    wv: Tensor
    wo: Tensor
    w_fc: Tensor
    w_proj: Tensor
    head_dim: int
    windows: Windows
    lambdas: Tensor | None = None
    ve_gate: Tensor | None = None
    ve_layers: tuple[int | None, ...] = ()
    branch_scale: float = 1.0

    @classmethod
    def build(cls, blocks: list[list[Block]], cfg: ModelConfig, lambdas: Tensor | None, average_branches: bool = False, **extra):
        """Stack (and fuse) ``blocks[g]``, the M blocks of wide block g; ``lambdas`` (G, 2) or None.

        With M > 1 value embeddings are dropped; ``average_branches`` divides the summed branch
        outputs by M. Differentiable: the stacked weights are built from the parameters.
        """
        fuse = len(blocks[0])
        if fuse == 0 or any(len(g) != fuse for g in blocks):
            raise ValueError(f"fusion groups must be non-empty and of one size, got sizes {sorted({len(g) for g in blocks})}")

        def gather(get: Callable, cat_dim: int) -> Tensor:
            return _stack([[get(b) for b in g] for g in blocks], cat_dim)

        windows_per_layer = cfg.window_sizes()
        ve_gate, ve_layers = None, tuple(None for _ in blocks)
        if fuse == 1 and any(g[0].attn.ve_gate is not None for g in blocks):
            ref = next(g[0].attn.ve_gate.weight for g in blocks if g[0].attn.ve_gate is not None)
            ve_gate = torch.stack([g[0].attn.ve_gate.weight if g[0].attn.ve_gate is not None else torch.zeros_like(ref) for g in blocks])
            ve_layers = tuple(g[0].layer if g[0].attn.ve_gate is not None else None for g in blocks)
        return cls(
            layers=tuple(tuple(b.layer for b in g) for g in blocks),
            wq=gather(lambda b: b.attn.c_q.weight, 0),
            wk=gather(lambda b: b.attn.c_k.weight, 0),
            wv=gather(lambda b: b.attn.c_v.weight, 0),
            wo=gather(lambda b: b.attn.c_proj.weight, 1),
            w_fc=gather(lambda b: b.mlp.c_fc.weight, 0),
            w_proj=gather(lambda b: b.mlp.c_proj.weight, 1),
            head_dim=cfg.head_dim,
            windows=tuple(tuple(windows_per_layer[b.layer] for b in g for _ in range(cfg.n_head)) for g in blocks),
            lambdas=lambdas,
            ve_gate=ve_gate,
            ve_layers=ve_layers,
            branch_scale=1.0 / fuse if average_branches else 1.0,
            **extra,
        )

    # -- the wide block: x -> blend -> attention sub-layer -> MLP sub-layer ------------------------
    def __call__(self, x: Tensor, inputs: BlockInputs, cache: KVCache | None = None) -> tuple[Tensor, Tensor | None]:
        """x: (G, B, T, n, D), each wide block's input state (before the lambda blend).

        Returns (F(x) of shape (G, B, T, n, D), A): A = None, the identity surrogate. With a
        ``cache`` the new k, v are written at ``inputs.positions`` and queries attend over the cache.
        """
        x = self.blend(x, inputs)
        x = x + self.scaled(self.attention(rms_norm(x[..., 0, :]), inputs, cache)).unsqueeze(-2)
        x = x + self.scaled(self.mlp(rms_norm(x[..., 0, :]))).unsqueeze(-2)
        return x, None

    def blend(self, x: Tensor, inputs: BlockInputs) -> Tensor:
        """lambda_res * x + lambda_x0 * x0 for lambda models (identity otherwise). x: (G, B, T, n, D)."""
        if self.lambdas is None:
            return x
        lam = self.lambdas.to(x.dtype)[:, None, None, None, None, :]  # (G, 1, 1, 1, 1, 2)
        return lam[..., 0] * x + lam[..., 1] * repeat_batch(inputs.x0, x.size(1)).unsqueeze(0)

    def scaled(self, out: Tensor) -> Tensor:
        return out if self.branch_scale == 1.0 else out * self.branch_scale

    def attention_input(self, x: Tensor) -> Tensor:
        """The normed attention input (G, B, T, D) of blended states x (G, B, T, n, D)."""
        return rms_norm(x[..., 0, :])

    def keys_values(self, xn: Tensor, inputs: BlockInputs) -> tuple[Tensor, Tensor]:
        """k (rotated, normed, scaled) and v of the normed attention input xn (G, B, T, D): (G, B, T, Hkv, hd)."""
        g, b, t, _ = xn.shape
        hd = self.head_dim
        k = _project(xn, self.wk).view(g, b, t, -1, hd)
        v = _project(xn, self.wv).view(g, b, t, -1, hd)
        if self.ve_gate is not None:
            gate = 3 * torch.sigmoid(_project(xn[..., :VE_GATE_CHANNELS], self.ve_gate))  # (G, B, T, Hkv)
            ve = inputs.value_embeds_for(self.ve_layers, b).to(v.dtype).view(g, b, t, -1, hd)
            v = v + gate.unsqueeze(-1) * ve
        return rms_norm(apply_rotary(k, inputs.cos, inputs.sin)) * QK_SCALE, v

    def attention(self, xn: Tensor, inputs: BlockInputs, cache: KVCache | None = None) -> Tensor:
        """Sum over the fused blocks of Attn_m(xn). xn: (G, B, T, D) normed input -> (G, B, T, D)."""
        g, b, t, _ = xn.shape
        q = _project(xn, self.wq).view(g, b, t, -1, self.head_dim)
        q = rms_norm(apply_rotary(q, inputs.cos, inputs.sin)) * QK_SCALE
        k, v = self.keys_values(xn, inputs)
        if cache is None:
            y = causal_attention(q, k, v, self.windows)
        else:
            keys, values = cache.update(self.first_layer(), inputs.positions, k, v)
            y = cache.attend(q, keys, values, inputs.positions, self.windows)
        return _project(y.reshape(g, b, t, -1), self.wo)

    def mlp(self, xn: Tensor) -> Tensor:
        """Sum over the fused blocks of MLP_m(xn) = c_proj(relu(c_fc xn)^2). (G, B, T, D) -> same."""
        return _project(torch.relu(_project(xn, self.w_fc)).square(), self.w_proj)

    def local(self, inputs: BlockInputs, cache: KVCache) -> tuple["WideBlocks", BlockInputs, KVCache]:
        """The same call with no layer index left in it: layers renumbered from 0, the value
        embeddings it reads keyed by the new numbers, the cache narrowed to its layers (views).
        One compiled region then serves every stack of one shape, whatever its layers. A stack
        without value embeddings drops its (all-zero) gate: v + gate * 0 is v."""
        first, count = self.first_layer(), sum(len(g) for g in self.layers)
        ve_layers = tuple(None if l is None else l - first for l in self.ve_layers)
        ve_gate = None if all(l is None for l in ve_layers) else self.ve_gate
        layers = tuple(tuple(l - first for l in g) for g in self.layers)
        stack = dataclasses.replace(self, layers=layers, ve_layers=ve_layers, ve_gate=ve_gate)
        value_embeds = {l - first: inputs.value_embeds[l] for l in self.ve_layers if l is not None}
        return stack, dataclasses.replace(inputs, value_embeds=value_embeds, _ve_stacks={}), cache.layers(first, count)

    def write_cache(self, x: Tensor, inputs: BlockInputs, cache: KVCache) -> None:
        """Write the k, v that attention computes from the inputs x (G, B, T, n, D) at
        ``inputs.positions``: the attention sub-layer up to the kv projections, nothing else."""
        k, v = self.keys_values(self.attention_input(self.blend(x, inputs)), inputs)
        cache.update(self.first_layer(), inputs.positions, k, v)


# -- the model ------------------------------------------------------------------------------------
class GPT(FamilyModel):
    """nanochat's GPT (spec section 5): embedding with smear, L blocks, backout, softcapped head."""

    family = "nanochat"
    block_type = Block

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.use_mhc and self.family == "nanochat":
            raise UserError("an mHC config (use_mhc=True) builds an mHC model: use build_model(config)")
        self.config = cfg = config
        vocab, d, kv_dim = cfg.padded_vocab_size, cfg.n_embd, cfg.n_kv_head * cfg.head_dim
        self.transformer = nn.ModuleDict(
            {"wte": nn.Embedding(vocab, d), "h": nn.ModuleList([self.block_type(cfg, i) for i in range(cfg.n_layer)])}
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)
        # nanochat keeps these parameters whatever the flags say; flags decide whether they are used.
        self.resid_lambdas = nn.Parameter(torch.ones(cfg.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(cfg.n_layer))
        self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(vocab, kv_dim) for i in range(cfg.n_layer) if i % 2 == (cfg.n_layer - 1) % 2}
        )
        # Multi-token prediction heads (training only; empty list = no state-dict keys, as nanochat).
        self.mtp_projs = nn.ModuleList([nn.Linear(d, d, bias=False) for _ in range(cfg.num_mtp_steps)])
        cos, sin = rotary_tables(cfg.sequence_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos.float(), persistent=False)
        self.register_buffer("rope_sin", sin.float(), persistent=False)
        self.init_weights()
        self._freeze_unused()

    def _freeze_unused(self) -> None:
        """Parameters kept only for nanochat's state-dict layout get requires_grad=False, so
        optimizers skip them and DDP does not wait for gradients that never come."""
        cfg = self.config
        unused = []
        if not cfg.uses_lambdas:
            unused += [self.resid_lambdas, self.x0_lambdas]
        if cfg.no_ve:
            unused += list(self.value_embeds.parameters())
        if not cfg.smear:
            unused += [self.smear_gate.weight, self.smear_lambda]
        if not cfg.backout:
            unused.append(self.backout_lambda)
        for p in unused:
            p.requires_grad_(False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The init table of the module docstring."""
        cfg = self.config
        nn.init.normal_(self.transformer.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = 3**0.5 * cfg.n_embd**-0.5  # uniform with std d^-1/2
        for block in self.transformer.h:
            block.init_weights(bound)
        depth = torch.arange(cfg.n_layer, dtype=torch.float32) / max(cfg.n_layer - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * depth)
        self.x0_lambdas.copy_(0.20 - 0.15 * depth)
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -bound, bound)
        self.smear_gate.reset_parameters()
        self.smear_lambda.zero_()
        self.backout_lambda.fill_(0.2)
        for proj in self.mtp_projs:  # last, so models without them draw the same numbers as before
            nn.init.uniform_(proj.weight, -bound, bound)

    # -- embed ------------------------------------------------------------------------------------
    def embed(self, idx: Tensor, positions: Tensor | None = None, prev_idx: Tensor | None = None) -> tuple[BlockInputs, Tensor]:
        """idx: (B, T) token ids -> (inputs every block reads, h0 of shape (B, T, n, D)).

        Decoding with a KV cache passes ``positions`` (B, T), the absolute position of every token
        (default 0 .. T - 1), and ``prev_idx`` (B,), the token just before ``idx[:, 0]``, whose
        embedding smear mixes into rows whose position is > 0.
        """
        cfg = self.config
        check_tokens(idx, cfg, positions)
        t = idx.size(1)
        dtype = self.transformer.wte.weight.dtype
        x = rms_norm(self.transformer.wte(idx))
        if cfg.smear and (t > 1 or prev_idx is not None):
            # Mix the previous token's (pre-smear, normed) embedding into each position t >= 1.
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
            if prev_idx is None:
                x = torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
            else:
                # Position t reads token t - 1 of this call, position 0 reads prev_idx. (A gather, not
                # x[:, :-1]: a T - 1 slice would pin T to a constant in an exported graph.)
                steps = torch.arange(t, device=idx.device)
                before = torch.where(
                    (steps == 0).view(1, t, 1), rms_norm(self.transformer.wte(prev_idx)).unsqueeze(1), x[:, (steps - 1).clamp(min=0)]
                )
                x = x + gate * before * (positions > 0).unsqueeze(-1).to(x.dtype)
        x0 = x.unsqueeze(-2).expand(*x.shape[:2], cfg.n_streams, cfg.n_embd)  # (B, T, n, D)
        value_embeds = {}
        if not cfg.no_ve:
            value_embeds = {int(k): table(idx).to(dtype) for k, table in self.value_embeds.items()}
        if positions is None:
            cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, hd / 2)
        inputs = BlockInputs(x0=x0, cos=cos, sin=sin, value_embeds=value_embeds, positions=positions)
        return inputs, x0

    # -- blocks -----------------------------------------------------------------------------------
    def stack(self, groups, average_branches: bool = False) -> WideBlocks:
        """Weights of G wide blocks: ``groups[g]`` lists the layers fused into wide block g (all
        groups of one size M). With M > 1 the resid / x0 lambdas are averaged over the group."""
        cfg = self.config
        groups = [list(g) for g in groups]
        for g in groups:
            for layer in g:
                if not 0 <= layer < cfg.n_layer:
                    raise ValueError(f"layer index {layer} out of range 0..{cfg.n_layer - 1}")
        blocks = [[self.transformer.h[layer] for layer in g] for g in groups]
        return self.block_type.stack_type().build(blocks, cfg, self.group_lambdas(groups), average_branches)

    def group_lambdas(self, groups: list[list[int]]) -> Tensor | None:
        """(G, 2): each group's mean (resid, x0) lambdas, or None for models without the blend."""
        if not self.config.uses_lambdas:
            return None
        per_layer = torch.stack([self.resid_lambdas, self.x0_lambdas], dim=-1)  # (L, 2)
        return torch.stack([per_layer[g].mean(0) for g in groups])

    def block(self, layer: int, h: Tensor, inputs: BlockInputs, blended: bool = False) -> tuple[Tensor, Tensor | None]:
        """Block ``layer`` on h (B, T, n, D) -> (its output, its surrogate A; None = identity),
        through the block's own module call (FSDP hooks). ``blended=True``: h is already the
        block's blended input (``blend``) and no blend is applied, so
        ``block(l, h) == block(l, blend(l, h), blended=True)`` (the Jacobi regularizer perturbs
        the blended input, as the authors' code does)."""
        return self.transformer.h[layer](h, inputs, None if blended else self.group_lambdas([[layer]]))

    def blend(self, layer: int, h: Tensor, inputs: BlockInputs) -> Tensor:
        """Block ``layer``'s input after its lambda blend, lambda_res h + lambda_x0 x0 (h itself for
        models without the blend); the same arithmetic as the blend inside ``block``."""
        lambdas = self.group_lambdas([[layer]])
        if lambdas is None:
            return h
        lam = lambdas[0].to(h.dtype)
        return lam[0] * h + lam[1] * inputs.x0

    # -- head -------------------------------------------------------------------------------------
    def hidden(self, h_last: Tensor, h_backout: Tensor | None) -> Tensor:
        """h_last: (B, T, n, D) output of the last block; h_backout: output of block L // 2.

        Returns the pre-norm hidden state (B, T, D) the head and the MTP heads read.
        """
        x = h_last.sum(-2)  # mHC: the streams are summed before the final norm
        if self.config.backout:
            x = x - self.backout_lambda.to(x.dtype) * h_backout.sum(-2)
        return x

    def logits(self, x: Tensor) -> Tensor:
        """Pre-norm hidden x (B, T, D) -> logits (B, T, vocab_size), softcapped, float32 (float64 stays)."""
        cfg = self.config
        logits = F.linear(rms_norm(x), self.lm_head.weight.to(x.dtype))[..., : cfg.vocab_size]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        cap = cfg.logit_softcap
        return cap * torch.tanh(logits / cap)

    def mtp_logits(self, x: Tensor) -> list[Tensor]:
        """Pre-norm hidden x (B, T, D) -> one logits tensor per MTP head k = 1..num_mtp_steps,
        (B, T - k, vocab_size): position t of head k predicts the token k steps after the next one.
        Each head is a D x D projection before the final norm; the lm_head is shared."""
        return [self.logits(proj(x[:, :-k])) for k, proj in enumerate(self.mtp_projs, start=1)]
