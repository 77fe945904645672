"""The optimizers and schedules of optim.py against hand computations from the authors' formulas
(their fork's nanochat/optim.py and scripts/base_train.py), resume, and the unchanged quickstart path."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, tiny_model, tokens
from snlp_lightning import make_config
from snlp_lightning.config import ConfigError
from snlp_lightning.module import SNLPModule
from snlp_lightning.optim import (
    MuonAdamW, NanochatMuonAdamW, OptimConfig, StepSchedule, build_optimizer, cautious_update, lr_multiplier, muon_momentum_at,
    nanochat_weight_decay, normuon_scale, param_groups, polar_express, reference_config, scaling_params, weight_decay_at,
)

# Polar Express (arXiv:2505.16932), 5 iterations, safety factor 2e-2, cushion 2: written out here
# independently of optim.py.
PUBLISHED = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def polar_by_svd(g: torch.Tensor) -> torch.Tensor:
    """The iteration acts on each singular value alone: s <- a s + b s^3 + c s^5 after s /= (|G|_F * 1.01 + 1e-6)."""
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    s = s / (torch.linalg.matrix_norm(g).unsqueeze(-1) * 1.01 + 1e-6)
    for a, b, c in PUBLISHED:
        s = a * s + b * s**3 + c * s**5
    return u @ torch.diag_embed(s) @ vh


def normuon_by_hand(g: torch.Tensor, moment: torch.Tensor, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One matrix g (rows, cols): the per-row (rows >= cols) or per-column mean square, its EMA, the
    division by its root, and the rescale to g's Frobenius norm."""
    dim = 1 if g.shape[0] >= g.shape[1] else 0
    moment = beta2 * moment + (1 - beta2) * (g**2).mean(dim=dim, keepdim=True)
    scaled = g / moment.sqrt()
    return scaled * (torch.linalg.matrix_norm(g) / torch.linalg.matrix_norm(scaled)), moment


# -- the Muon pieces ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 12, 5), (2, 5, 12), (7, 7)])
def test_polar_express_is_the_published_iteration_and_orthogonalizes(shape):
    g = rand(*shape)
    out = polar_express(g)
    assert out.shape == g.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, polar_by_svd(g), rtol=0, atol=1e-10)
    s = torch.linalg.svdvals(out)
    assert 0.7 < s.min() and s.max() < 1.3, s
    low = polar_express(g, dtype=torch.bfloat16)  # the authors' CUDA dtype
    assert low.dtype == torch.bfloat16
    s_low = torch.linalg.svdvals(low.double())
    assert 0.7 < s_low.min() and s_low.max() < 1.3, s_low
    # bfloat16 rounding, amplified by the first coefficient (8.16), moves the result by ~8% (Frobenius).
    assert torch.linalg.vector_norm(low.double() - out) < 0.15 * torch.linalg.vector_norm(out)


@pytest.mark.parametrize("shape", [(6, 3), (3, 6)])
def test_normuon_scale_matches_the_hand_computation(shape):
    g = rand(2, *shape, seed=1)
    moment_shape = (2, shape[0], 1) if shape[0] >= shape[1] else (2, 1, shape[1])
    moment = rand(*moment_shape, seed=2).abs() + 0.1
    new_moment = moment.clone()
    out = normuon_scale(g, new_moment, 0.9)
    for k in range(2):
        want, want_moment = normuon_by_hand(g[k], moment[k], 0.9)
        torch.testing.assert_close(out[k], want, rtol=1e-12, atol=0)
        torch.testing.assert_close(new_moment[k], want_moment, rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.linalg.matrix_norm(out[k]), torch.linalg.matrix_norm(g[k]))  # norm-preserving


