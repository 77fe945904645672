"""The CUDA-path fixes of issue 14 (item 3), each checked on the CPU where it can be, and its CUDA
side on a CUDA machine (skipped here with the reason): probes drawn on the device, precision that
follows the accelerator, no copies of unused tables in the decoder, cache capacities rounded for
the attention kernels, the math-kernel fallback of attention, exactness semantics per dtype."""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import TINY, randomize, tiny_model, tokens
from export import GenerationError, LayerParallelDecoder, generate_tokens, speculative_tokens
from export import decoder as decoder_module
from export.bench import exactness_note
from export.decoder import CACHE_MULTIPLE, CUDA_CACHE_MULTIPLE, cache_capacity
from snlp_lightning import make_config
from snlp_lightning.cli import default_precision, run as cli_run
from snlp_lightning.models import attention
from snlp_lightning.models.kv_cache import mask_tables
from snlp_lightning.module import SNLPModule
from snlp_lightning.regularizer import JACOBI_SEED_OFFSET, RegularizerConfig, diag_probes, jacobi_vectors

CUDA = torch.cuda.is_available()
NO_CUDA = "needs CUDA (this machine has none): runs in the GPU check"


# -- a. DiagN probes / Jacobi vectors ----------------------------------------------------------------
def _captured_draws(device: str = "cpu", step: int = 7):
    torch.manual_seed(0)
    reg = RegularizerConfig(lambda_diag=0.5, lambda_jacobi=0.25, n_par_configs=[2, 4])
    m = SNLPModule(config=make_config("plain", **TINY), regularizer=reg, probe_seed=3).to(device)
    seen = {}

    def capture(inputs, targets, weight, probes, vectors):
        seen.update(probes=probes, vectors=vectors)
        return {}

    m._losses = capture
    x = tokens().to(device)
    m.compute_losses(x[:, :-1], x[:, 1:], torch.tensor(1.0, device=device), step=step)
    return m, x[:, :-1], seen


def test_cpu_probes_and_vectors_are_todays_cpu_draws_bitwise():
    m, inputs, seen = _captured_draws("cpu", step=7)
    shape = (*inputs.shape, m.config.n_streams, m.config.n_embd)
    seed = 3 * 1_000_003 + 7
    probes = diag_probes(shape, 2, torch.Generator().manual_seed(seed))
    vectors = jacobi_vectors(shape, m.config.n_layer, torch.Generator().manual_seed(seed + JACOBI_SEED_OFFSET))
    assert seen["probes"].device.type == "cpu" and seen["probes"].dtype == torch.float32
    assert torch.equal(seen["probes"], probes) and torch.equal(seen["vectors"], vectors)
    # device=None and device="cpu" are the same CPU draw
    again = diag_probes(shape, 2, torch.Generator().manual_seed(seed), device="cpu")
    assert torch.equal(again, probes)
    assert torch.equal(jacobi_vectors(shape, 3, torch.Generator().manual_seed(1), device="cpu"),
                       jacobi_vectors(shape, 3, torch.Generator().manual_seed(1)))


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_cuda_probes_are_drawn_on_the_device_reproducibly():
    m, inputs, seen = _captured_draws("cuda", step=5)
    assert seen["probes"].is_cuda and seen["vectors"].is_cuda and seen["probes"].dtype == torch.float32
    assert set(seen["probes"].unique().tolist()) <= {-1.0, 1.0}
    norms = seen["vectors"].norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    shape = (*inputs.shape, m.config.n_streams, m.config.n_embd)
    seed = 3 * 1_000_003 + 5
    gen = torch.Generator(device="cuda").manual_seed(seed)
    assert torch.equal(seen["probes"], diag_probes(shape, 2, gen, device="cuda"))
    _, _, again = _captured_draws("cuda", step=5)
    assert torch.equal(again["probes"], seen["probes"]) and torch.equal(again["vectors"], seen["vectors"])


# -- b. precision follows the accelerator --------------------------------------------------------------
def resolved_trainer(*args: str) -> dict:
    out = io.StringIO()
    with mock.patch.object(sys, "argv", sys.argv[:1]), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        cli_run(["fit", *args, "--print_config"])
    assert done.value.code in (None, 0), out.getvalue()[-2000:]
    return yaml.safe_load(out.getvalue())["trainer"]


def test_precision_follows_the_accelerator_even_when_cuda_exists(monkeypatch):
    assert resolved_trainer("--config", "configs/quickstart.yaml")["precision"] == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # the quickstart says accelerator: cpu -> float32 even on a machine with CUDA
    assert resolved_trainer("--config", "configs/quickstart.yaml")["precision"] == "32-true"
    assert resolved_trainer("--trainer.accelerator", "cpu")["precision"] == "32-true"
    assert resolved_trainer()["precision"] == "bf16-mixed"  # auto with CUDA
    assert resolved_trainer("--trainer.accelerator", "gpu")["precision"] == "bf16-mixed"
    # an explicit precision always wins
    assert resolved_trainer("--config", "configs/quickstart.yaml", "--trainer.precision", "bf16-mixed")["precision"] == "bf16-mixed"
    assert resolved_trainer("--trainer.accelerator", "gpu", "--trainer.precision", "64-true")["precision"] == "64-true"
    assert resolved_trainer("--config", "configs/paper-0.5b.yaml")["precision"] == "bf16-mixed"


