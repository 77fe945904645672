"""A slow, cache-free reference of spec section 6's decoding semantics, for testing the decoder.

It keeps, for every parallel chunk, the history of its final corrected inputs (what the cache's
k, v are computed from) and re-runs each chunk over [history; current iterate] with the plain,
cache-free model code, taking the last position. The prefix is recomputed exactly over the
whole sequence every step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from snlp_lightning.models.gpt import GPT
from snlp_lightning.models.stack import wide_block_forward
from snlp_lightning.solvers.newton import chunk_sequential
from snlp_lightning.solvers.plan import SolverPlan
from snlp_lightning.solvers.surrogates import make_surrogate


class ReferenceDecoder:
    def __init__(self, model: GPT, plan: str):
        self.model, self.plan = model, SolverPlan.parse(plan).validate(model.config)
        n_layer = model.config.n_layer
        self.prefix_len = self.plan.prefix_len(n_layer)
        self.chunks = model.stack(self.plan.chunk_layers(n_layer), self.plan.average_branches)
        self.surrogate = make_surrogate(self.plan)

    def _prefix(self, tokens: Tensor):
        inputs, h = self.model.embed(tokens)
        backout = None
        for layer in range(self.prefix_len):
            h, _ = self.model.block(layer, h, inputs)
            if layer == self.model.backout_layer:
                backout = h
        return inputs, h, backout

    def _logits(self, states: Tensor, backout: Tensor | None) -> Tensor:
        if self.model.backout_layer >= self.prefix_len:
            backout = states[(self.model.backout_layer - self.prefix_len) // self.plan.fuse]
        return self.model.head(states[-1], backout)

    def prefill(self, tokens: Tensor) -> Tensor:
        """Chunk-sequential over the prompt; remembers every chunk's inputs. Returns (B, T, V)."""
        self.tokens = tokens
        inputs, h, backout = self._prefix(tokens)
        states = chunk_sequential(self.chunks, h, inputs)
        self.history = torch.cat([h.unsqueeze(0), states[:-1]])  # (C, B, T, n, D) chunk inputs
        return self._logits(states, backout)

    def decode(self, token: Tensor) -> Tensor:
        """token: (B, 1) -> logits (B, 1, V) of the plan's K iterations at the next position."""
        self.tokens = torch.cat([self.tokens, token], 1)
        inputs, h_all, backout = self._prefix(self.tokens)
        h = h_all[:, -1:]
        chunks = self.chunks.groups
        first = h.unsqueeze(0)

        def evaluate(x_in: Tensor):
            out, info = wide_block_forward(self.chunks, torch.cat([self.history, x_in], 2), inputs)
            if info is not None and info.size(2) > 1:
                info = info[:, :, -1:]
            return out[:, :, -1:], info

        if self.plan.init == "batch_fwd":
            x, _ = evaluate(first.expand(chunks, *h.shape))
        else:
            x = first.expand(chunks, *h.shape)
        for _ in range(self.plan.iters):
            x_in = torch.cat([first, x[:-1]])
            f_out, info = evaluate(x_in)
            x = x + self.surrogate.correct(f_out - x, info, self.chunks, x_in, inputs)
        self.history = torch.cat([self.history, torch.cat([first, x[:-1]])], 2)
        return self._logits(x, None if backout is None else backout[:, -1:])