def test_cautious_weight_decay_decays_only_where_the_update_agrees_with_the_weight():
    params = torch.tensor([[[1.0, -2.0, 3.0], [-4.0, 5.0, 0.0]]], dtype=torch.float64)
    update = torch.tensor([[[0.5, 0.5, -1.0], [-1.0, 0.0, 2.0]]], dtype=torch.float64)
    # update * param: 0.5 (>= 0: decay), -1 (no), -3 (no), 4 (decay), 0 (decay), 0 (decay)
    lr, wd = 0.1, 0.5
    want = torch.tensor([[[1.0 - 0.05 - 0.05, -2.0 - 0.05, 3.0 + 0.1],
                          [-4.0 + 0.1 + 0.2, 5.0 - 0.25, 0.0 - 0.2]]], dtype=torch.float64)
    cautious_update(params, update, lr, wd)
    torch.testing.assert_close(params, want, rtol=0, atol=1e-15)


# -- one optimizer, hand-stepped ------------------------------------------------------------------
def test_two_nanochat_steps_match_the_hand_computation():
    model = tiny_model("plain")  # float64; n_embd 48: AdamW LRs x (48 / 768)^-0.5 = 4
    cfg = OptimConfig(optimizer="nanochat", weight_decay=0.2, muon_momentum=0.95)
    opt, sched = build_optimizer(model, cfg, total_steps=100)
    assert isinstance(opt, NanochatMuonAdamW)
    muon_p = model.transformer.h[1].mlp.c_fc.weight  # (192, 48): tall, LR x sqrt(4) = 2
    adam_p = model.lm_head.weight
    p_m, p_a = muon_p.detach().clone(), adam_p.detach().clone()
    buf, moment = torch.zeros_like(p_m), torch.zeros(192, 1, dtype=torch.float64)
    exp_avg, exp_avg_sq = torch.zeros_like(p_a), torch.zeros_like(p_a)
    mu, lr_m, wd_m = 0.95, 0.02 * 2, 0.2
    lr_a, b1, b2, eps, wd_a = 0.004 * 4, 0.8, 0.96, 1e-10, 0.01
    for step in (1, 2):
        for i, p in enumerate(model.parameters()):
            p.grad = rand(*p.shape, seed=100 * step + i) if p.requires_grad else None
        g_m, g_a = muon_p.grad.clone(), adam_p.grad.clone()
        opt.step()
        sched.step()
        # Muon: Nesterov (lerp form), Polar Express, NorMuon, cautious decay.
        buf = mu * buf + (1 - mu) * g_m
        direction = (1 - mu) * g_m + mu * buf
        update, moment = normuon_by_hand(polar_by_svd(direction), moment, 0.9)
        p_m = p_m - lr_m * update - lr_m * wd_m * p_m * ((update * p_m) >= 0)
        # AdamW: decay first, moments, bias corrections.
        p_a = p_a * (1 - lr_a * wd_a)
        exp_avg = b1 * exp_avg + (1 - b1) * g_a
        exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * g_a**2
        p_a = p_a - lr_a / (1 - b1**step) * exp_avg / ((exp_avg_sq / (1 - b2**step)).sqrt() + eps)
        torch.testing.assert_close(muon_p.detach(), p_m, rtol=0, atol=1e-12)
        torch.testing.assert_close(adam_p.detach(), p_a, rtol=0, atol=1e-14)
    state = opt.state[muon_p]
    assert state["momentum_buffer"].shape == (192, 48) and state["second_momentum_buffer"].shape == (192, 1)
    torch.testing.assert_close(state["second_momentum_buffer"], moment, rtol=1e-12, atol=0)


# -- schedules ------------------------------------------------------------------------------------
AUTHORS = OptimConfig(warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05, muon_momentum_schedule=True,
                      weight_decay_schedule="cosine")


