"""Parity with the authors' own model code (phymhan/nanochat-snlp), where a checkout is available.

Set SNLP_NANOCHAT_SRC to a checkout of nanochat-snlp (its nanochat/gpt.py is imported, never
copied); without it the test is skipped. Recorded result: docs/verification.md.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

from snlp_lightning import load_nanochat

SRC = os.environ.get("SNLP_NANOCHAT_SRC")
pytestmark = pytest.mark.skipif(not SRC, reason="set SNLP_NANOCHAT_SRC to a nanochat-snlp checkout to compare against it")

CASES = {
    "plain": dict(no_x0_resid=True, no_ve=True, window_pattern="L"),
    "nanochat-SSSL": dict(window_pattern="SSSL"),
    "mhc": dict(use_mhc=True, no_x0_resid=True, window_pattern="L"),
}


@torch.no_grad()
def _randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("H_res_logits"):
            p.copy_(noise * 0.03)
        elif "logits" in name:
            p.copy_(noise)
        elif name in ("smear_lambda", "backout_lambda", "x0_lambdas"):
            p.copy_(0.3 * noise)
        elif name == "resid_lambdas":
            p.copy_(1 + 0.1 * noise)
        elif p.dim() >= 2 and "wte" not in name:
            p.copy_(noise * 0.5 * p.size(-1) ** -0.5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_the_authors_model(case):
    sys.path.insert(0, SRC)
    from nanochat.gpt import GPT as AuthorsGPT, GPTConfig  # noqa: N811

    cfg = GPTConfig(sequence_len=256, vocab_size=500, n_layer=6, n_head=4, n_kv_head=2, n_embd=64, **CASES[case])
    theirs = AuthorsGPT(cfg)
    theirs.init_weights()
    _randomize(theirs, 1)
    state = {"_orig_mod." + k: v for k, v in theirs.state_dict().items()}  # as a compiled run saves it
    ours = load_nanochat(state, dataclasses.asdict(cfg))
    idx = torch.randint(0, 500, (2, 200), generator=torch.Generator().manual_seed(0))  # 200 > short window 128
    with torch.no_grad():
        assert (theirs.eval()(idx) - ours.eval()(idx)).abs().max() < 1e-5


SOLVER_CASES = [
    # (their call, our plan); their batched paths ignore sliding windows, so windows are "L" here
    ("batched", dict(K=1, init="h0"), "idn:n4:K1:h0"),
    ("batched", dict(K=2, init="h0"), "idn:n4:K2:h0"),
    ("batched", dict(K=2, init="batch_fwd"), "idn:n4:K2:batch_fwd"),
    ("batched", dict(K=2, elk_k=0.3), "damped:n4:K2:kappa=0.3"),
    ("chunkwise", dict(K=1, init="h0"), "idn:n4:2xF2:K1:h0"),
    ("chunkwise", dict(K=2, init="batch_fwd"), "idn:n4:2xF2:K2:batch_fwd"),
    ("chunkwise", dict(K=2, init="h0", avg=True), "idn:n4:2xF2:K2:h0:avg"),
]


@pytest.mark.parametrize("case", ["plain", "nanochat-L"])
@pytest.mark.parametrize("path, kwargs, plan", SOLVER_CASES)
def test_idn_solvers_match_the_authors_solvers(case, path, kwargs, plan):
    sys.path.insert(0, SRC)
    from nanochat.gpt import GPT as AuthorsGPT, GPTConfig  # noqa: N811
    from snlp import inference_idn as theirs_idn

    from snlp_lightning import snlp_forward

    extra = CASES["plain"] if case == "plain" else dict(window_pattern="L")
    # n_kv_head = n_head: their fused chunk path has no GQA (their runs never use it)
    cfg = GPTConfig(sequence_len=64, vocab_size=500, n_layer=6, n_head=4, n_kv_head=4, n_embd=64, **extra)
    theirs = AuthorsGPT(cfg)
    theirs.init_weights()
    _randomize(theirs, 2)
    ours = load_nanochat(theirs.state_dict(), dataclasses.asdict(cfg))
    idx = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    seq_layers, par = 2, [2, 3, 4, 5]
    pw = theirs_idn.PrecomputedWeights(theirs, par)
    if path == "batched":
        expected = theirs_idn.forward_idn_batched(theirs, idx, seq_layers, pw, **kwargs)
    else:
        chunks = [theirs_idn.ChunkWeights(theirs, [2, 3]), theirs_idn.ChunkWeights(theirs, [4, 5])]
        expected = theirs_idn.forward_idn_chunkwise(theirs, idx, seq_layers, pw, chunks, **kwargs)
    with torch.no_grad():
        assert (snlp_forward(ours, idx, plan) - expected).abs().max() < 1e-5


@pytest.mark.parametrize(
    "path, kwargs, plan",
    [
        ("batched", dict(K=1, init="h0"), "hcn:n4:K1:h0"),
        ("batched", dict(K=2, init="batch_fwd"), "hcn:n4:K2:batch_fwd"),
        ("chunkwise", dict(K=2, init="h0"), "hcn:n4:2xF2:K2:h0"),
        ("chunkwise", dict(K=1, init="batch_fwd"), "hcn:n4:2xF2:K1:batch_fwd"),
    ],
)
def test_hcn_solvers_match_the_authors_solvers(path, kwargs, plan):
    sys.path.insert(0, SRC)
    from nanochat.gpt import GPT as AuthorsGPT, GPTConfig  # noqa: N811
    from snlp import inference_hcn as theirs_hcn

    from snlp_lightning import snlp_forward

    cfg = GPTConfig(sequence_len=64, vocab_size=500, n_layer=6, n_head=4, n_kv_head=4, n_embd=64, **CASES["mhc"])
    theirs = AuthorsGPT(cfg)
    theirs.init_weights()
    _randomize(theirs, 3)
    ours = load_nanochat(theirs.state_dict(), dataclasses.asdict(cfg))
    idx = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    par = [2, 3, 4, 5]
    pw = theirs_hcn.MHCPrecomputedWeights(theirs, par)
    with torch.no_grad():
        if path == "batched":
            expected = theirs_hcn.forward_hcn_batched(theirs, idx, 2, pw, **kwargs)
        else:
            chunks = [theirs_hcn.MHCChunkWeights(theirs, [2, 3]), theirs_hcn.MHCChunkWeights(theirs, [4, 5])]
            expected = theirs_hcn.forward_hcn_chunkwise(theirs, idx, 2, 4, chunks, pw, **kwargs)
        assert (snlp_forward(ours, idx, plan) - expected).abs().max() < 1e-5
