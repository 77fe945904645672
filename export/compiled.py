"""Compiled decoder steps: regional torch.compile (inductor; the C++ backend on CPU) of the wide
blocks, full graphs and static shapes, and on CUDA one explicit CUDA-graph capture per step shape
(gpt-fast style).

    steps = compile_steps(decoder)                      # {"decode": ..., "verify": ...}
    warm_up(steps["decode"], decoder)                   # compile / capture now, not when timed
    with no_recompiles():                               # a benchmark never times a compile
        logits = steps["decode"](tokens, positions, prev)

A step is ``step(tokens (B, T), positions (B, T), prev (B,)) -> logits (B, T, V)``. It is the
decoder's own Python (embedding, the executor's loops and solver update, the head) with every
wide-block call a compiled region (``CompiledRegions``): one graph per distinct block call, shared
by every layer and every plan, so compile time does not grow with depth (docs/benchmarks.md,
"Compile time"). The whole-step graph of ``export.package`` (AOTInductor) is a separate path.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch
from torch import Tensor

from snlp_lightning.models import BlockInputs, WideBlocks
from snlp_lightning.models.kv_cache import KVCache

from .decoder import LayerParallelDecoder, example_inputs
from .runtime import Step

# Every region shape (and, with regional=False, every decoder) compiles the same Python code once
# more, which dynamo counts as recompiles of one frame (default limit 8, past which it runs new
# shapes uncompiled): commands that compile several plans call
# snlp_lightning.compat.raise_dynamo_limits() at entry (global state, set by entry points only).


class CUDAGraphStep:
    """One captured CUDA graph of ``fn`` for fixed input shapes.

    A call copies its inputs into the captured buffers, replays, and returns a clone of the
    output (the next replay overwrites the graph's own output tensor). ``fn`` must be free of host
    syncs: use a compiled step (its eager checks are skipped while compiling or capturing). Capture runs ``fn``
    several times, writing the KV cache at the example positions: prefill again afterwards.
    """

    def __init__(self, fn: Step, tokens: Tensor, positions: Tensor, prev: Tensor, warmup: int = 3):
        self.inputs = [t.clone() for t in (tokens, positions, prev)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and autotune outside the capture
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, tokens: Tensor, positions: Tensor, prev: Tensor) -> Tensor:
        for buffer, value in zip(self.inputs, (tokens, positions, prev)):
            buffer.copy_(value)
        self.graph.replay()
        return self.output.clone()


class ShapeCachedGraphs:
    """A CUDAGraphStep per input shape, captured on first use."""

    def __init__(self, fn: Step):
        self.fn, self.graphs = fn, {}

    def __call__(self, tokens: Tensor, positions: Tensor, prev: Tensor) -> Tensor:
        key = tuple(tokens.shape)
        if key not in self.graphs:
            self.graphs[key] = CUDAGraphStep(self.fn, tokens, positions, prev)
        return self.graphs[key](tokens, positions, prev)


def _forward(stack: WideBlocks, x: Tensor, inputs: BlockInputs, cache: KVCache):
    return stack(x, inputs, cache)


def _write_cache(stack: WideBlocks, x: Tensor, inputs: BlockInputs, cache: KVCache) -> None:
    stack.write_cache(x, inputs, cache)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    """One torch.compile wrapper per region function, for the whole process: every decoder (every
    plan) calls the same one, so a region compiled for one is reused by all."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


class CompiledRegions:
    """A decoder's stack of wide blocks whose calls run as compiled regions (regional compilation).

    A call is one wide-block call: a prefix layer, all C chunks of a solver iteration, the kv
    refresh. It is made layer-free first (``WideBlocks.local``: layer numbers from 0, the cache
    narrowed to its layers by views), so one graph serves every call of one shape: every layer
    of a depth (one graph per distinct window pattern and value-embedding use) and every plan of
    one chunk shape. Compile time no longer grows with depth; what remains per layer is a guard
    check and the Python between the regions (slicing the stacks, the solver's update).
    """

    def __init__(self, stack: WideBlocks):
        self.stack = stack

    @property
    def groups(self) -> int:
        return self.stack.groups

    def select(self, g: int) -> "CompiledRegions":
        return CompiledRegions(self.stack.select(g))

    def __call__(self, x: Tensor, inputs: BlockInputs, cache: KVCache):
        stack, local, part = self.stack.local(inputs, cache)
        return _compiled(_forward)(stack, x, local, part)

    def write_cache(self, x: Tensor, inputs: BlockInputs, cache: KVCache) -> None:
        stack, local, part = self.stack.local(inputs, cache)
        _compiled(_write_cache)(stack, x, local, part)


def compile_step(decoder: LayerParallelDecoder, entry: str, cuda_graphs: bool | None = None, regional: bool = True) -> Step:
    """``decoder``'s ``entry`` ("decode" or "prefill_exact") compiled (fullgraph=True, static
    shapes); on CUDA (by default) the whole step is replayed as one CUDA graph per input shape.

    ``regional`` (the default): every wide-block call is a compiled region shared by all layers
    and plans, and the step itself is plain Python between the regions: compile time does not
    grow with depth, but every region call costs a guard check and a Python call (about 0.15 ms
    on the 2-core CPU of docs/benchmarks.md; nothing once replayed as a CUDA graph).
    ``regional=False``: the whole step as one graph, every layer unrolled in it (compile time
    grows with depth; the least Python per step).

    Not inductor freezing: with torch 2.13 (global ``torch._inductor.config.freezing``) the
    decoder's compiled logits were wrong, presumably because its KV caches are buffers mutated in
    place; the cause was not pinned down. It had made the CPU 5-token verify about 3x faster.
    """
    if entry not in ("decode", "prefill_exact"):
        raise ValueError(f"entry {entry!r}: a compiled step is 'decode' or 'prefill_exact'")
    if regional:
        step = decoder.step(entry, CompiledRegions)
    else:
        step = torch.compile(getattr(decoder, entry), fullgraph=True, dynamic=False)
    device = decoder.k_cache.device
    use_graphs = cuda_graphs if cuda_graphs is not None else device.type == "cuda"
    if use_graphs:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the decoder is on {device}")
        return ShapeCachedGraphs(step)
    return step


def compile_steps(decoder: LayerParallelDecoder, cuda_graphs: bool | None = None, regional: bool = True) -> dict[str, Step]:
    """Compiled ``decode`` (the plan's step) and ``verify`` (the exact model over several tokens,
    for self-speculative decoding and sequential full forwards); ``regional`` as in ``compile_step``."""
    # Prefills stay eager (generate.py's defaults): prompts vary in length and would recompile.
    return {
        "decode": compile_step(decoder, "decode", cuda_graphs, regional),
        "verify": compile_step(decoder, "prefill_exact", cuda_graphs, regional),
    }


def warm_up(step: Step, decoder: LayerParallelDecoder, tokens: int = 1, iters: int = 3) -> None:
    """Run ``step`` on (B, tokens) inputs until compiled (and captured); leaves the cache reset."""
    for _ in range(iters):
        step(*example_inputs(decoder, tokens, start=0))
    decoder.reset_cache()


@contextlib.contextmanager
def no_recompiles():
    """Inside: a compiled step that would recompile raises instead (nothing timed is a compile)."""
    with torch.compiler.set_stance("fail_on_recompile"):
        yield