def test_schedules_at_chosen_steps():
    total = 2000  # warmdown round(0.65 * 2000) = 1300 steps, from step 700
    lr = {0: 1 / 40, 39: 1.0, 200: 1.0, 700: 1.0, 701: 1299 / 1300 + 0.05 / 1300, 1350: 0.5 + 0.5 * 0.05,
          1999: 1 / 1300 + 0.05 * 1299 / 1300, 2000: 0.05}
    momentum = {0: 0.85, 200: 0.91, 400: 0.97, 700: 0.97, 1350: 0.935, 2000: 0.90, 2500: 0.90}
    wd = {0: 0.28, 500: 0.14 * (1 + 0.5**0.5), 1000: 0.14, 2000: 0.0, 2500: 0.0}
    for step, want in lr.items():
        assert lr_multiplier(step, total, AUTHORS) == pytest.approx(want, abs=1e-12), step
    for step, want in momentum.items():
        assert muon_momentum_at(step, total, AUTHORS) == pytest.approx(want, abs=1e-12), step
    for step, want in wd.items():
        assert weight_decay_at(step, total, AUTHORS, 0.28) == pytest.approx(want, abs=1e-12), step
    # A run shorter than the momentum warmup: the warmup wins (as in the authors' code).
    assert muon_momentum_at(300, 500, AUTHORS) == pytest.approx(0.85 + 0.12 * 0.75)
    # Off (the defaults): constants.
    assert muon_momentum_at(300, 500, OptimConfig()) == 0.95 and weight_decay_at(300, 500, OptimConfig(), 0.1) == 0.1


def test_the_scheduler_sets_lr_momentum_and_weight_decay_every_step():
    model = tiny_model("plain", n_layer=2)
    cfg = OptimConfig(optimizer="nanochat", weight_decay=0.3, warmup_steps=2, warmdown_ratio=0.5, final_lr_frac=0.1,
                      muon_momentum_schedule=True, muon_momentum_warmup_steps=4, weight_decay_schedule="cosine")
    opt, sched = build_optimizer(model, cfg, total_steps=10)
    for step in range(11):
        if step:
            opt.step()
            sched.step()
        for group in opt.param_groups:
            assert group["lr"] == group["initial_lr"] * lr_multiplier(step, 10, cfg)
            if group["kind"] == "muon":
                assert group["momentum"] == muon_momentum_at(step, 10, cfg)
                assert group["weight_decay"] == weight_decay_at(step, 10, cfg, 0.3)
            else:
                assert group["weight_decay"] in (0.01, 0.001, 0.05, 0.0)  # the AdamW groups' fixed values


def test_resume_from_state_dicts_is_bitwise_an_uninterrupted_run():
    cfg = OptimConfig(optimizer="nanochat", weight_decay=0.2, warmup_steps=2, warmdown_ratio=0.5, final_lr_frac=0.05,
                      muon_momentum_schedule=True, muon_momentum_warmup_steps=3, weight_decay_schedule="cosine",
                      schedule_steps=8)
    x = tokens(batch=2, length=9)

    def train(model, opt, sched, steps):
        for _ in range(steps):
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    def snapshot(model, opt):
        groups = [(g["lr"], g.get("momentum"), g["weight_decay"]) for g in opt.param_groups]
        return [p.detach().clone() for p in model.parameters()], groups

    model = tiny_model("nanochat", n_layer=2, dtype=torch.float32)
    opt, sched = build_optimizer(model, cfg, cfg.schedule_steps)
    train(model, opt, sched, 6)
    want = snapshot(model, opt)

    first = tiny_model("nanochat", n_layer=2, dtype=torch.float32)
    opt, sched = build_optimizer(first, cfg, cfg.schedule_steps)
    train(first, opt, sched, 3)  # leg 1 (max_steps 3 of 8)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as Lightning's checkpoint loads it

    second = tiny_model("nanochat", n_layer=2, seed=1, dtype=torch.float32)  # other weights, replaced below
    second.load_state_dict(saved["model"])
    opt, sched = build_optimizer(second, cfg, cfg.schedule_steps)  # as configure_optimizers builds it
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    train(second, opt, sched, 3)
    got = snapshot(second, opt)
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
    assert got[1] == want[1]


