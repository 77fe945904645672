"""Generation quality of a solver plan: greedy token match, and a self-speculative sweep.

    rows = [greedy_match(model, "idn:n6:3xF2:K1", prompts),                       # vs the sequential model
            greedy_match(model, "idn:n6:3xF2:K1", prompts, reference="chunk_sequential")]
    sweep = speculative_sweep(model, "idn:n6:3xF2:K1", prompts, draft_lens=(2, 4), temperatures=(0.0, 0.7))
    print(markdown(rows, sweep))

Greedy match (``greedy_match``): the plan's greedy continuation of every prompt, decoded as users
decode it (``generate_tokens`` over a KV-cached ``LayerParallelDecoder``: the plan's prefill,
then one plan decode step per token), against the reference's greedy continuation of the same
prompt (the sequential model; or, for a fused plan, its chunk-sequential model "seq:nN:CxFM", the
K = C limit of the plan). For each length L, ``match[L]`` is the POSITION-WISE match: the mean over
prompts and positions i < L of [plan token i == reference token i]. It does NOT stop at the first
mismatch: after a divergence both continuations run on, each from its own history, and positions
where they agree again still count. ``first_divergence`` is the mean over prompts of the first
position where the two differ (a prompt that never diverges within max(lengths) counts as
max(lengths): a censored value).

Self-speculative sweep (``speculative_sweep``): for every draft length D and temperature, the plan
drafts D tokens per round and the exact model verifies them (``speculative_tokens``).
``alpha`` = accepted draft tokens / proposed draft tokens (D per row and round), counted from the
run's own acceptance records (``SpeculativeStats``: a draft after the first rejection of a round
counts as proposed and not accepted); ``tokens_per_round`` = (accepted + one verifier token per
row-round) / row-rounds. ``s`` = sequential decode-step time / plan decode-step time (one token per
row, measured here), ``model_speedup`` = (1 - alpha^(D+1)) / (1 - alpha) / (D / s + 1)
((D + 1) / (D / s + 1) at alpha = 1), ``measured_speedup`` = wall time of sequential decoding of
the same prompts and number of new tokens / wall time of the speculative generation (both include
the prompt's prefill; timed round-robin in this process, median of ``repeats``). At temperature 0
the speculative output must equal sequential greedy: ``equals_sequential`` says whether it does
(exact in float32 / float64 up to argmax ties; ``strict=True`` raises when it does not). At
temperature > 0 the draft and the rejection sampling draw from one ``torch.Generator`` seeded with
``seed`` (``export.speculative``), so a row is reproducible.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import Tensor

from snlp_lightning.models import GPT
from snlp_lightning.solvers.plan import SolverPlan

from .decoder import LayerParallelDecoder, example_inputs
from .generate import generate_tokens, speculative_tokens
from .measure import interleaved_ms, time_ms
from .runtime import GenerationError

REFERENCES = ("sequential", "chunk_sequential")


class QualityError(GenerationError):
    """A prompt set, length or reference the quality measurements cannot serve."""


def prompt_lists(prompts) -> list[list[int]]:
    """Prompts as lists of ids: a (B, T) tensor, or a sequence of 1-D tensors / id lists."""
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2:
            raise QualityError(f"a prompt tensor must be (B, T), got shape {tuple(prompts.shape)}")
        out = prompts.tolist()
    else:
        out = []
        for p in prompts:
            if isinstance(p, Tensor):
                if p.dim() != 1:
                    raise QualityError(f"each prompt tensor must be 1-D, got shape {tuple(p.shape)}")
                p = p.tolist()
            out.append([int(t) for t in p])
    if not out or any(len(p) == 0 for p in out):
        raise QualityError("give at least one prompt, each of at least one token")
    return out


def chunk_sequential_plan(plan: SolverPlan | str) -> SolverPlan:
    """The K = C limit of ``plan``: its fused chunks one after another ("seq:nN:CxFM"); the
    sequential model itself ("seq") when the plan fuses nothing (M = 1)."""
    plan = SolverPlan.parse(plan)
    if plan.n_par == 0 or plan.fuse == 1:
        return SolverPlan()
    return SolverPlan(method="seq", n_par=plan.n_par, chunks=plan.chunks, fuse=plan.fuse,
                      average_branches=plan.average_branches)


def _reference_plan(plan: SolverPlan, reference: str) -> SolverPlan:
    if reference == "sequential":
        return SolverPlan()
    if reference == "chunk_sequential":
        return chunk_sequential_plan(plan)
    raise QualityError(f"reference={reference!r} is not allowed: one of {', '.join(REFERENCES)}")


def _room(model: GPT, prompts: list[list[int]], extra: int) -> int:
    room = max(len(p) for p in prompts) + extra
    if room > model.config.sequence_len:
        raise QualityError(
            f"the longest prompt ({max(len(p) for p in prompts)} tokens) plus {extra} more positions exceeds "
            f"the model's sequence_len={model.config.sequence_len}: use shorter prompts or fewer new tokens"
        )
    return room


def _first_divergence(a: list[int], b: list[int], n: int) -> int:
    return next((i for i in range(n) if a[i] != b[i]), n)


@torch.inference_mode()
def greedy_match(
    model: GPT,
    plan: SolverPlan | str,
    prompts,
    lengths: Sequence[int] = (8, 16, 32, 64),
    reference: str = "sequential",
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Greedy continuations of ``prompts`` under ``plan`` vs ``reference``'s ("sequential" or
    "chunk_sequential"), max(lengths) new tokens each, all prompts in one batch.

    Returns {"plan", "reference", "reference_plan", "prompts", "new_tokens", "match": {L: fraction},
    "first_divergence": mean first differing position (max(lengths) when none), "diverged":
    fraction of prompts that differ somewhere below max(lengths), "divergence": per prompt,
    "tokens": {"plan": [...], "reference": [...]} (new tokens per prompt)}.
    """
    plan = SolverPlan.parse(plan).validate(model.config)
    ref_plan = _reference_plan(plan, reference)
    lengths = sorted({int(n) for n in lengths})
    if not lengths or lengths[0] < 1:
        raise QualityError(f"lengths={lengths} is not allowed: positive numbers of new tokens")
    prompts = prompt_lists(prompts)
    new = lengths[-1]
    room = _room(model, prompts, new)

    def continuation(p: SolverPlan) -> list[list[int]]:
        decoder = LayerParallelDecoder(model, p, batch_size=len(prompts), max_seq_len=room, dtype=dtype, device=device)
        return generate_tokens(decoder, prompts, new)

    ours, theirs = continuation(plan), continuation(ref_plan)
    match = {}
    for n in lengths:
        same = sum(a == b for got, want in zip(ours, theirs) for a, b in zip(got[:n], want[:n]))
        match[n] = same / (len(prompts) * n)
    divergence = [_first_divergence(got, want, new) for got, want in zip(ours, theirs)]
    return {
        "plan": str(plan),
        "reference": reference,
        "reference_plan": str(ref_plan),
        "prompts": len(prompts),
        "new_tokens": new,
        "match": match,
        "first_divergence": sum(divergence) / len(divergence),
        "diverged": sum(d < new for d in divergence) / len(divergence),
        "divergence": divergence,
        "tokens": {"plan": ours, "reference": theirs},
    }


