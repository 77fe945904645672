"""What every model family shares: the token checks of ``embed``, a stack's group bookkeeping and
the sequential model written over the family interface (``models/__init__.py`` lists it).

A family's own file (``nanochat.py``, ``mhc.py``, ``llama.py``) holds its math; this one holds only
what would otherwise be written once per family.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import UserError


class TokenRangeError(UserError):
    """Token ids outside the vocabulary, or a token tensor of a shape or dtype the model cannot read."""


def check_tokens(idx: Tensor, cfg: ModelConfig, positions: Tensor | None) -> None:
    """One-line errors for token tensors a model cannot embed: not (B, T) integers, longer than
    ``sequence_len`` (without explicit positions), or ids outside 0 .. vocab_size - 1."""
    if not isinstance(idx, Tensor):
        raise TokenRangeError(f"tokens must be an integer tensor of shape (batch, time), got {type(idx).__name__}")
    if idx.dim() != 2 or idx.size(0) < 1 or idx.size(1) < 1:
        raise TokenRangeError(f"tokens must have shape (batch, time) with batch, time >= 1, got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):  # what the embedding takes
        raise TokenRangeError(f"tokens must be an integer tensor (int64 or int32), got {idx.dtype}")
    if positions is None and idx.size(1) > cfg.sequence_len:
        raise TokenRangeError(f"sequence of {idx.size(1)} tokens exceeds sequence_len={cfg.sequence_len}")
    # A host sync: not inside a compiled graph, nor while a CUDA graph captures a compiled
    # decoder step (its regions are compiled, the embedding between them is not).
    if not torch.compiler.is_compiling() and idx.numel() and not (idx.is_cuda and torch.cuda.is_current_stream_capturing()):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = hi if hi >= cfg.vocab_size else lo
            raise TokenRangeError(f"token id {bad} is out of the vocabulary: allowed 0..{cfg.vocab_size - 1}")


class GroupStack:
    """Group bookkeeping of a family's stack (a dataclass with ``layers``: G tuples of the layers
    fused into each wide block, and tensors / per-group tuples on a leading G axis)."""

    layers: tuple[tuple[int, ...], ...]

    @property
    def groups(self) -> int:
        return len(self.layers)

    def select(self, g: int):
        """Wide block g alone, as a G = 1 stack (views)."""
        return self.take(g, g + 1)

    def take(self, start: int, stop: int):
        """Wide blocks start .. stop - 1 as a stack of their own (views)."""
        def cut(value):
            if isinstance(value, (Tensor, tuple)):
                return value[start:stop]
            return value.take(start, stop) if hasattr(value, "take") else value  # a family's own parts (mHC)

        return dataclasses.replace(self, **{f.name: cut(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "head_dim"})

    def first_layer(self) -> int:
        """The first layer of a stack of consecutive layers (the KV cache addresses them from it)."""
        flat = [layer for group in self.layers for layer in group]
        if flat != list(range(flat[0], flat[0] + len(flat))):
            raise ValueError(f"a KV cache serves stacks of consecutive layers, got {self.layers}")
        return flat[0]


class FamilyModel(nn.Module):
    """The sequential model over the family interface: ``embed``, ``block``, ``hidden``, ``logits``.
    ``block_type``: the module class of one block (FSDP wraps one unit per block)."""

    config: ModelConfig
    block_type: type[nn.Module]

    @property
    def backout_layer(self) -> int:
        """The block whose output ``hidden`` reads besides the last one's (families without backout ignore it)."""
        return self.config.n_layer // 2

    def head(self, h_last: Tensor, h_backout: Tensor | None) -> Tensor:
        """Logits (B, T, vocab_size) from the last block's output and block L // 2's (see ``hidden``)."""
        return self.logits(self.hidden(h_last, h_backout))

    def forward_trace(self, idx: Tensor):
        """Sequential forward keeping every state: (block inputs, [h_0, h_1, ..., h_L]), each (B, T, n, D)."""
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