# -- batch-size and weight-decay transfer ---------------------------------------------------------
def test_batch_lr_scaling_multiplies_the_authors_groups_only():
    B_REF = 2**19
    for preset in ("nanochat", "mhc"):
        model = tiny_model(preset)
        base = {id(g["params"][0]): g["lr"] for g in build_optimizer(model, OptimConfig(optimizer="nanochat"), 10)[0].param_groups}
        cfg = OptimConfig(optimizer="nanochat", lr_batch_reference=B_REF)
        opt, _ = build_optimizer(model, cfg, 10, tokens_per_step=4 * B_REF)  # sqrt(4) = 2
        want = {  # d = 48: (48 / 768)^-0.5 = 4
            id(model.lm_head.weight): 0.004 * 2 * 4, id(model.transformer.wte.weight): 0.2 * 2 * 4,
            id(model.smear_gate.weight): 0.2, id(model.transformer.h[0].attn.c_q.weight): 0.02 * 2,
        }
        if preset == "nanochat":
            want.update({id(model.value_embeds["5"].weight): 0.2 * 2 * 4 * 0.5, id(model.resid_lambdas): 0.5 * 2 * 0.01,
                         id(model.x0_lambdas): 0.5 * 2})
        else:
            want[id(model.transformer.h[0].hc_attn.H_res_logits)] = 0.01
        groups = {id(p): g for g in opt.param_groups for p in g["params"]}
        for key, lr in want.items():
            assert groups[key]["lr"] == pytest.approx(lr, rel=1e-15)
            assert groups[key]["initial_lr"] == groups[key]["lr"]  # the schedule scales the scaled rate
        assert set(base) <= set(groups)
    with pytest.raises(ConfigError, match=r"^optim\.lr_batch_reference=524288 needs the tokens per optimizer step"):
        build_optimizer(tiny_model("plain"), OptimConfig(optimizer="nanochat", lr_batch_reference=B_REF), 10)


def test_weight_decay_scaling_by_hand():
    # plain, 6 layers, d 48, head_dim 12, 2 kv heads, vocab 96 -> 128 padded. Per block:
    # q 48*48 + k 48*24 + v 48*24 + proj 48*48 + fc 48*192 + proj 192*48 = 25344; lm_head 128*48.
    config = make_config("plain", **TINY)
    assert scaling_params(config) == 6 * 25344 + 6144 == 158208
    # Reference: depth 12, aspect 48 / 6 = 8 -> width 96 (a multiple of 12), 8 heads, 8 kv heads:
    # per block 4 * 96*96 + 2 * 96*384 = 110592; lm_head 128*96.
    ref = reference_config(config)
    assert (ref.n_layer, ref.n_embd, ref.n_head, ref.n_kv_head) == (12, 96, 8, 8)
    assert scaling_params(ref) == 12 * 110592 + 12288 == 1339392
    want = 0.28 * math.sqrt(2**17 / 2**19) * (12 * 1339392) / int(12 * 158208)
    assert nanochat_weight_decay(config, 0.28, 2**17) == pytest.approx(want, rel=1e-15)
    cfg = OptimConfig(optimizer="nanochat", weight_decay=0.28, lr_batch_reference=2**19, scale_weight_decay=True)
    opt, _ = build_optimizer(tiny_model("plain"), cfg, 10, tokens_per_step=2**17)
    muon = [g["weight_decay"] for g in opt.param_groups if g["kind"] == "muon"]
    assert len(muon) == 4 and all(wd == pytest.approx(want, rel=1e-15) for wd in muon)  # 4 matrix shapes
    # Width rounded up to a multiple of head_dim: 12 * 40 / 5 = 96 -> 100 (head_dim 10).
    odd = reference_config(make_config("plain", n_layer=5, n_embd=40, n_head=4, n_kv_head=4, vocab_size=96, sequence_len=16))
    assert (odd.n_embd, odd.n_head, odd.n_kv_head) == (100, 10, 10)
    # The paper's 0.5b (d32, width 640, head_dim 128): its d12 reference is 240 -> 256 wide, 2 heads.
    paper = reference_config(make_config("nanochat", size="0.5b"))
    assert (paper.n_layer, paper.n_embd, paper.n_head) == (12, 256, 2)
    # A 12-layer model is its own reference: only the batch factor remains.
    d12 = make_config("plain", n_layer=12, n_embd=96, n_head=8, n_kv_head=8, vocab_size=96, sequence_len=16)
    assert nanochat_weight_decay(d12, 0.28, 2**21) == pytest.approx(0.28 * 2, rel=1e-12)


