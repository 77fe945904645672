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
from typing import Callable

import torch
from torch import Tensor, nn

from snlp_lightning.errors import UserError
from snlp_lightning.models import GPT, WideBlocks
from snlp_lightning.models.kv_cache import KVCache, mask_tables
from snlp_lightning.solvers.executor import execute
from snlp_lightning.solvers.plan import SolverPlan
from snlp_lightning.solvers.surrogates import make_surrogate

# Surrogates whose decode step is deterministic and cheap: DiagN draws random probes per step and
# exact Newton is sequential over chunks, so neither belongs in a compiled decoder.
DECODER_METHODS = ("seq", "idn", "hcn", "damped", "fixed")


class DecoderError(UserError):
    """A plan, shape or length the decoder cannot serve; the message says what is allowed."""


CACHE_MULTIPLE = 16  # the KV cache's capacity is a multiple of this many positions (CUDA: CUDA_CACHE_MULTIPLE)
CUDA_CACHE_MULTIPLE = 64


def cache_capacity(max_seq_len: int, device) -> int:
    """The KV cache's capacity for ``max_seq_len`` usable positions: rounded up to a multiple of 16
    (64 on CUDA), so the key length of every attention call over the cache (and its mask's last
    dimension) is one the fused kernels are aligned for: memory-efficient and cuDNN attention
    with a mask whose last dimension is not a multiple of 8 / 16 is a known crash class, and
    cuDNN builds a plan per shape. The extra positions are masked out and never written."""
    multiple = CUDA_CACHE_MULTIPLE if torch.device(device).type == "cuda" else CACHE_MULTIPLE
    return -(-max_seq_len // multiple) * multiple


def _inference_copy(t: Tensor, device, dtype) -> Tensor:
    """A detached copy (never a view of the training weights) on ``device``, floats cast to ``dtype``."""
    return t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True).contiguous()


class _StackBuffers:
    """Registers every tensor of a stack (a family's dataclass, nested dataclasses included) as a
    buffer of ``owner`` and rebuilds the stack from those buffers at call time, so ``.to()``,
    ``torch.compile`` and ``torch.export`` see ordinary module state."""

    def __init__(self, owner: nn.Module, name: str, blocks: WideBlocks, device, dtype):
        self.owner, self.template, self.names = owner, blocks, {}
        for path, value in self._tensors(blocks):
            buffer = f"{name}__{'__'.join(path)}"
            owner.register_buffer(buffer, _inference_copy(value, device, dtype), persistent=False)
            self.names[path] = buffer

    @classmethod
    def _tensors(cls, obj, prefix: tuple[str, ...] = ()):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, Tensor):
                yield (*prefix, f.name), value
            elif dataclasses.is_dataclass(value):
                yield from cls._tensors(value, (*prefix, f.name))

    def build(self) -> WideBlocks:
        def rebuild(obj, prefix: tuple[str, ...]):
            changes = {}
            for f in dataclasses.fields(obj):
                path, value = (*prefix, f.name), getattr(obj, f.name)
                if path in self.names:
                    changes[f.name] = getattr(self.owner, self.names[path])
                elif dataclasses.is_dataclass(value):
                    changes[f.name] = rebuild(value, path)
            return dataclasses.replace(obj, **changes)

        return rebuild(self.template, ())


