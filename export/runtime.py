"""Sampling and the generation loop, with nothing but torch: shared by the eager / compiled decoder
and by the standalone package loader (``export/standalone.py``), which must not import the
training code.

A "step" is any callable ``step(tokens (B, T), positions (B, T), prev (B,)) -> logits (B, T, V)``
over a KV cache of a fixed number of rows: ``prefill`` fills the cache with a prompt, ``decode``
adds one token per row.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

Step = Callable[[Tensor, Tensor, Tensor], Tensor]


class GenerationError(ValueError):
    """A prompt, length or sampling setting that generation cannot serve."""


# Below this, logits / temperature overflows float32 and the distribution turns into NaN.
MIN_TEMPERATURE = 1e-4


def check_sampling(temperature: float, top_k: int | None) -> None:
    if not (temperature == 0.0 or MIN_TEMPERATURE <= temperature < float("inf")):
        raise GenerationError(
            f"temperature={temperature} is not allowed: 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}"
        )
    if top_k is not None and temperature == 0.0:
        raise GenerationError(f"top_k={top_k} applies only when sampling: pass a temperature > 0 (0 = greedy ignores it)")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k={top_k} is not allowed: a positive integer or None (all tokens)")


def check_generation(temperature: float, top_k: int | None, seed: int, max_new_tokens: int) -> None:
    """The settings of a generation, checked before anything is built or compiled."""
    check_sampling(temperature, top_k)
    if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise GenerationError(f"seed={seed} is not allowed: an integer in -2**63 .. 2**64 - 1")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens} is not allowed: must be >= 1")


def check_tokenizer_size(tokenizer_size: int, vocab_size: int, tokenizer: object = "the tokenizer") -> int | None:
    """The ``vocab_limit`` of generation for a tokenizer of ``tokenizer_size`` ids and a model of
    ``vocab_size``: None when they match; the tokenizer's size when it is smaller (the model could
    emit ids the tokenizer cannot decode); an error when it is larger (a prompt could hold ids the
    model cannot embed)."""
    if tokenizer_size > vocab_size:
        raise GenerationError(
            f"{tokenizer} has {tokenizer_size} token ids but the model's vocabulary has only {vocab_size}: "
            "a prompt could hold ids the model cannot embed; use the tokenizer the model was trained with"
        )
    return tokenizer_size if tokenizer_size < vocab_size else None


def limit_vocab(step: Step, limit: int | None) -> Step:
    """``step`` whose logits keep only the ids below ``limit`` (all of them when None), so that greedy
    and sampled tokens are always ids the tokenizer can decode."""
    if limit is None:
        return step
    if limit < 1:
        raise GenerationError(f"vocab_limit={limit} is not allowed: a positive number of token ids or None")

    def limited(tokens: Tensor, positions: Tensor, prev: Tensor) -> Tensor:
        return step(tokens, positions, prev)[..., :limit]

    return limited


def probabilities(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """Sampling distribution (..., V) from logits (..., V): temperature, then the top-k tokens kept."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """One token per row from logits (B, V): greedy when temperature is 0. Returns (B,) int64."""
    if temperature == 0.0:
        return logits.argmax(-1)
    return torch.multinomial(probabilities(logits, temperature, top_k), 1, generator=generator).squeeze(-1)


def pad_prompts(prompts: Sequence[Sequence[int]], rows: int, room: int, max_seq_len: int, device) -> tuple[Tensor, Tensor]:
    """Right-pad the prompts into (rows, T) tokens; returns (tokens, lengths (rows,)).

    Unused cache rows repeat the last prompt. ``room`` positions must remain after every prompt.
    """
    if isinstance(prompts, Tensor) or not isinstance(prompts, Sequence):
        raise GenerationError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token (e.g. the tokenizer's <|bos|>)")
    if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for p in prompts for t in p):
        raise GenerationError("prompt token ids must be integers (a float id would be truncated without a word)")
    if len(prompts) > rows:
        raise GenerationError(f"{len(prompts)} prompts do not fit a KV cache of {rows} rows: pass at most {rows}")
    longest = max(len(p) for p in prompts)
    if longest + room > max_seq_len:
        raise GenerationError(
            f"a prompt of {longest} tokens plus {room} more positions exceeds the KV cache of {max_seq_len} positions"
        )
    prompts = list(prompts) + [prompts[-1]] * (rows - len(prompts))
    tokens = torch.zeros(rows, longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts])
    return tokens.to(device), lengths.to(device)


@dataclass
class Prefilled:
    """Rows after the prompt's prefill: the logits (rows, V) and the token (rows,) at each row's last
    prompt position, each row's length (rows,) = the position of its first new token, and the
    sampling generator (None when greedy)."""

    last_logits: Tensor
    last_token: Tensor
    lengths: Tensor
    generator: torch.Generator | None


def start_generation(
    prefill: Step,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    room: int,
    *,
    rows: int,
    max_seq_len: int,
    device: torch.device | str,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> Prefilled:
    """Check the settings, right-pad the prompts (``room`` positions must remain after each) and
    prefill them in one call.

    Prompts of different lengths share one prefill; padding positions are written to the cache but
    every row continues at its own length, so they are overwritten before they could be read.
    """
    check_generation(temperature, top_k, seed, max_new_tokens)
    tokens, lengths = pad_prompts(prompts, rows, room, max_seq_len, device)
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    positions = torch.arange(tokens.size(1), device=device).expand_as(tokens).contiguous()
    rows_index = torch.arange(rows, device=device)
    logits = prefill(tokens, positions, torch.zeros(rows, dtype=torch.long, device=device))
    last = lengths - 1
    return Prefilled(logits[rows_index, last], tokens[rows_index, last], lengths, generator)


def generate(
    prefill: Step,
    decode: Step,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    rows: int,
    max_seq_len: int,
    device: torch.device | str = "cpu",
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    on_tokens: Callable[[Tensor], None] | None = None,
    vocab_limit: int | None = None,
    stop_token: int | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` after each prompt; returns the new tokens per prompt.

    ``on_tokens`` receives each step's (B,) tokens (streaming). ``vocab_limit``: new tokens are
    ids below it (a tokenizer smaller than the model's vocabulary; see ``check_tokenizer_size()``).
    ``stop_token`` (e.g. the tokenizer's ``<|bos|>``, which separates documents): a row that
    generates it is finished; its returned tokens end with it (the ids stay complete), later steps
    stream ``stop_token`` for that row again, and generation ends when every row has finished.
    """
    prefill, decode = limit_vocab(prefill, vocab_limit), limit_vocab(decode, vocab_limit)
    start = start_generation(prefill, prompts, max_new_tokens, max_new_tokens, rows=rows, max_seq_len=max_seq_len,
                             device=device, temperature=temperature, top_k=top_k, seed=seed)
    count = len(prompts)
    last, prev, pos = start.last_logits, start.last_token, start.lengths
    out = []
    done = None if stop_token is None else torch.zeros(rows, dtype=torch.bool, device=pos.device)
    for step in range(max_new_tokens):
        nxt = sample(last, temperature, top_k, start.generator)
        if done is not None:
            nxt = nxt.masked_fill(done, stop_token)  # a finished row repeats its stop token
            done = done | (nxt == stop_token)
        out.append(nxt)
        if on_tokens is not None:
            on_tokens(nxt[:count])
        if step + 1 == max_new_tokens or (done is not None and bool(done[:count].all())):
            break
        last = decode(nxt[:, None], pos[:, None], prev)[:, 0]
        prev, pos = nxt, pos + 1
    new = torch.stack(out, 1)[:count].tolist()
    return new if stop_token is None else [cut_at(row, stop_token) for row in new]


def cut_at(tokens: list[int], stop_token: int | None) -> list[int]:
    """``tokens`` up to and including the first ``stop_token`` (all of them when it is absent or None)."""
    if stop_token is None or stop_token not in tokens:
        return list(tokens)
    return list(tokens[: tokens.index(stop_token) + 1])
