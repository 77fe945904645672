"""The layer-parallel decoder: a model + a solver plan -> prefill / decode over a static KV cache.

    decoder = LayerParallelDecoder(model, "idn:n6:3xF2:K2", batch_size=1, max_seq_len=256)
    logits = decoder.prefill(tokens, positions, prev)      # exact (chunk-)sequential, fills the cache
    logits = decoder.prefill_exact(tokens, positions, prev)  # the sequential model, whatever the fusion
    logits = decoder.decode(tokens, positions, prev)       # S exact blocks, then K parallel iterations

Every block weight is stacked (and fused per the plan) once, here, in the inference dtype: a
call does no concatenation. KV semantics are spec section 6: the prefix is exact; every parallel
iteration writes the current iterate's own k, v at the new positions and attends over the cache
(earlier positions are never touched, so the cache is read-only for them); after the K iterations
the k, v of every parallel chunk are recomputed from the final corrected chunk inputs. With K = C
and M = 1 a decode step is therefore exactly a sequential step.

Shapes: tokens (B, T) int64; positions (B, T) int64 absolute positions (rows may differ); prev (B,)
the token before each row's first token (smear reads it); logits (B, T, vocab) float32.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from snlp_lightning.errors import UserError
from snlp_lightning.models.gpt import GPT
from snlp_lightning.models.kv_cache import StackCache, new_cache
from snlp_lightning.models.mhc import ConnectionStack
from snlp_lightning.models.stack import WideBlocks, stack_blocks, wide_block_forward, write_keys_values
from snlp_lightning.solvers.newton import chunk_sequential, solve_chunks
from snlp_lightning.solvers.plan import SolverPlan
from snlp_lightning.solvers.surrogates import make_surrogate

# Surrogates whose decode step is deterministic and cheap: DiagN draws random probes per step and
# exact Newton is sequential over chunks, so neither belongs in a compiled decoder.
DECODER_METHODS = ("seq", "idn", "hcn", "damped", "fixed")


class DecoderError(UserError):
    """A plan, shape or length the decoder cannot serve; the message says what is allowed."""


def _inference_copy(t: Tensor, device, dtype) -> Tensor:
    """A detached copy (never a view of the training weights) on ``device``, floats cast to ``dtype``."""
    return t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True).contiguous()


class _StackBuffers:
    """Registers every tensor of a WideBlocks (and of its mHC connections) as a buffer of ``owner``
    and rebuilds the WideBlocks from those buffers at call time, so ``.to()``, ``torch.compile``
    and ``torch.export`` see ordinary module state."""

    def __init__(self, owner: nn.Module, name: str, blocks: WideBlocks, device, dtype):
        self.owner, self.template, self.names = owner, blocks, {}
        for field, value in self._tensors(blocks):
            buffer = f"{name}__{field.replace('.', '__')}"
            owner.register_buffer(buffer, _inference_copy(value, device, dtype), persistent=False)
            self.names[field] = buffer

    @staticmethod
    def _tensors(blocks: WideBlocks):
        for f in dataclasses.fields(blocks):
            value = getattr(blocks, f.name)
            if isinstance(value, Tensor):
                yield f.name, value
            elif isinstance(value, ConnectionStack):
                for g in dataclasses.fields(value):
                    inner = getattr(value, g.name)
                    if isinstance(inner, Tensor):
                        yield f"{f.name}.{g.name}", inner

    def build(self, **extra) -> WideBlocks:
        top, nested = {}, {}
        for field, buffer in self.names.items():
            tensor = getattr(self.owner, buffer)
            if "." in field:
                outer, inner = field.split(".")
                nested.setdefault(outer, {})[inner] = tensor
            else:
                top[field] = tensor
        for outer, values in nested.items():
            top[outer] = dataclasses.replace(getattr(self.template, outer), **values)
        return dataclasses.replace(self.template, **top, **extra)


class LayerParallelDecoder(nn.Module):
    """Prefill and decode of ``model`` under ``plan`` with a static KV cache of ``batch_size`` rows
    and ``max_seq_len`` positions, weights in ``dtype`` on ``device``."""

    def __init__(
        self,
        model: GPT,
        plan: SolverPlan | str,
        batch_size: int = 1,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        cfg = model.config
        plan = SolverPlan.parse(plan).validate(cfg)
        if plan.method not in DECODER_METHODS:
            raise DecoderError(f"plan '{plan}' cannot be decoded: the decoder serves methods {', '.join(DECODER_METHODS)}")
        max_seq_len = cfg.sequence_len if max_seq_len is None else max_seq_len
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or not 1 <= max_seq_len <= cfg.sequence_len:
            raise DecoderError(f"max_seq_len={max_seq_len} is not allowed: 1..{cfg.sequence_len} (the model's sequence_len)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DecoderError(f"batch_size={batch_size} is not allowed: must be >= 1")
        device = torch.device(device) if device is not None else model.lm_head.weight.device
        dtype = dtype or model.lm_head.weight.dtype
        self.config, self.plan, self.batch_size, self.max_seq_len, self.dtype = cfg, plan, batch_size, max_seq_len, dtype
        n_layer = cfg.n_layer
        self.prefix_len = plan.prefix_len(n_layer)
        self.backout_layer = n_layer // 2

        # Embedding and head: the model without its blocks (their weights live in the stacks below).
        blocks, model.transformer.h = model.transformer.h, nn.ModuleList()
        try:
            self.shell = _shell_copy(model, device, dtype)
        finally:
            model.transformer.h = blocks
        with torch.no_grad():
            self._layers = _StackBuffers(self, "layers", stack_blocks(model, [[i] for i in range(n_layer)]), device, dtype)
            self._chunks = None
            if plan.n_par and plan.fuse > 1:
                fused = stack_blocks(model, plan.chunk_layers(n_layer), plan.average_branches)
                self._chunks = _StackBuffers(self, "chunks", fused, device, dtype)
        shape = (n_layer, batch_size, cfg.n_kv_head, max_seq_len, cfg.head_dim)
        self.register_buffer("k_cache", new_cache(*shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", new_cache(*shape, dtype=dtype, device=device), persistent=False)
        self.surrogate = make_surrogate(plan) if plan.method != "seq" else None

    # -- the stacks, bound to their cache views ---------------------------------------------------
    def layer_stack(self, caches: tuple[Tensor, Tensor]) -> WideBlocks:
        """All L layers, one per wide block, with the per-layer caches (L, 1, B, Hkv, Tmax, hd)."""
        return self._layers.build(cache=StackCache(caches[0], caches[1], start=0, groups=self.config.n_layer))

    def chunk_stack(self, caches: tuple[Tensor, Tensor]) -> WideBlocks:
        """The C parallel chunks of M fused layers, with their cache views (C, M, B, Hkv, Tmax, hd)."""
        plan, start = self.plan, self.prefix_len
        if self._chunks is None:
            return self.layer_stack(caches).take(start, self.config.n_layer)
        cache = StackCache(caches[0], caches[1], start=start, groups=plan.chunks, fuse=plan.fuse)
        return self._chunks.build(cache=cache)

    # -- entry points -----------------------------------------------------------------------------
    def prefill(self, tokens: Tensor, positions: Tensor, prev: Tensor, caches=None) -> Tensor:
        """Fill the cache with the plan's fixed point: the sequential model, or for a fused plan its
        chunks one after another. Returns logits (B, T, vocab).

        ``caches``: (k, v) to use instead of the decoder's own (the exported graphs take them as inputs).
        """
        return self._forward(tokens, positions, prev, "chunks" if self.plan.n_par else "exact", caches)

    def prefill_exact(self, tokens: Tensor, positions: Tensor, prev: Tensor) -> Tensor:
        """The exact sequential model over T tokens per row, writing the per-layer cache: the prompt
        prefill and the verifier of self-speculative decoding, and the sequential full forward."""
        return self._forward(tokens, positions, prev, "exact")

    def decode(self, tokens: Tensor, positions: Tensor, prev: Tensor, caches=None) -> Tensor:
        """One step of the plan: S exact blocks, K parallel iterations, then the kv refresh."""
        mode = "snlp" if self.plan.method != "seq" else ("chunks" if self.plan.n_par else "exact")
        return self._forward(tokens, positions, prev, mode, caches)

    def reset_cache(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def _forward(self, tokens: Tensor, positions: Tensor, prev: Tensor, mode: str, caches=None) -> Tensor:
        caches = caches if caches is not None else (self.k_cache, self.v_cache)
        inputs, h = self.shell.embed(tokens, positions, prev)
        layers = self.layer_stack(caches)
        sequential = self.config.n_layer if mode == "exact" else self.prefix_len
        backout = None
        for layer in range(sequential):
            h = wide_block_forward(layers.select(layer), h.unsqueeze(0), inputs)[0].squeeze(0)
            if layer == self.backout_layer:
                backout = h
        if mode == "exact":
            return self.shell.head(h, backout)
        chunks = self.chunk_stack(caches)
        if mode == "chunks":
            states = chunk_sequential(chunks, h, inputs)
        else:
            states, _, _ = solve_chunks(chunks, self.surrogate, h, inputs, self.plan)
            # The cache keeps k, v of the final corrected chunk inputs (spec section 6).
            write_keys_values(chunks, torch.cat([h.unsqueeze(0), states[:-1]]), inputs)
        if self.backout_layer >= self.prefix_len:
            backout = states[(self.backout_layer - self.prefix_len) // self.plan.fuse]
        return self.shell.head(states[-1], backout)


def example_inputs(decoder: LayerParallelDecoder, tokens: int, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, positions, prev) of shape (B, T), (B, T), (B,) at positions start .. start + T - 1."""
    b, device = decoder.batch_size, decoder.k_cache.device
    ids = torch.ones(b, tokens, dtype=torch.long, device=device)
    positions = (start + torch.arange(tokens, device=device)).expand(b, tokens).contiguous()
    return ids, positions, torch.zeros(b, dtype=torch.long, device=device)


def _shell_copy(model: GPT, device, dtype) -> GPT:
    """A frozen inference copy of the block-less model, floats in ``dtype``."""
    import copy

    shell = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    shell.rope_cos, shell.rope_sin = model.rope_cos.to(device), model.rope_sin.to(device)  # keep float32 tables
    for p in shell.parameters():
        p.requires_grad_(False)
    return shell
