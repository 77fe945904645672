"""Generation quality per plan (export.quality): greedy token match and the self-speculative sweep,
checked against references computed here without the module (no cache, or replayed round by round)."""

from __future__ import annotations

import math

import pytest
import torch

from export import LayerParallelDecoder
from export.quality import QualityError, greedy_match, markdown, match_rows, speculative_speedup, speculative_sweep
from snlp_lightning.solvers import snlp_forward

from conftest import tiny_model

LONG = dict(sequence_len=64, short_window=8)
LENGTHS = (4, 8, 16)


@pytest.fixture(scope="module")
def model():
    return tiny_model("nanochat", **LONG)


@pytest.fixture(scope="module")
def prompts(model):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in (5, 9, 3)]


@torch.no_grad()
def full_forward_greedy(forward, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence every step with ``forward(idx)`` (no cache)."""
    seq = torch.tensor([prompt])
    for _ in range(new):
        seq = torch.cat([seq, forward(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, len(prompt):].tolist()


@torch.no_grad()
def cached_plan_greedy(model, plan: str, prompt: list[int], new: int) -> list[int]:
    """The plan's greedy tokens through the decoder's own prefill / decode, one prompt alone."""
    decoder = LayerParallelDecoder(model, plan, batch_size=1, max_seq_len=len(prompt) + new)
    tokens = torch.tensor([prompt])
    logits = decoder.prefill(tokens, torch.arange(len(prompt))[None], torch.zeros(1, dtype=torch.long))
    out, prev = [int(logits[0, -1].argmax())], prompt[-1]
    for pos in range(len(prompt), len(prompt) + new - 1):
        logits = decoder.decode(torch.tensor([[out[-1]]]), torch.tensor([[pos]]), torch.tensor([prev]))
        prev = out[-1]
        out.append(int(logits[0, -1].argmax()))
    return out


def by_hand(plan_tokens, ref_tokens, lengths):
    match = {n: sum(a == b for p, r in zip(plan_tokens, ref_tokens) for a, b in zip(p[:n], r[:n])) / (len(plan_tokens) * n)
             for n in lengths}
    new = max(lengths)
    first = [next((i for i in range(new) if p[i] != r[i]), new) for p, r in zip(plan_tokens, ref_tokens)]
    return match, sum(first) / len(first)


def test_exact_plan_matches_sequential_everywhere(model, prompts):
    """K = C, M = 1: the plan's continuation is the sequential one, so the match is 1 at every L."""
    row = greedy_match(model, "idn:n4:K4", prompts, LENGTHS)
    want = [full_forward_greedy(model, p.tolist(), max(LENGTHS)) for p in prompts]
    assert row["tokens"]["reference"] == want and row["tokens"]["plan"] == want
    assert row["match"] == {n: 1.0 for n in LENGTHS}
    assert row["first_divergence"] == max(LENGTHS) and row["diverged"] == 0.0


def test_approximate_plan_match_computed_by_hand(model, prompts):
    plan = "idn:n4:K1"
    row = greedy_match(model, plan, torch.stack([p[:3] for p in prompts]), LENGTHS)  # (B, T) prompts too
    lists = [p[:3].tolist() for p in prompts]
    ours = [cached_plan_greedy(model, plan, p, max(LENGTHS)) for p in lists]
    ref = [full_forward_greedy(model, p, max(LENGTHS)) for p in lists]
    assert row["tokens"] == {"plan": ours, "reference": ref}
    match, first = by_hand(ours, ref, LENGTHS)
    assert row["match"] == pytest.approx(match) and row["first_divergence"] == pytest.approx(first)
    assert 0.0 < match[max(LENGTHS)] < 1.0  # the plan really differs here, and agrees somewhere


def test_chunk_sequential_reference(model, prompts):
    """A fused plan against its chunk-sequential model (the same fused chunks one after another)."""
    lists = [p.tolist() for p in prompts]
    direct = [full_forward_greedy(lambda idx: snlp_forward(model, idx, "seq:n4:2xF2"), p, max(LENGTHS)) for p in lists]
    sequential = [full_forward_greedy(model, p, max(LENGTHS)) for p in lists]
    assert direct != sequential  # fusing changes the model: the two references are different rows
    rows = match_rows(model, "idn:n4:2xF2:K1", prompts, LENGTHS)
    assert [r["reference"] for r in rows] == ["sequential", "chunk_sequential"]
    assert rows[0]["tokens"]["reference"] == sequential
    assert rows[1]["tokens"]["reference"] == direct and rows[1]["reference_plan"] == "seq:n4:2xF2"
    ours = [cached_plan_greedy(model, "idn:n4:2xF2:K1", p, max(LENGTHS)) for p in lists]
    for row, ref in zip(rows, (sequential, direct)):
        match, first = by_hand(ours, ref, LENGTHS)
        assert row["match"] == pytest.approx(match) and row["first_divergence"] == pytest.approx(first)
    # K = C of the fused plan is exactly its chunk-sequential model.
    exact = greedy_match(model, "idn:n4:2xF2:K2", prompts, LENGTHS, reference="chunk_sequential")
    assert exact["match"] == {n: 1.0 for n in LENGTHS} and exact["tokens"]["plan"] == direct
    assert len(match_rows(model, "idn:n4:K1", prompts, LENGTHS)) == 1  # unfused: the sequential row only
    with pytest.raises(QualityError, match="reference"):
        greedy_match(model, "idn:n4:K1", prompts, LENGTHS, reference="self")


@torch.no_grad()
def replay_acceptance(model, plan: str, prompt: list[int], new: int, d: int) -> tuple[int, int, int]:
    """(accepted, proposed, rounds) of greedy self-speculation, replayed round by round: the
    sequential greedy tokens g, and per round the plan's D greedy drafts from a fresh cache holding
    the exact prefix prompt + g[:j] (the pending token g[j] is decoded first)."""
    g = full_forward_greedy(model, prompt, new + d + 1)
    accepted = proposed = rounds = 0
    j = 0  # index of the pending token; j + 1 tokens are emitted
    while j + 1 < new:
        context = prompt + g[:j]
        decoder = LayerParallelDecoder(model, plan, batch_size=1, max_seq_len=len(context) + d + 1)
        decoder.prefill_exact(torch.tensor([context]), torch.arange(len(context))[None], torch.zeros(1, dtype=torch.long))
        tok, prev, drafts = g[j], context[-1], []
        for i in range(d):
            logits = decoder.decode(torch.tensor([[tok]]), torch.tensor([[len(context) + i]]), torch.tensor([prev]))
            prev, tok = tok, int(logits[0, -1].argmax())
            drafts.append(tok)
        a = next((i for i in range(d) if drafts[i] != g[j + 1 + i]), d)
        accepted, proposed, rounds, j = accepted + a, proposed + d, rounds + 1, j + a + 1
    return accepted, proposed, rounds


def test_sweep_acceptance_against_a_counted_run(model, prompts):
    plan, new = "idn:n4:K1", 12
    rows = speculative_sweep(model, plan, prompts, draft_lens=(2, 3), temperatures=(0.0,), new_tokens=new,
                             repeats=1, warmup=0, step_iters=2, strict=True)
    assert [r["draft_len"] for r in rows] == [2, 3]
    greedy = [full_forward_greedy(model, p.tolist(), new) for p in prompts]
    for row in rows:
        counts = [replay_acceptance(model, plan, p.tolist(), new, row["draft_len"]) for p in prompts]
        accepted, proposed, rounds = (sum(c[i] for c in counts) for i in range(3))
        assert (row["accepted"], row["proposed"], row["row_rounds"]) == (accepted, proposed, rounds)
        assert row["alpha"] == pytest.approx(accepted / proposed)
        assert row["tokens_per_round"] == pytest.approx((accepted + rounds) / rounds)
        assert 0.0 < row["alpha"] < 1.0
        # Temperature 0: exactly the sequential greedy tokens.
        assert row["equals_sequential"] is True and row["tokens"] == greedy
        assert row["model_speedup"] == pytest.approx(speculative_speedup(row["alpha"], row["draft_len"], row["s"]))
        assert row["s"] > 0 and row["measured_speedup"] > 0 and math.isfinite(row["verify_ratio"])


def test_speedup_model_at_hand_chosen_values():
    assert speculative_speedup(0.5, 4, 2.0) == pytest.approx((1 - 0.5**5) / 0.5 / 3.0)  # 0.6458
    assert speculative_speedup(0.8, 2, 4.0) == pytest.approx((1 + 0.8 + 0.64) / 1.5)
    assert speculative_speedup(1.0, 4, 3.0) == pytest.approx(5 / (4 / 3 + 1))  # alpha = 1: (D + 1) / (D / s + 1)
    assert speculative_speedup(1.0 - 1e-12, 4, 3.0) == pytest.approx(5 / (4 / 3 + 1), rel=1e-6)
    assert speculative_speedup(0.0, 3, 6.0) == pytest.approx(1 / 1.5)
    with pytest.raises(QualityError):
        speculative_speedup(1.5, 4, 2.0)


def test_sampled_sweep_is_seeded_and_tables_render(model, prompts):
    kwargs = dict(draft_lens=(2,), temperatures=(0.7,), new_tokens=10, repeats=1, warmup=0, step_iters=2)
    a = speculative_sweep(model, "idn:n4:2xF2:K1", prompts, seed=3, **kwargs)[0]
    b = speculative_sweep(model, "idn:n4:2xF2:K1", prompts, seed=3, **kwargs)[0]
    assert a["tokens"] == b["tokens"] and (a["accepted"], a["row_rounds"]) == (b["accepted"], b["row_rounds"])
    assert a["equals_sequential"] is None and 0.0 <= a["alpha"] <= 1.0
    table = markdown(greedy_match(model, "idn:n4:K4", prompts, LENGTHS), [a])
    assert "| idn:n4:K4:h0 | sequential | 1.000 | 1.000 | 1.000 |" in table
    assert "| idn:n4:2xF2:K1:h0 | 2 | 0.7 |" in table and "n/a (sampling)" in table
    with pytest.raises(QualityError, match="sequence_len"):
        greedy_match(model, "idn:n4:K1", prompts, (64,))