def test_default_precision_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [default_precision(a) for a in ("cpu", "auto", None, "gpu", "cuda", "mps")] == [
        "32-true", "32-true", "32-true", "bf16-mixed", "bf16-mixed", "32-true"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [default_precision(a) for a in ("cpu", "CPU", "auto", None, "gpu", "tpu")] == [
        "32-true", "32-true", "bf16-mixed", "bf16-mixed", "bf16-mixed", "32-true"]


# -- c. no copies of unused tables -------------------------------------------------------------------
def _state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def test_no_ve_decoder_holds_no_value_embedding_nor_mtp_heads():
    model = tiny_model("plain", num_mtp_steps=2, dtype=torch.float32)
    assert model.config.no_ve and len(model.value_embeds) and len(model.mtp_projs)
    decoder = LayerParallelDecoder(model, "idn:n4:K1", batch_size=2, max_seq_len=16)
    names = [n for n, _ in [*decoder.named_parameters(), *decoder.named_buffers()]]
    assert not any("value_embeds" in n or "mtp_projs" in n for n in names), names
    # the model is left whole
    assert len(model.value_embeds) and len(model.mtp_projs) and len(model.transformer.h) == model.config.n_layer
    # what the decoder holds beyond the cache and the masks: the used parameters, once per stack
    unused = sum(p.numel() * p.element_size() for p in [*model.value_embeds.parameters(), *model.mtp_projs.parameters()])
    held = _state_bytes(decoder.shell)
    assert held <= _state_bytes(model) - unused - sum(p.numel() * p.element_size() for p in model.transformer.h.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    # the old decoder (every table copied) computes bitwise the same logits
    with mock.patch.object(decoder_module, "_unused_tables", lambda m: {}):
        full = LayerParallelDecoder(model, "idn:n4:K1", batch_size=2, max_seq_len=16)
    assert any("value_embeds" in n for n, _ in full.named_parameters())
    assert _state_bytes(full.shell) - _state_bytes(decoder.shell) == unused
    x = tokens(2, 8)
    pos = torch.arange(8).expand(2, 8).contiguous()
    prev = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(decoder.prefill(x, pos, prev), full.prefill(x, pos, prev))
        step = (x[:, :1], torch.full((2, 1), 8), x[:, -1])
        assert torch.equal(decoder.decode(*step), full.decode(*step))


def test_value_embedding_model_keeps_its_tables():
    model = tiny_model("nanochat", dtype=torch.float32)
    decoder = LayerParallelDecoder(model, "seq", batch_size=1, max_seq_len=16)
    assert len(decoder.shell.value_embeds) == len(model.value_embeds) > 0


# -- d. cache capacity rounded for the kernels -------------------------------------------------------
def test_cache_capacity_rounds_up():
    assert CACHE_MULTIPLE == 16 and CUDA_CACHE_MULTIPLE == 64
    assert [cache_capacity(n, "cpu") for n in (1, 16, 17, 43, 86, 2048)] == [16, 16, 32, 48, 96, 2048]
    assert [cache_capacity(n, torch.device("cuda")) for n in (1, 64, 86, 2048)] == [64, 64, 128, 2048]


def test_rounded_cache_gives_the_same_tokens_and_refuses_the_same_positions():
    model = tiny_model("plain", dtype=torch.float32, sequence_len=64, short_window=8)
    prompts = [[3, 5, 7, 11, 13], [17, 19, 23]]
    decoder = LayerParallelDecoder(model, "idn:n4:K1", batch_size=2, max_seq_len=43)
    assert decoder.max_seq_len == 43 and decoder.cache_len == 48
    assert decoder.k_cache.size(3) == decoder.v_cache.size(3) == 48 and decoder.cache_masks.shape[-2:] == (48, 48)
    with mock.patch.object(decoder_module, "cache_capacity", lambda n, device: n):
        exact = LayerParallelDecoder(model, "idn:n4:K1", batch_size=2, max_seq_len=43)
    assert exact.k_cache.size(3) == 43
    assert generate_tokens(decoder, prompts, 30) == generate_tokens(exact, prompts, 30)
    # positions past the requested max are refused as before (against max_seq_len, not the capacity)
    with pytest.raises(GenerationError, match="exceeds the KV cache of 43"):
        generate_tokens(decoder, prompts, 39)


def test_masks_of_a_rounded_cache_agree_on_the_usable_positions():
    small, windows = mask_tables([4, 63], 43, "cpu")
    big, big_windows = mask_tables([4, 63], 48, "cpu")
    for w in (4, 63):
        a = small[windows.index(min(w, 42))]
        b = big[big_windows.index(min(w, 47))]
        assert torch.equal(b[:43, :43], a) and not b[:43, 43:].any()


# -- e. attention fallback ---------------------------------------------------------------------------
@pytest.fixture
def clean_fallback():
    saved = set(attention._math_shapes)
    attention._math_shapes.clear()
    yield
    attention._math_shapes.clear()
    attention._math_shapes.update(saved)


def test_fallback_retries_under_the_math_kernel_once_and_remembers_the_shape(clean_fallback):
    calls = []

    def kernel():  # fails on the fused kernels, works on the math kernel (sdpa_kernel sets these flags)
        fused = torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
        calls.append(fused)
        if fused:
            raise RuntimeError("cuDNN Frontend error: no valid execution plans for this shape")
        return torch.ones(1)

    with pytest.warns(RuntimeWarning, match="math kernel"):
        assert torch.equal(attention.with_math_fallback(kernel, ("shape", 86)), torch.ones(1))
    assert calls == [True, False] and ("shape", 86) in attention._math_shapes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second call is silent and goes straight to math
        attention.with_math_fallback(kernel, ("shape", 86))
    assert calls == [True, False, False]
    assert torch.backends.cuda.flash_sdp_enabled()  # the flags are restored after each call


def test_fallback_leaves_other_errors_alone(clean_fallback):
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        attention.with_math_fallback(oom, "k1")

    def always():
        raise RuntimeError("broken everywhere")

    with pytest.raises(RuntimeError, match="broken everywhere"):
        attention.with_math_fallback(always, "k2")
    assert not attention._math_shapes

    def fine():
        return torch.zeros(1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention.with_math_fallback(fine, "k3")
    assert not attention._math_shapes


def test_cpu_attention_does_not_go_through_the_fallback(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the CUDA fallback ran on the CPU")

    monkeypatch.setattr(attention, "with_math_fallback", refuse)
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.equal(attention.fused_sdpa(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    attention.set_cpu_kernel("fast")
    try:
        assert torch.equal(attention.sdpa(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    finally:
        attention.set_cpu_kernel("math")
    # a decode step runs through KVCache.attend
    model = tiny_model("plain", dtype=torch.float32)
    decoder = LayerParallelDecoder(model, "seq", batch_size=1, max_seq_len=16)
    assert generate_tokens(decoder, [[1, 2, 3]], 4)


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_cuda_decode_attention_at_unaligned_lengths(clean_fallback):
    """The decoder's attention over a cache whose requested length is not aligned: runs (through the
    fallback if a fused kernel refuses the shape) and agrees with the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for length in (86, 100):
        q = torch.randn(1, 10, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 10, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        mask = torch.ones(1, 1, 1, length, dtype=torch.bool, device="cuda")
        got = attention.fused_sdpa(q, k, v, mask)
        with sdpa_kernel(SDPBackend.MATH):
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.allclose(got.float(), want.float(), atol=2e-2)


# -- f. exactness semantics per dtype in the benchmark ------------------------------------------------
def test_exactness_note_is_identity_in_float32_and_agreement_in_bf16():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert exactness_note(ref, ref, torch.float32) == "identical to seq greedy"
    assert exactness_note([[1, 2, 3, 4], [5, 6, 0, 8]], ref, torch.float64) == "DIFFERS from seq greedy"
    note = exactness_note([[1, 2, 3, 4], [5, 6, 0, 0]], ref, torch.bfloat16)
    assert note.startswith("bfloat16: 0.750 agreement with seq greedy, first divergence at token 2")
    assert "identical" not in note and "DIFFERS" not in note
    assert "1.000 agreement" in exactness_note(ref, ref, torch.bfloat16) and "no divergence" in exactness_note(ref, ref, torch.bfloat16)
    assert "0.875 agreement" in exactness_note([[1, 2, 3], [5, 6, 7, 8]], ref, torch.float16)  # a missing token is unequal


def test_bench_note_on_a_tiny_bf16_and_fp32_model():
    torch.manual_seed(0)
    from snlp_lightning import build_model

    base = randomize(build_model("plain", **{**TINY, "sequence_len": 32}), 0)
    prompts = [[3, 5, 7, 11], [17, 19, 23, 29]]
    for dtype in (torch.float32, torch.bfloat16):
        model = base.to(dtype)
        seq = generate_tokens(LayerParallelDecoder(model, "seq", batch_size=2, max_seq_len=24), prompts, 12)
        spec, _ = speculative_tokens(LayerParallelDecoder(model, "idn:n4:K1", batch_size=2, max_seq_len=24), prompts, 12, 2)
        note = exactness_note(spec, seq, dtype)
        if dtype == torch.float32:
            assert note == "identical to seq greedy"  # exact verification in float32
        else:
            assert note.startswith("bfloat16: ") and "agreement with seq greedy" in note
