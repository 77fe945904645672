"""A slow, cache-free reference of spec section 6's decoding semantics, for testing the decoder.

Independent of the library's solver and block code: blocks and fused chunks come from
``reference.py`` (written from the formulas), the update loop is restated here. It keeps, for every
parallel chunk, the history of its final corrected inputs (what the cache's k, v are computed
from) and re-runs each chunk over [history; current iterate], taking the last position. The prefix
is recomputed exactly over the whole sequence every step. Only the plan's notation is parsed with
the library (``SolverPlan``).
"""

from __future__ import annotations

import torch
from torch import Tensor

import reference as ref
from snlp_lightning import GPT
from snlp_lightning.solvers.plan import SolverPlan


class ReferenceDecoder:
    def __init__(self, model: GPT, plan: str):
        self.model, self.plan = model, SolverPlan.parse(plan).validate(model.config)
        n_layer = model.config.n_layer
        self.prefix_len = n_layer - self.plan.n_par
        self.chunk_layers = [list(range(self.prefix_len + c * self.plan.fuse, self.prefix_len + (c + 1) * self.plan.fuse))
                             for c in range(self.plan.chunks)]
        self.mid = n_layer // 2

    def _prefix(self, tokens: Tensor):
        x0 = ref.embed(self.model, tokens)
        h, mid = x0, None
        for layer in range(self.prefix_len):
            h = ref.block(self.model, layer, h, x0, tokens)
            if layer == self.mid:
                mid = h
        return x0, h, mid

    def _chunk(self, c: int, x: Tensor, x0: Tensor, tokens: Tensor):
        return ref.fused_block(self.model, self.chunk_layers[c], x, x0, tokens, self.plan.average_branches)

    def _logits(self, states: list[Tensor], mid: Tensor | None) -> Tensor:
        if self.mid >= self.prefix_len:
            mid = states[(self.mid - self.prefix_len) // self.plan.fuse]
        return ref.head(self.model, states[-1], mid)

    def prefill(self, tokens: Tensor) -> Tensor:
        """The chunks one after another over the prompt; remembers every chunk's inputs. Returns (B, T, V)."""
        self.tokens = tokens
        x0, h, mid = self._prefix(tokens)
        states, x = [], h
        self.history = []
        for c in range(self.plan.chunks):
            self.history.append(x)
            x = self._chunk(c, x, x0, tokens)[0]
            states.append(x)
        return self._logits(states, mid)

    def decode(self, token: Tensor) -> Tensor:
        """token: (B, 1) -> logits (B, 1, V) of the plan's K iterations at the next position."""
        self.tokens = torch.cat([self.tokens, token], 1)
        x0, h_all, mid = self._prefix(self.tokens)
        h = h_all[:, -1:]
        count = self.plan.chunks

        def evaluate(c: int, x_in: Tensor):
            """F_c and A_c at the newest position, chunk c reading its history then x_in."""
            out, a = self._chunk(c, torch.cat([self.history[c], x_in], 1), x0, self.tokens)
            if a is not None and a.dim() > 2:
                a = a[:, -1:]
            return out[:, -1:], a

        if self.plan.init == "batch_fwd":
            x = [evaluate(c, h)[0] for c in range(count)]
        else:
            x = [h] * count
        keep = {"idn": 1.0, "hcn": 1.0, "fixed": 0.0, "damped": 1.0 - self.plan.kappa}[self.plan.method]
        for _ in range(self.plan.iters):
            x_in = [h] + x[:-1]
            evaluated = [evaluate(c, x_in[c]) for c in range(count)]
            new, d = [], None
            for c, (f, a) in enumerate(evaluated):
                base = f - x[c]
                if d is None:
                    d = base
                elif self.plan.method == "hcn":
                    d = base + a @ d
                else:
                    d = base + keep * d
                new.append(x[c] + d)
            x = new
        for c, x_in in enumerate([h] + x[:-1]):
            self.history[c] = torch.cat([self.history[c], x_in], 1)
        return self._logits(x, None if mid is None else mid[:, -1:])
