"""Parity with the authors' own model code (phymhan/nanochat-snlp), where a checkout is available.

Set SNLP_NANOCHAT_SRC to a checkout of nanochat-snlp (its nanochat/gpt.py, nanochat/optim.py and
snlp/ solvers are imported, never copied; scripts/base_train.py trains at import, so its few schedule
formulas are copied below); without it the tests are skipped. Covered: logits, the IDN / HCN solvers,
the optimizer (MuonAdamW from GPT.setup_optimizer, bit-for-bit) and its schedules and weight-decay
transfer, the MTP loss, and the regularizer options. Recorded result: docs/verification.md.
"""

from __future__ import annotations

import dataclasses
import math
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


# -- training: optimizer, schedules, MTP loss, regularizer options ---------------------------------
def _authors_pair(case: str, seed: int, n_layer: int, tweak=None, **extra):
    """Their GPT (random weights, then ``tweak(theirs)`` if given; training mode) and ours loaded from its state dict."""
    sys.path.insert(0, SRC)
    from nanochat.gpt import GPT as AuthorsGPT, GPTConfig  # noqa: N811

    cfg = GPTConfig(sequence_len=64, vocab_size=500, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=64, **CASES[case], **extra)
    theirs = AuthorsGPT(cfg)
    theirs.init_weights()
    _randomize(theirs, seed)
    if tweak is not None:
        tweak(theirs)
    ours = load_nanochat(theirs.state_dict(), dataclasses.asdict(cfg))
    return theirs.train(), ours.train()


def _batch(batch: int = 2, length: int = 40):
    idx = torch.randint(0, 500, (batch, length + 1), generator=torch.Generator().manual_seed(0))
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()  # their loss views the targets


# Their scripts/base_train.py schedules, copied (that script trains at import): num_iterations,
# warmup_steps, warmdown_ratio, final_lr_frac and weight_decay_scaled are its globals / args.
def _their_lr_multiplier(it, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac):
    warmup_iters = warmup_steps
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    elif it <= num_iterations - warmdown_iters:
        return 1.0
    else:
        progress = (num_iterations - it) / warmdown_iters
        return progress * 1.0 + (1 - progress) * final_lr_frac


def _their_muon_momentum(it, num_iterations, warmdown_ratio):
    warmdown_iters = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_iters
    if it < 400:
        frac = it / 400
        return (1 - frac) * 0.85 + frac * 0.97
    elif it >= warmdown_start:
        progress = (it - warmdown_start) / warmdown_iters
        return 0.97 * (1 - progress) + 0.90 * progress
    else:
        return 0.97


def _their_weight_decay(it, num_iterations, weight_decay_scaled):
    return weight_decay_scaled * 0.5 * (1 + math.cos(math.pi * it / num_iterations))


def _authors_recipe(**fields):
    from snlp_lightning.optim import OptimConfig

    return OptimConfig(
        optimizer="nanochat", muon_momentum_schedule=True, weight_decay_schedule="cosine", **fields
    )


@pytest.mark.parametrize("total, warmup, warmdown, final", [(1000, 40, 0.5, 0.0), (1000, 0, 0.3, 0.05), (300, 7, 0.4, 0.1)])
def test_schedules_equal_the_authors_base_train(total, warmup, warmdown, final):
    """Our LR multiplier, Muon momentum and weight decay per step are exactly their script's."""
    from snlp_lightning.optim import lr_multiplier, muon_momentum_at, weight_decay_at

    cfg = _authors_recipe(warmup_steps=warmup, warmdown_ratio=warmdown, final_lr_frac=final)
    for it in range(total):
        assert lr_multiplier(it, total, cfg) == _their_lr_multiplier(it, total, warmup, warmdown, final), it
        assert muon_momentum_at(it, total, cfg) == _their_muon_momentum(it, total, warmdown), it
        assert weight_decay_at(it, total, cfg, 0.28) == _their_weight_decay(it, total, 0.28), it


OPTIMIZER_CASES = {
    "plain": dict(),
    "nanochat-SSSL": dict(num_mtp_steps=1),  # its MTP head joins the 64 x 64 Muon group
    "mhc": dict(),
}