def match_rows(model: GPT, plan: SolverPlan | str, prompts, lengths: Sequence[int] = (8, 16, 32, 64), **kwargs) -> list[dict]:
    """``greedy_match`` against the sequential model, and for a fused plan (M > 1) also against its
    chunk-sequential model: one row per reference."""
    plan = SolverPlan.parse(plan)
    refs = ["sequential"] + (["chunk_sequential"] if plan.n_par and plan.fuse > 1 else [])
    return [greedy_match(model, plan, prompts, lengths, reference=r, **kwargs) for r in refs]


def speculative_speedup(alpha: float, draft_len: int, s: float) -> float:
    """The latency model of self-speculative decoding: expected tokens per round
    (1 - alpha^(D+1)) / (1 - alpha) (D + 1 at alpha = 1) over a round's cost in sequential steps,
    D / s + 1 (D drafts of 1 / s each, one verify counted as one sequential step)."""
    if not 0.0 <= alpha <= 1.0:
        raise QualityError(f"alpha={alpha} is not allowed: an acceptance rate in [0, 1]")
    if draft_len < 1 or not s > 0:
        raise QualityError(f"draft_len={draft_len}, s={s}: need D >= 1 and s > 0")
    d = draft_len
    tokens = d + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (d + 1)) / (1.0 - alpha)
    return tokens / (d / s + 1.0)


