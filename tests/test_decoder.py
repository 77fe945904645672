"""The layer-parallel decoder: KV-cache semantics of spec section 6, generation, self-speculation."""

from __future__ import annotations

import pytest
import torch

from export import DecoderError, GenerationError, LayerParallelDecoder, generate_tokens, speculative_tokens
from export.speculative import _accept
from snlp_lightning.solvers import PlanError

from conftest import tiny_model
from reference_decode import ReferenceDecoder

LONG = dict(sequence_len=64, short_window=8)  # room for 40 new tokens; windows still bite


def sequential_greedy(model, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence every step (no cache)."""
    seq = torch.tensor([prompt])
    for _ in range(new):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, len(prompt):].tolist()


def prompts_for(vocab: int, lengths=(5, 9, 3), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize(
    "preset,plan",
    [("plain", "idn:n4:K4"), ("plain", "seq"), ("nanochat", "idn:n6:K6:batch_fwd"), ("mhc", "hcn:n4:K4"), ("mhc-dynamic", "hcn:n3:K3")],
)
def test_exact_plans_decode_sequential_greedy_tokens(preset, plan):
    """K = C, M = 1: 40 cached decode steps give exactly the sequential greedy tokens (3 prompts, batch 3)."""
    model = tiny_model(preset, **LONG)
    prompts = prompts_for(model.config.vocab_size)
    decoder = LayerParallelDecoder(model, plan, batch_size=3, max_seq_len=64)
    got = generate_tokens(decoder, prompts, 40)
    want = [sequential_greedy(model, p, 40) for p in prompts]
    assert got == want


@pytest.mark.parametrize(
    "preset,plan",
    [
        ("plain", "idn:n4:K1"),
        ("plain", "idn:n4:2xF2:K1"),
        ("nanochat", "idn:n6:3xF2:K2:batch_fwd"),
        ("nanochat", "damped:n5:K2:kappa=0.3"),
        ("mhc", "hcn:n4:K2"),
        ("mhc-dynamic", "hcn:n4:2xF2:K1"),
    ],
)
def test_cached_decode_equals_slow_reference(preset, plan):
    """Approximate plans: every decode step's logits equal the cache-free reference of the same semantics."""
    model = tiny_model(preset, **LONG)
    prompt = torch.tensor(prompts_for(model.config.vocab_size, (7, 7)))
    decoder = LayerParallelDecoder(model, plan, batch_size=2, max_seq_len=32)
    reference = ReferenceDecoder(model, plan)
    pos = torch.arange(7).expand(2, 7)
    got = decoder.prefill(prompt, pos, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(got, reference.prefill(prompt), rtol=0, atol=1e-10)
    token, prev = got[:, -1].argmax(-1, keepdim=True), prompt[:, -1]
    worst = 0.0
    for p in range(7, 20):
        got = decoder.decode(token, torch.full((2, 1), p), prev)
        want = reference.decode(token)
        worst = max(worst, float((got - want).abs().max().detach()))
        prev, token = token[:, 0], got[:, -1].argmax(-1, keepdim=True)
    assert worst < 1e-10
    # ... and the plan really is approximate here: its logits differ from the exact sequential model's.
    exact = model(reference.tokens)[:, -1:]
    assert float((want - exact).abs().max()) > 1e-4


def test_rows_at_different_positions_match_single_rows():
    """A batch whose rows sit at different lengths decodes each row as it would alone."""
    model = tiny_model("nanochat", **LONG)
    prompts = prompts_for(model.config.vocab_size, (4, 11))
    batched = generate_tokens(LayerParallelDecoder(model, "idn:n4:K1", batch_size=2, max_seq_len=40), prompts, 12)
    alone = [generate_tokens(LayerParallelDecoder(model, "idn:n4:K1", batch_size=1, max_seq_len=40), [p], 12)[0] for p in prompts]
    assert batched == alone


@pytest.mark.parametrize("preset,plan", [("plain", "idn:n4:K1"), ("nanochat", "idn:n4:2xF2:K1"), ("mhc", "hcn:n5:K1")])
def test_self_speculative_greedy_equals_sequential(preset, plan):
    model = tiny_model(preset, **LONG)
    prompts = prompts_for(model.config.vocab_size, (9, 9, 9))
    # The tightest cache allowed: longest prompt + new tokens + D + 1. Rows finish at different
    # rounds; a finished row must not walk past the cache while the others catch up.
    decoder = LayerParallelDecoder(model, plan, batch_size=3, max_seq_len=9 + 30 + 3 + 1)
    got, stats = speculative_tokens(decoder, prompts, 30, draft_len=3)
    assert got == [sequential_greedy(model, p, 30) for p in prompts]
    assert stats.rounds > 0 and 0.0 <= stats.mean_accepted <= 3.0


def test_speculative_rejection_sampling_keeps_the_target_distribution():
    """One draft token per row: the first emitted token must be distributed as p, whatever q drafts."""
    torch.manual_seed(0)
    rows, vocab = 200_000, 5
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.5])
    g = torch.Generator().manual_seed(0)
    drafted = torch.multinomial(q.expand(rows, vocab), 1, replacement=True, generator=g)  # (rows, 1)
    checked = p.log().expand(rows, 2, vocab)  # logits whose softmax (temperature 1) is p
    accepted, extra = _accept(checked, drafted, [q.expand(rows, vocab)], 1.0, None, g)
    first = torch.where(accepted > 0, drafted[:, 0], extra)
    freq = torch.bincount(first, minlength=vocab).float() / rows
    torch.testing.assert_close(freq, p, atol=5e-3, rtol=0)
    assert 0.2 < float(accepted.float().mean()) < 0.6  # sum_v min(p, q) = 0.45 of drafts accepted


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_model("plain", **LONG)
    decoder = LayerParallelDecoder(model, "idn:n4:K1", batch_size=1, max_seq_len=64)
    prompt = prompts_for(model.config.vocab_size, (5,))
    a = generate_tokens(decoder, prompt, 20, temperature=1.0, seed=3)
    assert a == generate_tokens(decoder, prompt, 20, temperature=1.0, seed=3)
    assert a != generate_tokens(decoder, prompt, 20, temperature=1.0, seed=4)
    assert generate_tokens(decoder, prompt, 20, temperature=5.0, top_k=1) == generate_tokens(decoder, prompt, 20)


def test_bad_plans_lengths_and_settings_are_one_line_errors():
    model = tiny_model("plain", **LONG)
    with pytest.raises(DecoderError, match="diagn.*serves methods"):
        LayerParallelDecoder(model, "diagn:n4:K1")
    with pytest.raises(PlanError, match="n9"):
        LayerParallelDecoder(model, "idn:n9:K1")  # the model has 6 layers
    with pytest.raises(DecoderError, match="max_seq_len=65"):
        LayerParallelDecoder(model, "seq", max_seq_len=65)
    decoder = LayerParallelDecoder(model, "idn:n4:K1", batch_size=1, max_seq_len=16)
    with pytest.raises(GenerationError, match="prompt of 12 tokens plus 5 more positions exceeds the KV cache of 16"):
        generate_tokens(decoder, [[1] * 12], 5)
    with pytest.raises(GenerationError, match="2 prompts do not fit a KV cache of 1 rows"):
        generate_tokens(decoder, [[1], [2]], 3)
    with pytest.raises(GenerationError, match="temperature=-1"):
        generate_tokens(decoder, [[1]], 3, temperature=-1)
    with pytest.raises(Exception, match="token id 96 is out of the vocabulary"):
        generate_tokens(decoder, [[96]], 3)