@pytest.mark.parametrize("case", sorted(OPTIMIZER_CASES))
def test_optimizer_steps_equal_the_authors_muon_adamw(case, monkeypatch):
    """4 steps of our NanochatMuonAdamW + StepSchedule against their MuonAdamW from GPT.setup_optimizer,
    the LR / momentum / weight decay set per step as their base_train.py does, the same gradients
    on both sides (their loss's, copied to ours): every parameter and every optimizer state is
    bit-for-bit equal (float32, CPU) after every step."""
    from snlp_lightning.optim import build_optimizer

    sys.path.insert(0, SRC)
    import nanochat.optim as their_optim

    # Their fused steps are torch.compile'd; run the undecorated functions (no compile on the CPU).
    monkeypatch.setattr(their_optim, "adamw_step_fused", their_optim.adamw_step_fused._torchdynamo_orig_callable)
    monkeypatch.setattr(their_optim, "muon_step_fused", their_optim.muon_step_fused._torchdynamo_orig_callable)
    theirs, ours = _authors_pair(case, 4, 4, **OPTIMIZER_CASES[case])
    their_params, our_params = dict(theirs.named_parameters()), dict(ours.named_parameters())
    assert their_params.keys() == our_params.keys()

    total, warmup, warmdown, final, wd = 4, 2, 0.5, 0.1, 0.28
    tokens, b_ref = 2**18, 2**19  # batch LR scaling sqrt(1/2) on both sides
    cfg = _authors_recipe(
        weight_decay=wd, warmup_steps=warmup, warmdown_ratio=warmdown, final_lr_frac=final, lr_batch_reference=b_ref
    )
    optimizer, schedule = build_optimizer(ours, cfg, total, tokens_per_step=tokens)
    scale = (tokens / b_ref) ** 0.5  # their batch_lr_scale
    their_opt = theirs.setup_optimizer(
        unembedding_lr=0.004 * scale, embedding_lr=0.2 * scale, matrix_lr=0.02 * scale, weight_decay=wd, scalar_lr=0.5 * scale
    )

    def groups(opt, params):
        name = {id(p): n for n, p in params.items()}
        return sorted(
            (g["kind"], tuple(name[id(p)] for p in g["params"]), g["initial_lr"])
            + ((g["betas"], g["eps"], g["weight_decay"]) if g["kind"] == "adamw" else (g["beta2"], g["ns_steps"]))
            for g in opt.param_groups if g["params"]
        )

    assert groups(optimizer, our_params) == groups(their_opt, their_params)  # same members (in order), rates, betas
    x, y = _batch(2, 32)
    losses = []
    for it in range(total):
        loss = theirs(x, y)
        loss.backward()
        losses.append(loss.item())
        for name, p in their_params.items():
            our_params[name].grad = None if p.grad is None else p.grad.clone()
        lrm = _their_lr_multiplier(it, total, warmup, warmdown, final)
        for group in their_opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = _their_muon_momentum(it, total, warmdown)
                group["weight_decay"] = _their_weight_decay(it, total, wd)
        their_opt.step()
        optimizer.step()
        schedule.step()
        theirs.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)
        for name, p in their_params.items():
            assert torch.equal(p, our_params[name]), (it, name, (p - our_params[name]).abs().max().item())
    assert losses[-1] < losses[0] - 1  # it trained: the steps were not no-ops

    # Optimizer state: theirs stacks a Muon group's buffers in its first parameter's state, ours keeps one per matrix.
    for group in their_opt.param_groups:
        for i, p in enumerate(group["params"]):
            mine = optimizer.state[our_params[next(n for n, q in their_params.items() if q is p)]]
            if group["kind"] == "muon":
                stacked = their_opt.state[group["params"][0]]
                assert torch.equal(stacked["momentum_buffer"][i], mine["momentum_buffer"])
                assert torch.equal(stacked["second_momentum_buffer"][i], mine["second_momentum_buffer"])
            else:
                state = their_opt.state[p]
                assert state["step"] == mine["step"] == total
                assert torch.equal(state["exp_avg"], mine["exp_avg"]) and torch.equal(state["exp_avg_sq"], mine["exp_avg_sq"])


@pytest.mark.parametrize("case, steps", [("plain", 1), ("nanochat-SSSL", 2), ("mhc", 1)])
def test_mtp_loss_equals_the_authors(case, steps):
    """Their training loss with MTP heads (CE + 0.3 x each head's CE) against SNLPModule.compute_losses,
    the same weights (mtp_projs included)."""
    from snlp_lightning.module import SNLPModule
    from snlp_lightning.regularizer import RegularizerConfig

    theirs, ours = _authors_pair(case, 5, 6, num_mtp_steps=steps, mtp_loss_weight=0.3)
    module = SNLPModule(ours.config, regularizer=RegularizerConfig())
    module.model = ours
    x, y = _batch()
    with torch.no_grad():
        expected = theirs(x, y)
        losses = module.compute_losses(x, y, torch.ones(()), 0)
    assert len([k for k in losses if k.startswith("mtp_")]) == steps
    assert abs(losses["loss"].item() - losses["ce"].item()) > 0.5  # the heads count
    assert (losses["loss"] - expected).abs().item() < 1e-5


