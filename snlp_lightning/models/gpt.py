"""The nanochat GPT and its mHC twin, as the three pieces the solvers use: embed, blocks, head.

    inputs, h0 = model.embed(idx)                       # h0: (B, T, n, D)
    h, A = model.block(l, h, inputs)                    # one block, A = surrogate Jacobian or None
    logits = model.head(h_L, h_backout)                 # (B, T, vocab_size), float32 (float64 stays)

``forward(idx)`` is the sequential model. Module names follow nanochat so state dicts map 1:1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import UserError
from .block import Block
from .layers import rms_norm, rotary_tables
from .stack import BlockInputs, WideBlocks, stack_blocks

SMEAR_CHANNELS = 24


class TokenRangeError(UserError):
    """Token ids outside the vocabulary, or a token tensor of a shape or dtype the model cannot read."""


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        cfg = config
        vocab, d, kv_dim = cfg.padded_vocab_size, cfg.n_embd, cfg.n_kv_head * cfg.head_dim
        self.transformer = nn.ModuleDict(
            {"wte": nn.Embedding(vocab, d), "h": nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])}
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
        cos, sin = rotary_tables(cfg.sequence_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos.float(), persistent=False)
        self.register_buffer("rope_sin", sin.float(), persistent=False)
        self.window_sizes = cfg.window_sizes()
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

    # -- initialisation (spec section 5) ----------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.config
        nn.init.normal_(self.transformer.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = 3**0.5 * cfg.n_embd**-0.5  # uniform with std d^-1/2
        for block in self.transformer.h:
            for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight):
                nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
            if cfg.use_mhc:
                block.hc_attn.reset_parameters()
                block.hc_mlp.reset_parameters()
        depth = torch.arange(cfg.n_layer, dtype=torch.float32) / max(cfg.n_layer - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * depth)
        self.x0_lambdas.copy_(0.20 - 0.15 * depth)
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -bound, bound)
        self.smear_gate.reset_parameters()
        self.smear_lambda.zero_()
        self.backout_lambda.fill_(0.2)

    # -- the three pieces -------------------------------------------------------------------------
    def embed(self, idx: Tensor, positions: Tensor | None = None, prev_idx: Tensor | None = None) -> tuple[BlockInputs, Tensor]:
        """idx: (B, T) token ids -> (inputs every block reads, h0 of shape (B, T, n, D)).

        Decoding with a KV cache passes ``positions`` (B, T), the absolute position of every token
        (default 0 .. T - 1), and ``prev_idx`` (B,), the token just before ``idx[:, 0]``, whose
        embedding smear mixes into rows whose position is > 0.
        """
        cfg = self.config
        if not isinstance(idx, Tensor):
            raise TokenRangeError(f"tokens must be an integer tensor of shape (batch, time), got {type(idx).__name__}")
        if idx.dim() != 2 or idx.size(0) < 1 or idx.size(1) < 1:
            raise TokenRangeError(f"tokens must have shape (batch, time) with batch, time >= 1, got {tuple(idx.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):  # what the embedding takes
            raise TokenRangeError(f"tokens must be an integer tensor (int64 or int32), got {idx.dtype}")
        t = idx.size(1)
        if positions is None and t > cfg.sequence_len:
            raise TokenRangeError(f"sequence of {t} tokens exceeds sequence_len={cfg.sequence_len}")
        if not torch.compiler.is_compiling() and idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= cfg.vocab_size:
                bad = hi if hi >= cfg.vocab_size else lo
                raise TokenRangeError(f"token id {bad} is out of the vocabulary: allowed 0..{cfg.vocab_size - 1}")
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

    def stack(self, groups, average_branches: bool = False) -> WideBlocks:
        """Weights of G wide blocks (see ``stack.stack_blocks``)."""
        return stack_blocks(self, groups, average_branches)

    def block(self, layer: int, h: Tensor, inputs: BlockInputs) -> tuple[Tensor, Tensor | None]:
        """Block ``layer`` on h (B, T, n, D) -> (its output, its surrogate Jacobian; None = identity)."""
        return self.transformer.h[layer](h, inputs, self)

    def head(self, h_last: Tensor, h_backout: Tensor | None) -> Tensor:
        """h_last: (B, T, n, D) output of the last block; h_backout: output of block L // 2.

        Returns logits (B, T, vocab_size), softcapped, float32 (float64 if the model is float64).
        """
        cfg = self.config
        x = h_last.sum(-2)  # mHC: the streams are summed before the final norm
        if cfg.backout:
            x = x - self.backout_lambda.to(x.dtype) * h_backout.sum(-2)
        logits = nn.functional.linear(rms_norm(x), self.lm_head.weight.to(x.dtype))[..., : cfg.vocab_size]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        cap = cfg.logit_softcap
        return cap * torch.tanh(logits / cap)

    @property
    def backout_layer(self) -> int:
        return self.config.n_layer // 2

    # -- the sequential model ---------------------------------------------------------------------
    def forward_trace(self, idx: Tensor) -> tuple[BlockInputs, list[Tensor]]:
        """Sequential forward keeping every state: [h_0, h_1, ..., h_L], each (B, T, n, D)."""
        inputs, h = self.embed(idx)
        trace = [h]
        for layer in range(self.config.n_layer):
            h, _ = self.block(layer, h, inputs)
            trace.append(h)
        return inputs, trace

    def forward(self, idx: Tensor) -> Tensor:
        """Sequential logits (B, T, vocab_size)."""
        _, trace = self.forward_trace(idx)
        return self.head(trace[-1], trace[self.backout_layer + 1])
