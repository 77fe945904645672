"""The per-layer parameter modules. Names match nanochat's state dict, so checkpoints map 1:1.

Every block computation goes through ``stack.wide_block_forward``, which evaluates G blocks (or G
fused chunks) in one batched call; ``Block.forward`` is that call with G = 1, M = 1 (views, no
copies). Going through the block's own ``__call__`` keeps module hooks working (FSDP unshards a
wrapped block's parameters in its forward pre-hook).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from ..config import ModelConfig
from .mhc import DynamicHyperConnection, StaticHyperConnection

if TYPE_CHECKING:
    from .gpt import GPT
    from .stack import BlockInputs

VE_GATE_CHANNELS = 12


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
    """One Transformer block: attention + MLP, and for mHC one connection per sub-layer."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        if cfg.use_mhc:
            n = cfg.mhc_num_streams
            streams = ((2 * layer) % n, (2 * layer + 1) % n)  # H_pre starts on these streams
            if cfg.mhc_variant == "static":
                self.hc_attn = StaticHyperConnection(n, streams[0])
                self.hc_mlp = StaticHyperConnection(n, streams[1])
            else:
                self.hc_attn = DynamicHyperConnection(n, cfg.n_embd, streams[0])
                self.hc_mlp = DynamicHyperConnection(n, cfg.n_embd, streams[1])

    def forward(self, h: Tensor, inputs: "BlockInputs", model: "GPT") -> tuple[Tensor, Tensor | None]:
        """h: (B, T, n, D) -> (block output, surrogate Jacobian (b, t, n, n) for mHC, None = identity).

        ``model`` supplies the config and the root-level per-layer scalars (resid / x0 lambdas).
        """
        from .stack import stack_blocks, wide_block_forward

        out, surrogate = wide_block_forward(stack_blocks(model, [[self.layer]]), h.unsqueeze(0), inputs)
        return out.squeeze(0), None if surrogate is None else surrogate.squeeze(0)