# (case, their model attributes, their forward kwargs, our RegularizerConfig fields); lambdas sized so
# each term is O(0.1-1): their regularizer is read as (their loss) - (their CE), both float32.
REG_CASES = {
    "idn-stride0": ("nanochat-SSSL", dict(idn_stride=0), dict(identity_newton_reg=0.7), dict(lambda_idn=0.7, stride=0)),
    "idn-stride2-plain": ("plain", dict(idn_stride=2), dict(identity_newton_reg=0.7), dict(lambda_idn=0.7, stride=2)),
    "idn-stride2": ("nanochat-SSSL", dict(idn_stride=2), dict(identity_newton_reg=0.7), dict(lambda_idn=0.7, stride=2)),
    "diag-vjp-stride2-plain": (
        "plain", dict(diag_newton_jvp="vjp", diag_stride=2), dict(diag_newton_reg=0.7),
        dict(lambda_diag=0.7, diag_estimator="vjp", diag_stride=2),
    ),
    "diag-vjp-stride2": (
        "nanochat-SSSL", dict(diag_newton_jvp="vjp", diag_stride=2), dict(diag_newton_reg=0.7),
        dict(lambda_diag=0.7, diag_estimator="vjp", diag_stride=2),
    ),
    "diag-fd-stride2": (
        "nanochat-SSSL", dict(diag_newton_jvp="fd", diag_stride=2), dict(diag_newton_reg=0.7),
        dict(lambda_diag=0.7, diag_estimator="fd", diag_stride=2),
    ),
    "jacobi-plain": ("plain", dict(), dict(jacobi_reg=0.7), dict(lambda_jacobi=0.7)),
    "jacobi": ("nanochat-SSSL", dict(), dict(jacobi_reg=0.7), dict(lambda_jacobi=0.7)),
    "hcn-stride0": ("mhc", dict(idn_stride=0), dict(mhc_newton_reg=10.0), dict(lambda_hcn=10.0, stride=0)),
    "hcn-stride2": ("mhc", dict(idn_stride=2), dict(mhc_newton_reg=10.0), dict(lambda_hcn=10.0, stride=2)),
    # several terms in one forward: their Jacobi vectors are drawn during the blocks, the DiagN z after
    "all": (
        "nanochat-SSSL", dict(idn_stride=2, diag_newton_jvp="vjp", diag_stride=2),
        dict(jacobi_reg=0.3, identity_newton_reg=0.5, diag_newton_reg=0.7),
        dict(lambda_jacobi=0.3, lambda_idn=0.5, stride=2, lambda_diag=0.7, diag_estimator="vjp", diag_stride=2),
    ),
    # mHC: their vectors and z are drawn on the (B * streams, T, D) states; the model's H_res lean
    # towards the identity in the even layers (``_half_identity_mixing``), so the Jacobi gain estimates
    # straddle the 0.9 threshold (~0.98 even, ~0.5 odd layers; random mHC blocks all give ~0.5)
    "jacobi-mhc": ("mhc", dict(), dict(jacobi_reg=0.7), dict(lambda_jacobi=0.7)),
    "all-mhc": (
        "mhc", dict(idn_stride=2, diag_newton_jvp="vjp", diag_stride=2),
        dict(jacobi_reg=0.3, mhc_newton_reg=5.0, diag_newton_reg=0.7),
        dict(lambda_jacobi=0.3, lambda_hcn=5.0, stride=2, lambda_diag=0.7, diag_estimator="vjp", diag_stride=2),
    ),
}


@torch.no_grad()
def _half_identity_mixing(model) -> None:
    for block in model.transformer.h[::2]:
        for hc in (block.hc_attn, block.hc_mlp):
            hc.H_res_logits.add_(0.3 * torch.eye(hc.H_res_logits.size(-1)))