def test_configure_optimizers_computes_tokens_per_step():
    m = SNLPModule(config=make_config("plain", **TINY), optim=OptimConfig(optimizer="nanochat", lr_batch_reference=96))
    m._trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=4, seq_len=16), world_size=2,
                                 accumulate_grad_batches=3, estimated_stepping_batches=50)
    opt = m.configure_optimizers()["optimizer"]  # 2 ranks x 4 x 3 accumulated x 16 = 384 tokens: LR x 2
    assert {g["lr"] for g in opt.param_groups if g["kind"] == "muon"} == {0.02 * 2}
    m._trainer.datamodule = None
    with pytest.raises(ConfigError, match="needs the tokens per optimizer step"):
        m.configure_optimizers()


# -- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("optimizer", "sgd", r"^optimizer='sgd' is not allowed: one of 'muon_adamw', 'adamw', 'nanochat'$"),
    ("lr_batch_reference", -1, r"^lr_batch_reference=-1 is not allowed: 0 \(off\) or the reference batch"),
    ("lr_batch_reference", 2.5, r"^lr_batch_reference=2\.5 is not allowed"),
    ("scale_weight_decay", True, r"^scale_weight_decay=True needs lr_batch_reference > 0"),
    ("target_param_data_ratio", 0, r"^target_param_data_ratio=0 is not allowed: must be a finite number > 0"),
    ("muon_momentum_peak", 1.0, r"^muon_momentum_peak=1\.0 is not allowed: must lie in \[0, 1\)$"),
    ("muon_beta2", -0.1, r"^muon_beta2=-0\.1 is not allowed"),
    ("muon_momentum_warmup_steps", -5, r"^muon_momentum_warmup_steps=-5 is not allowed: must be an integer >= 0$"),
    ("muon_momentum_schedule", "yes", r"^muon_momentum_schedule='yes' is not allowed: must be true or false$"),
    ("weight_decay_schedule", "linear", r"^weight_decay_schedule='linear' is not allowed: one of 'constant', 'cosine'$"),
    ("polar_dtype", "float16", r"^polar_dtype='float16' is not allowed: one of 'auto', 'float32', 'bfloat16'$"),
])
def test_bad_fields_are_one_line_errors(field, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        OptimConfig(**{field: value}).validate()
    assert "\n" not in str(err.value)


# -- the quickstart's optimizer is unchanged ------------------------------------------------------
def test_muon_adamw_matrices_step_exactly_as_torch_muon():
    model = tiny_model("plain", n_layer=2, dtype=torch.float32)
    cfg = OptimConfig(weight_decay=0.1)
    opt, sched = build_optimizer(model, cfg, 10)
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    clones = [[p.detach().clone().requires_grad_() for p in g["params"]] for g in muon]
    ref = torch.optim.Muon([dict(params=c, lr=g["lr"]) for c, g in zip(clones, muon)], weight_decay=0.1, momentum=0.95,
                           nesterov=True, eps=1e-7, ns_steps=5, adjust_lr_fn=None)
    for step in range(3):
        for group, cl in zip(muon, clones):
            for p, c in zip(group["params"], cl):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 1000 + len(c.shape) + p.numel()))
                c.grad = p.grad.clone()
        opt.step()
        ref.step()
        sched.step()
        for group, cl in zip(muon, clones):
            assert all(torch.equal(p, c) for p, c in zip(group["params"], cl))


def test_default_schedule_is_lambdalr_and_keeps_momentum_and_weight_decay():
    model = tiny_model("plain", n_layer=2)
    cfg = OptimConfig(warmup_steps=3, final_lr_frac=0.1, weight_decay=0.05)
    opt, sched = build_optimizer(model, cfg, 10)
    twin = MuonAdamW(param_groups(tiny_model("plain", n_layer=2), cfg))
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(twin, lambda s: lr_multiplier(s, 10, cfg))
    assert isinstance(sched, StepSchedule) and sched.state_dict().keys() == lambda_lr.state_dict().keys()
    for _ in range(10):
        opt.step(), twin.step(), sched.step(), lambda_lr.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in twin.param_groups]
        assert {(g["momentum"], g["weight_decay"]) for g in opt.param_groups if g["kind"] == "muon"} == {(0.95, 0.05)}
