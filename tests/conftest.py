"""Tiny real models of every family, with every parameter moved off its (often trivial) init."""

from __future__ import annotations

import pytest
import torch

from snlp_lightning import GPT, build_model

# Tiny models are bound by per-op overhead: one intra-op thread is as fast as two on an idle
# machine and several times faster on a busy one (idle OpenMP workers spin and steal the cores).
torch.set_num_threads(1)

PRESETS = ("plain", "nanochat", "mhc", "mhc-dynamic")
TINY = dict(n_layer=6, n_embd=48, n_head=4, n_kv_head=2, vocab_size=96, sequence_len=16, short_window=4)


@torch.no_grad()
def randomize(model: GPT, seed: int = 0, scale: float = 0.5) -> GPT:
    """Give every parameter a random value of a sensible size.

    nanochat's init zeroes the output projections (every block starts as the identity), which
    would make every solver trivially exact; tests need blocks that really change their input.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        if name.endswith(("H_res_logits", "b_res")):
            p.copy_(noise * 0.03)  # / tau = 0.05 -> O(1) logits: a strongly mixing H_res
        elif name.endswith(("H_pre_logits", "H_post_logits", "b_pre", "b_post")):
            p.copy_(noise)
        elif name.endswith("alpha"):
            p.copy_(0.05 + 0.01 * noise)  # dynamic part / tau = O(1)
        elif name.endswith(("resid_lambdas",)):
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith(("x0_lambdas", "smear_lambda", "backout_lambda")):
            p.copy_(0.3 * noise)
        elif p.dim() >= 2 and "wte" not in name:
            p.copy_(noise * scale * p.size(-1) ** -0.5)
    return model


def tiny_model(preset: str, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = build_model(preset, **{**TINY, **overrides})
    return randomize(model, seed).to(dtype)


def tokens(batch: int = 2, length: int = 12, vocab: int = TINY["vocab_size"], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=PRESETS)
def preset(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def bundled_data(tmp_path_factory):
    """The bundled corpus prepared once per session (vocab 512 keeps the tokenizer quick)."""
    from data_prep import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("bundled") / "data"
    prepare(PrepareOptions(out=str(out), bundled=True, vocab_size=512, progress=False))
    return out


@pytest.fixture(scope="session")
def trained_checkpoint(bundled_data, tmp_path_factory):
    """A tiny IDN-regularized model (L = 4, d = 64) trained 150 steps on the bundled corpus by the
    real CLI; returns its last.ckpt (its config points at the data's tokenizer.json)."""
    from cli_helpers import fit_args, snlp

    where = tmp_path_factory.mktemp("trained")
    snlp(*fit_args(bundled_data, "trained", "--trainer.max_steps", "150", "--trainer.limit_val_batches", "0",
                   "--checkpoint.every_n_train_steps", "150"), cwd=where)
    return where / "runs" / "trained" / "checkpoints" / "last.ckpt"
