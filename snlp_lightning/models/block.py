"""The per-layer parameter modules. Names match nanochat's state dict, so checkpoints map 1:1.

The blocks hold parameters only: every block computation goes through ``stack.wide_block_forward``,
which evaluates G blocks (or G fused chunks) in one batched call; a single block is G = 1, M = 1.
"""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .mhc import DynamicHyperConnection, StaticHyperConnection

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