class LayerParallelDecoder(nn.Module):
    """Prefill and decode of ``model`` under ``plan`` with a static KV cache of ``batch_size`` rows
    and ``max_seq_len`` positions, weights in ``dtype`` on ``device``.

    The cache's buffers hold ``cache_len`` positions, ``max_seq_len`` rounded up to a multiple of
    16 (64 on CUDA; ``cache_capacity``); only positions 0 .. max_seq_len - 1 may be used."""

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
        if plan.authors_windows:
            raise DecoderError(f"plan '{plan}': authors_windows (aw) is an evaluation switch of full forwards; the decoder does not take it")
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
        self.backout_layer = model.backout_layer

        # Embedding and head: the model without its blocks (their weights live in the stacks below)
        # and without the tables decoding never reads (``_unused_tables``).
        self.shell = _shell_copy(model, device, dtype)
        with torch.no_grad():
            self._layers = _StackBuffers(self, "layers", model.stack([[i] for i in range(n_layer)]), device, dtype)
            self._chunks = None
            if plan.n_par and plan.fuse > 1:
                fused = model.stack(plan.chunk_layers(n_layer), plan.average_branches)
                self._chunks = _StackBuffers(self, "chunks", fused, device, dtype)
        # The cache holds cache_len >= max_seq_len positions (kernel alignment, ``cache_capacity``);
        # positions max_seq_len.. are never written: callers refuse them against max_seq_len.
        self.cache_len = cache_capacity(max_seq_len, device)
        k, v = KVCache.allocate(batch_size, n_layer, cfg.n_kv_head, self.cache_len, cfg.head_dim, dtype, device)
        self.register_buffer("k_cache", k, persistent=False)
        self.register_buffer("v_cache", v, persistent=False)
        masks, self.mask_windows = mask_tables(cfg.window_sizes(), self.cache_len, device)
        self.register_buffer("cache_masks", masks, persistent=False)
        self.surrogate = make_surrogate(plan) if plan.method != "seq" else None

    # -- entry points -----------------------------------------------------------------------------
    def prefill(self, tokens: Tensor, positions: Tensor, prev: Tensor, caches=None) -> Tensor:
        """Fill the cache with the plan's fixed point: the sequential model, or for a fused plan its
        chunks one after another. Returns logits (B, T, vocab).

        ``caches``: (k, v) to use instead of the decoder's own (the exported graphs take them as inputs).
        """
        return self._run(tokens, positions, prev, caches, surrogate=None)

    def prefill_exact(self, tokens: Tensor, positions: Tensor, prev: Tensor) -> Tensor:
        """The exact sequential model over T tokens per row, writing the per-layer cache: the prompt
        prefill and the verifier of self-speculative decoding, and the sequential full forward."""
        return self._run(tokens, positions, prev, None, surrogate=None, exact=True)

    def decode(self, tokens: Tensor, positions: Tensor, prev: Tensor, caches=None) -> Tensor:
        """One step of the plan: S exact blocks, K parallel iterations, then the kv refresh."""
        return self._run(tokens, positions, prev, caches, surrogate=self.surrogate)

    def reset_cache(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def step(self, entry: str, regions: Callable[[WideBlocks], WideBlocks]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """``decode`` or ``prefill_exact`` as a step whose wide-block calls (every prefix layer,
        every chunk call, the kv refresh) go through ``regions(stack)``, an object with the stack's
        interface: ``export.compiled`` passes one that runs them as compiled regions."""
        if entry == "decode":
            return lambda tokens, positions, prev: self._run(tokens, positions, prev, None, self.surrogate, regions=regions)
        if entry == "prefill_exact":
            return lambda tokens, positions, prev: self._run(tokens, positions, prev, None, None, exact=True, regions=regions)
        raise ValueError(f"entry {entry!r}: a step is 'decode' or 'prefill_exact'")

    def _run(self, tokens: Tensor, positions: Tensor, prev: Tensor, caches, surrogate, exact: bool = False, regions=None) -> Tensor:
        k, v = caches if caches is not None else (self.k_cache, self.v_cache)
        cache = KVCache(k, v, self.cache_masks, self.mask_windows)
        inputs, h = self.shell.embed(tokens, positions, prev)
        stacked = self._layers.build()
        wrap = regions or (lambda stack: stack)
        layers = wrap(stacked)

        def chunks() -> WideBlocks:
            return wrap(stacked.take(self.prefix_len, self.config.n_layer) if self._chunks is None else self._chunks.build())

        return execute(
            self.plan, inputs, h,
            layer=lambda l, x: layers.select(l)(x.unsqueeze(0), inputs, cache)[0].squeeze(0),
            chunks=chunks,
            head=self.shell.head,
            n_layer=self.config.n_layer,
            backout_layer=self.backout_layer,
            surrogate=surrogate,
            cache=cache,
            exact=exact,
        ).logits


def example_inputs(decoder: LayerParallelDecoder, tokens: int, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, positions, prev) of shape (B, T), (B, T), (B,) at positions start .. start + T - 1."""
    b, device = decoder.batch_size, decoder.k_cache.device
    ids = torch.ones(b, tokens, dtype=torch.long, device=device)
    positions = (start + torch.arange(tokens, device=device)).expand(b, tokens).contiguous()
    return ids, positions, torch.zeros(b, dtype=torch.long, device=device)


def _unused_tables(model: GPT) -> dict[str, nn.Module]:
    """The submodules of ``model`` the shell (embedding and head) must not copy, by attribute name:
    the multi-token-prediction heads (training only) and, for a config with ``no_ve`` (the plain
    preset), the value-embedding tables it keeps only for nanochat's state-dict layout (0.67 GB
    at 0.5B). The blocks are taken apart by ``_shell_copy`` itself."""
    unused = {}
    if len(getattr(model, "mtp_projs", ())):
        unused["mtp_projs"] = nn.ModuleList()
    if model.config.no_ve and len(getattr(model, "value_embeds", ())):
        unused["value_embeds"] = nn.ModuleDict()
    return unused


def _shell_copy(model: GPT, device, dtype) -> GPT:
    """A frozen inference copy of the model without its blocks and its unused tables
    (``_unused_tables``), floats in ``dtype``. The model itself is left as it was."""
    import copy

    removed = {"h": model.transformer.h}
    model.transformer.h = nn.ModuleList()
    empty = _unused_tables(model)
    for name, replacement in empty.items():
        removed[name] = getattr(model, name)
        setattr(model, name, replacement)
    try:
        shell = copy.deepcopy(model)
    finally:
        model.transformer.h = removed.pop("h")
        for name, module in removed.items():
            setattr(model, name, module)
    shell = shell.to(device=device, dtype=dtype).eval()
    for name, table in model.named_buffers():  # keep the float32 RoPE tables (Gemma 3 has a second pair)
        if name.startswith("rope_"):
            setattr(shell, name, table.to(device))
    for p in shell.parameters():
        p.requires_grad_(False)
    return shell
