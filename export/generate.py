"""Generation with a LayerParallelDecoder, eager or compiled: plain and self-speculative.

    decoder = LayerParallelDecoder(model, "idn:n6:K2", batch_size=2, max_seq_len=256)
    new_tokens = generate_tokens(decoder, [[0, 17, 4], [0, 9]], max_new_tokens=40)
    new_tokens, stats = speculative_tokens(decoder, prompts, 40, draft_len=4)
"""

from __future__ import annotations

from typing import Sequence

from .decoder import LayerParallelDecoder
from .runtime import Step, cut_at, generate
from .speculative import SpeculativeStats, speculative_generate


def _steps(decoder: LayerParallelDecoder, steps: dict[str, Step] | None) -> dict[str, Step]:
    """The decoder's eager entry points, overridden by any compiled ones given in ``steps``."""
    eager = {
        "prefill": decoder.prefill,
        "prefill_exact": decoder.prefill_exact,
        "decode": decoder.decode,
        "verify": decoder.prefill_exact,
    }
    return {**eager, **(steps or {})}


def generate_tokens(
    decoder: LayerParallelDecoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    steps: dict[str, Step] | None = None,
    on_tokens=None,
    vocab_limit: int | None = None,
    stop_token: int | None = None,
) -> list[list[int]]:
    """New tokens per prompt, decoded with the decoder's plan (one decode step per token); only ids
    below ``vocab_limit`` when given (a tokenizer smaller than the model's vocabulary). With
    ``stop_token`` (the end token, e.g. ``TextCodec.stop``) a row ends at it (kept as
    its last id); None generates ``max_new_tokens`` per row."""
    fns = _steps(decoder, steps)
    return generate(
        fns["prefill"], fns["decode"], prompts, max_new_tokens, rows=decoder.batch_size, max_seq_len=decoder.max_seq_len,
        device=decoder.k_cache.device, temperature=temperature, top_k=top_k, seed=seed, on_tokens=on_tokens,
        vocab_limit=vocab_limit, stop_token=stop_token,
    )


def speculative_tokens(
    decoder: LayerParallelDecoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    draft_len: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    steps: dict[str, Step] | None = None,
    vocab_limit: int | None = None,
    stop_token: int | None = None,
) -> tuple[list[list[int]], SpeculativeStats]:
    """New tokens per prompt: the plan drafts ``draft_len`` tokens, the exact model verifies them
    (only ids below ``vocab_limit`` when given; each row cut after its first ``stop_token``, which
    speculation does not stop at early)."""
    fns = _steps(decoder, steps)
    new, stats = speculative_generate(
        fns["prefill_exact"], fns["decode"], fns["verify"], prompts, max_new_tokens, draft_len=draft_len,
        rows=decoder.batch_size, max_seq_len=decoder.max_seq_len, device=decoder.k_cache.device,
        temperature=temperature, top_k=top_k, seed=seed, vocab_limit=vocab_limit,
    )
    return [cut_at(row, stop_token) for row in new], stats
