"""Self-speculative decoding (spec section 6, v2): the layer-parallel decoder drafts, the exact
sequential model verifies.

Per round and row: D draft tokens from the plan's cheap decode steps, then ONE exact forward over
[pending token, draft_1 .. draft_D] (the cache rows of those positions are rewritten exactly), and
the longest acceptable prefix is kept plus one token from the verifier. Greedy: a draft token is
accepted iff it equals the verifier's argmax, so the output is exactly sequential greedy decoding.
Temperature > 0: speculative rejection sampling (accept with min(1, p / q), resample the first
rejection from max(p - q, 0)), which samples from the sequential model's distribution.
Rows accept different numbers of tokens; their positions advance independently and entries
past a row's position are stale but never read (the cache needs no explicit rollback).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .runtime import GenerationError, Step, limit_vocab, probabilities, sample, start_generation


@dataclass
class SpeculativeStats:
    rounds: int = 0
    accepted: int = 0  # draft tokens accepted, summed over rows and rounds
    row_rounds: int = 0

    @property
    def mean_accepted(self) -> float:
        """Mean accepted draft tokens per row and round (each round also emits one verifier token)."""
        return self.accepted / max(self.row_rounds, 1)


def speculative_generate(
    prefill_exact: Step,
    draft: Step,
    verify: Step,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    draft_len: int,
    rows: int,
    max_seq_len: int,
    device: torch.device | str = "cpu",
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    vocab_limit: int | None = None,
) -> tuple[list[list[int]], SpeculativeStats]:
    """Generate with D = ``draft_len`` drafts per round; ``verify`` takes (B, D + 1) tokens.

    prefill_exact and verify must run the exact sequential model; draft is the plan's decode step.
    ``vocab_limit``: drafts, verification and new tokens use only the ids below it (the verified
    distribution is the sequential model's restricted to those ids). Returns (new tokens per
    prompt, acceptance statistics).
    """
    if draft_len < 1:
        raise GenerationError(f"draft_len={draft_len} is not allowed: must be >= 1")
    prefill_exact, draft, verify = (limit_vocab(step, vocab_limit) for step in (prefill_exact, draft, verify))
    # A round may run D + 1 positions past the last kept token.
    start = start_generation(prefill_exact, prompts, max_new_tokens, max_new_tokens + draft_len + 1, rows=rows,
                             max_seq_len=max_seq_len, device=device, temperature=temperature, top_k=top_k, seed=seed)
    count, generator, lengths = len(prompts), start.generator, start.lengths
    rows_index = torch.arange(rows, device=device)
    prev = start.last_token
    pending = sample(start.last_logits, temperature, top_k, generator)  # at position `pos`
    pos = lengths.clone()
    emitted: list[list[int]] = [[int(t)] for t in pending.tolist()]
    counts = torch.ones(rows, dtype=torch.long, device=device)  # len(emitted[row])
    stats = SpeculativeStats()
    offsets = torch.arange(draft_len + 1, device=device)
    while int(counts[:count].min()) < max_new_tokens:
        drafts, draft_probs = [], []
        tok, tok_pos, tok_prev = pending, pos, prev
        for _ in range(draft_len):
            step_logits = draft(tok[:, None], tok_pos[:, None], tok_prev)[:, 0]
            nxt = sample(step_logits, temperature, top_k, generator)
            if temperature > 0:
                draft_probs.append(probabilities(step_logits, temperature, top_k))
            drafts.append(nxt)
            tok_prev, tok, tok_pos = tok, nxt, tok_pos + 1
        drafted = torch.stack(drafts, 1)  # (B, D)
        checked = verify(torch.cat([pending[:, None], drafted], 1), pos[:, None] + offsets, prev)  # (B, D + 1, V)
        accepted, extra = _accept(checked, drafted, draft_probs, temperature, top_k, generator)
        # Finished rows stand still (their positions must stay inside the cache); the rest advance.
        active = counts < max_new_tokens
        stats.rounds += 1
        stats.row_rounds += int(active[:count].sum())
        stats.accepted += int((accepted * active)[:count].sum())
        for row in active.nonzero().flatten().tolist():
            a = int(accepted[row])
            emitted[row] += drafted[row, :a].tolist() + [int(extra[row])]
        counts = torch.where(active, counts + accepted + 1, counts)
        # The new pending token is `extra`; the token before it is the last accepted draft (or the old pending).
        before = torch.where(accepted > 0, drafted[rows_index, (accepted - 1).clamp(min=0)], pending)
        prev, pending = torch.where(active, before, prev), torch.where(active, extra, pending)
        # A row that just finished may sit up to D positions past the cache's room: park it at its
        # prompt's end (it only rewrites its own, no longer needed, cache row from then on).
        pos = torch.where(counts >= max_new_tokens, lengths, torch.where(active, pos + accepted + 1, pos))
    return [e[:max_new_tokens] for e in emitted[:count]], stats


def _accept(
    checked: Tensor, drafted: Tensor, draft_probs: list[Tensor], temperature: float, top_k: int | None, generator
) -> tuple[Tensor, Tensor]:
    """Accepted draft count per row (B,) and the verifier's token after them (B,).

    checked: (B, D + 1, V) exact logits at the pending token and each draft; drafted: (B, D).
    """
    rows, d = drafted.shape
    rows_index = torch.arange(rows, device=drafted.device)
    if temperature == 0.0:
        target = checked.argmax(-1)  # (B, D + 1)
        accepted = torch.cumprod((drafted == target[:, :d]).long(), dim=1).sum(1)
        return accepted, target[rows_index, accepted]
    p = probabilities(checked, temperature, top_k)  # (B, D + 1, V)
    q = torch.stack(draft_probs, 1)  # (B, D, V)
    p_draft = p[:, :d].gather(-1, drafted[..., None]).squeeze(-1)
    q_draft = q.gather(-1, drafted[..., None]).squeeze(-1)
    u = torch.rand(p_draft.shape, generator=generator, device=p_draft.device)
    ok = u * q_draft <= p_draft  # accept with probability min(1, p / q)
    accepted = torch.cumprod(ok.long(), dim=1).sum(1)
    # Rejected at i < D: resample from max(p_i - q_i, 0); all accepted: sample from p_D.
    residual = p[rows_index, accepted] - torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows_index, accepted]
    residual = residual.clamp(min=0)
    residual = torch.where(accepted[:, None] == d, p[rows_index, accepted], residual)
    residual = residual / residual.sum(-1, keepdim=True).clamp(min=1e-20)
    extra = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
    return accepted, extra
