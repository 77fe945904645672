"""Compiled decoder steps: torch.compile (inductor; the C++ backend on CPU) with full graphs and
static shapes, and on CUDA one explicit CUDA-graph capture per step shape (gpt-fast style).

    steps = compile_steps(decoder, batch=1, verify_len=5)     # {"decode": ..., "verify": ...}
    warm_up(steps, decoder, batch=1, verify_len=5)             # compile / capture now, not when timed
    with no_recompiles():                                      # a benchmark never times a compile
        logits = steps["decode"](tokens, positions, prev)

A step is ``step(tokens (B, T), positions (B, T), prev (B,)) -> logits (B, T, V)``.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch._dynamo
from torch import Tensor

from .decoder import LayerParallelDecoder, example_inputs
from .runtime import Step

# Every decoder (one per plan) compiles the same Python code with a different `self`; dynamo
# counts those as recompiles of one frame, so a sweep of plans needs a higher limit than 8.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)


class CUDAGraphStep:
    """One captured CUDA graph of ``fn`` for fixed input shapes.

    A call copies its inputs into the captured buffers, replays, and returns a clone of the
    output (the next replay overwrites the graph's own output tensor). ``fn`` must be free of host
    syncs: use a compiled step (its eager checks are skipped while compiling). Capture runs ``fn``
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


def compile_step(fn: Callable, cuda_graphs: bool | None = None, device: torch.device | None = None) -> Step:
    """``fn`` compiled with fullgraph=True, static shapes; on CUDA (by default) replayed as CUDA graphs.

    Not inductor freezing: with torch 2.13 (global ``torch._inductor.config.freezing``) the
    decoder's compiled logits were wrong, presumably because its KV caches are buffers mutated in
    place; the cause was not pinned down. It had made the CPU 5-token verify about 3x faster.
    """
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    use_graphs = cuda_graphs if cuda_graphs is not None else (device is not None and device.type == "cuda")
    if use_graphs:
        if device is None or device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the decoder is on {device}")
        return ShapeCachedGraphs(compiled)
    return compiled


def compile_steps(decoder: LayerParallelDecoder, cuda_graphs: bool | None = None) -> dict[str, Step]:
    """Compiled ``decode`` (the plan's step) and ``verify`` (the exact model over several tokens,
    for self-speculative decoding and sequential full forwards)."""
    device = decoder.k_cache.device
    # Prefills stay eager (generate.py's defaults): prompts vary in length and would recompile.
    return {
        "decode": compile_step(decoder.decode, cuda_graphs, device),
        "verify": compile_step(decoder.prefill_exact, cuda_graphs, device),
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