@pytest.mark.parametrize("name", list(REG_CASES))
def test_regularizer_options_equal_the_authors(name):
    """Their GPT.forward regularizers (attributes set as base_train.py sets them, warmup buffer 1)
    against ``snlp_regularizer`` on our trace, with their random draws reproduced: the global RNG
    seeded alike, their Jacobi vectors (randn_like per block, in block order, normalised per token)
    and DiagN z (randint per N config, after the blocks) drawn in their order and shapes and passed
    to ours as ``vectors`` / ``probes``. Loss values to 1e-5, and the gradients of CE + regularizer."""
    from snlp_lightning.regularizer import RegularizerConfig, snlp_regularizer

    case, attrs, kwargs, fields = REG_CASES[name]
    theirs, ours = _authors_pair(case, 5, 6, tweak=_half_identity_mixing if case == "mhc" else None)
    n_par = [2, 3, 5]
    for key, value in dict(attrs, n_par_configs=n_par).items():
        setattr(theirs, key, value)
    cfg = RegularizerConfig(n_par_configs=n_par, **fields).validate(ours.config)
    x, y = _batch()
    (B, T), L, n, D = x.shape, ours.config.n_layer, ours.config.n_streams, ours.config.n_embd

    def theirs_to_ours(t):  # their (B * n, T, D) states (mHC: the streams folded into the batch) -> (B, T, n, D)
        return t.view(B, n, T, D).transpose(1, 2)

    with torch.no_grad():
        their_ce = theirs(x, y)
    torch.manual_seed(1234)
    their_loss = theirs(x, y, **kwargs)
    their_loss.backward()
    torch.manual_seed(1234)
    vectors = probes = None
    if cfg.lambda_jacobi:
        draws = [torch.randn(B * n, T, D) for _ in range(L)]
        vectors = torch.stack([theirs_to_ours(v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)) for v in draws])
    if cfg.lambda_diag:
        probes = torch.stack([theirs_to_ours(torch.randint(0, 2, (B * n, T, D), dtype=torch.float32) * 2 - 1) for _ in n_par])
    inputs, trace = ours.forward_trace(x)
    terms = snlp_regularizer(ours, inputs, trace, cfg, probes=probes, vectors=vectors)
    for key in ("idn", "hcn", "diag", "jacobi"):  # every term asked for is there, and is not negligible
        assert (terms[key].item() > 0.005) == bool(getattr(cfg, f"lambda_{key}")), (key, terms[key].item())
    assert ((their_loss - their_ce) - terms["total"]).abs().item() < 1e-5
    hidden = ours.hidden(trace[-1], trace[ours.backout_layer + 1])
    ce = torch.nn.functional.cross_entropy(ours.logits(hidden).flatten(0, 1), y.flatten())
    assert (ce - their_ce).abs().item() < 1e-5
    (ce + terms["total"]).backward()
    our_params = dict(ours.named_parameters())
    for pname, p in theirs.named_parameters():
        mine = our_params[pname].grad
        if p.grad is None:
            assert mine is None or not mine.any(), pname
            continue
        # mHC's Sinkhorn (tau 0.05, 10 log-space iterations) amplifies float32 rounding: the H_res
        # gradients of either side differ from a float64 evaluation of ours by up to ~1.5e-6.
        atol = 3e-6 if pname.endswith("H_res_logits") else 1e-7
        scale = p.grad.abs().max().item()
        assert (p.grad - mine).abs().max().item() <= 1e-4 * scale + atol, (pname, (p.grad - mine).abs().max().item(), scale)


def _their_meta_model(depth: int, aspect_ratio: int, head_dim: int, **flags):
    """Their base_train.py build_model_meta(depth) (vocab 32768, sequence 2048), on the meta device."""
    sys.path.insert(0, SRC)
    from nanochat.gpt import GPT as AuthorsGPT, GPTConfig  # noqa: N811

    model_dim = ((depth * aspect_ratio + head_dim - 1) // head_dim) * head_dim
    heads = model_dim // head_dim
    cfg = GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=depth, n_head=heads, n_kv_head=heads, n_embd=model_dim, **flags)
    with torch.device("meta"):
        return AuthorsGPT(cfg), cfg


@pytest.mark.parametrize(
    "depth, aspect_ratio, head_dim, case",
    [
        (32, 20, 128, "plain"),  # paper 0.5B: 32 x 640, 5 heads
        (32, 64, 128, "nanochat-SSSL"),  # paper 3B: 32 x 2048, 16 heads
        (20, 64, 128, "mhc"),
        (12, 64, 128, "nanochat-SSSL"),
        (8, 64, 64, "plain"),
        (13, 64, 128, "nanochat-SSSL"),  # 13 x 64 rounds up to 896: the aspect ratio must be given
    ],
)
def test_weight_decay_transfer_equals_the_authors(depth, aspect_ratio, head_dim, case):
    """nanochat_weight_decay against their weight_decay_scaled = wd * sqrt(B / B_REF) * (D_REF / target_tokens),
    D = int(12 x (transformer matrices + lm_head)) of their model, D_REF the same of their build_model_meta(12)."""
    from snlp_lightning.config import ModelConfig
    from snlp_lightning.optim import nanochat_weight_decay

    def scaling_params(m):
        counts = m.num_scaling_params()
        return counts["transformer_matrices"] + counts["lm_head"]

    flags = dict(CASES[case], num_mtp_steps=1) if case == "nanochat-SSSL" else CASES[case]
    model, cfg = _their_meta_model(depth, aspect_ratio, head_dim, **flags)
    reference, _ = _their_meta_model(12, aspect_ratio, head_dim, **flags)
    for tokens in (2**17, 2**19, 3 * 2**18):
        theirs = 0.28 * math.sqrt(tokens / 2**19) * (12.0 * scaling_params(reference) / int(12.0 * scaling_params(model)))
        ours = nanochat_weight_decay(ModelConfig.from_nanochat(dataclasses.asdict(cfg)), 0.28, tokens, aspect_ratio=aspect_ratio)
        assert math.isclose(ours, theirs, rel_tol=1e-12), (tokens, ours, theirs)