@torch.inference_mode()
def speculative_sweep(
    model: GPT,
    plan: SolverPlan | str,
    prompts,
    draft_lens: Sequence[int] = (2, 4, 6, 8),
    temperatures: Sequence[float] = (0.0, 0.7, 1.0),
    new_tokens: int = 64,
    seed: int = 0,
    *,
    top_k: int | None = None,
    repeats: int = 3,
    warmup: int = 1,
    step_iters: int = 20,
    strict: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> list[dict]:
    """One row per (draft length D, temperature): self-speculative decoding of ``new_tokens`` per
    prompt (all prompts in one batch) with ``plan`` drafting and the sequential model verifying.

    Row keys: plan, draft_len, temperature, seed, new_tokens, prompts, rounds (batched rounds),
    row_rounds, accepted, proposed, alpha, tokens_per_round, s, verify_ratio (verify over D + 1
    tokens / one sequential step, for reference only: the model counts a verify as 1),
    model_speedup, model_speedup_tpr (measured tokens_per_round / (D / s + 1): the model without
    its i.i.d. acceptance assumption), seq_ms, speculative_ms, measured_speedup,
    equals_sequential (temperature 0: output == sequential greedy; None when sampling), tokens.
    ``repeats`` timed generations of each side per row (median), ``warmup`` untimed ones;
    ``step_iters`` timed decode steps for s. ``strict``: raise when a temperature-0 output differs.
    """
    plan = SolverPlan.parse(plan).validate(model.config)
    prompts = prompt_lists(prompts)
    draft_lens = [int(d) for d in draft_lens]
    if not draft_lens or min(draft_lens) < 1:
        raise QualityError(f"draft_lens={draft_lens} is not allowed: draft lengths >= 1")
    if new_tokens < 1:
        raise QualityError(f"new_tokens={new_tokens} is not allowed: must be >= 1")
    rows_n = len(prompts)
    room = _room(model, prompts, new_tokens + max(draft_lens) + 1)
    make = partial(LayerParallelDecoder, model, batch_size=rows_n, max_seq_len=room, dtype=dtype, device=device)
    drafter, seq = make(plan), make("seq")
    where = drafter.k_cache.device

    # s: one decode step (one token per row) of the sequential model vs of the plan, round-robin.
    start = max(len(p) for p in prompts)
    step_in = example_inputs(seq, 1, start)
    steps = interleaved_ms({"seq": lambda: seq.decode(*step_in), "draft": lambda: drafter.decode(*step_in)},
                           where, warmup=max(warmup, 1), iters=step_iters)
    s = steps["seq"] / steps["draft"]
    greedy = generate_tokens(seq, prompts, new_tokens)

    rows = []
    for d in draft_lens:
        verify_in = example_inputs(seq, d + 1, start)
        verify_ms = time_ms(lambda: drafter.prefill_exact(*verify_in), where, warmup=max(warmup, 1), iters=step_iters)
        for temperature in temperatures:
            temperature = float(temperature)
            k = top_k if temperature > 0 else None  # top_k applies only when sampling
            outputs: dict[str, object] = {}

            def keep(name, run):
                return lambda: outputs.__setitem__(name, run())

            runs = {
                "seq": keep("seq", partial(generate_tokens, seq, prompts, new_tokens, temperature=temperature,
                                           top_k=k, seed=seed)),
                "spec": keep("spec", partial(speculative_tokens, drafter, prompts, new_tokens, draft_len=d,
                                             temperature=temperature, top_k=k, seed=seed)),
            }
            ms = interleaved_ms(runs, where, warmup=warmup, iters=repeats, rounds=repeats)
            tokens, stats = outputs["spec"]
            proposed = stats.row_rounds * d
            alpha = stats.accepted / proposed if proposed else 0.0
            tpr = (stats.accepted + stats.row_rounds) / max(stats.row_rounds, 1)
            same = tokens == greedy if temperature == 0.0 else None
            if strict and same is False:
                raise AssertionError(
                    f"self-speculative greedy decoding with plan '{plan}', D={d} differs from sequential greedy"
                )
            rows.append({
                "plan": str(plan),
                "draft_len": d,
                "temperature": temperature,
                "seed": seed,
                "new_tokens": new_tokens,
                "prompts": rows_n,
                "rounds": stats.rounds,
                "row_rounds": stats.row_rounds,
                "accepted": stats.accepted,
                "proposed": proposed,
                "alpha": alpha,
                "tokens_per_round": tpr,
                "s": s,
                "verify_ratio": verify_ms / steps["seq"],
                "model_speedup": speculative_speedup(alpha, d, s),
                "model_speedup_tpr": tpr / (d / s + 1.0),
                "seq_ms": ms["seq"],
                "speculative_ms": ms["spec"],
                "measured_speedup": ms["seq"] / ms["spec"],
                "equals_sequential": same,
                "tokens": tokens,
            })
    return rows


def markdown(match: Sequence[dict] | dict | None = None, sweep: Sequence[dict] | None = None) -> str:
    """Markdown tables of ``greedy_match`` rows and ``speculative_sweep`` rows (either may be None)."""
    out: list[str] = []
    if isinstance(match, dict):
        match = [match]
    if match:
        lengths = sorted({n for row in match for n in row["match"]})
        out += [
            "Greedy token match vs the reference (position-wise over the first L new tokens, not stopping at the "
            "first mismatch; first divergence: mean first differing position, max L when none)",
            "",
            "| plan | reference | " + " | ".join(f"match@{n}" for n in lengths) + " | first divergence | diverged |",
            "|---|---|" + "---:|" * len(lengths) + "---:|---:|",
        ]
        for row in match:
            cells = [f"{row['match'][n]:.3f}" if n in row["match"] else "" for n in lengths]
            ref = row["reference"] if row["reference_plan"] == "seq" else f"{row['reference']} ({row['reference_plan']})"
            out.append(f"| {row['plan']} | {ref} | " + " | ".join(cells)
                       + f" | {row['first_divergence']:.1f} / {row['new_tokens']} | {row['diverged']:.0%} |")
        out.append("")
    if sweep:
        out += [
            "Self-speculative decoding (alpha = accepted / proposed drafts; s = sequential step / draft step; "
            "model = (1 - alpha^(D+1)) / (1 - alpha) / (D / s + 1))",
            "",
            "| plan | D | temperature | alpha | tokens/round | s | model speedup | measured speedup | = seq greedy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in sweep:
            same = {True: "yes", False: "NO", None: "n/a (sampling)"}[row["equals_sequential"]]
            out.append(
                f"| {row['plan']} | {row['draft_len']} | {row['temperature']:g} | {row['alpha']:.3f} | "
                f"{row['tokens_per_round']:.2f} | {row['s']:.2f} | {row['model_speedup']:.2f}x | "
                f"{row['measured_speedup']:.2f}x | {same} |"
            )
        out.append("")
    return "\n".join(out)
