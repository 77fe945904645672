"""Llama, Qwen2 and Gemma 3 against transformers (random models from small configs).

Every norm gain and bias is perturbed so that a mapping error shows. Two references:
- transformers itself, in float64. Its RMSNorm casts to float32 whatever the model's dtype, so its
  float64 logits are float32-accurate: the comparison is to 2e-6.
- ``reference_logits`` below: the same architectures written directly from transformers' weights
  in float64 (no library code; RoPE tables from transformers' own rotary module, which computes
  them in float32 for every dtype, as ours does). Ours equals it to 1e-10.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers is the reference of these tests (pip install -e .[test])")

from snlp_lightning import ModelConfig, snlp_forward  # noqa: E402
from snlp_lightning.config import ConfigError  # noqa: E402
from snlp_lightning.errors import CheckpointError  # noqa: E402
from snlp_lightning.models.hf_io import load_hf, save_hf  # noqa: E402

VOCAB = 97
CONFIGS = {
    # Explicit head_dim (24 != 64 / 4), GQA, biases everywhere, llama3 RoPE scaling.
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, attention_bias=True, mlp_bias=True,
                  max_position_embeddings=64, rope_theta=500.0, tie_word_embeddings=False,
                  rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=16)),
    # q/k/v biases, tied embeddings, sliding window 5 on layers 2 and 3.
    "qwen2": dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
                  max_window_layers=2, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=1000.0),
    # Four norms, q/k norms, one kv head, query_pre_attn_scalar != head_dim, windows of 8 on two of
    # every three layers with their own RoPE base, linear scaling on the global layers, a softcap.
    "gemma3": dict(model_type="gemma3_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=8, sliding_window_pattern=3,
                   query_pre_attn_scalar=20, max_position_embeddings=64, rope_theta=1000.0, rope_local_base_freq=100.0,
                   rope_scaling=dict(rope_type="linear", factor=2.0), final_logit_softcapping=30.0),
}
FAMILIES = tuple(CONFIGS)
T = 24  # three windows of Qwen2's, beyond Gemma's twice


def hf_model(family: str, seed: int = 0):
    """A transformers model of CONFIGS[family], float64, every parameter perturbed."""
    kw = dict(CONFIGS[family])
    config = transformers.AutoConfig.for_model(kw.pop("model_type"), **kw)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.02))  # gains and biases visibly off their init
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(family, transformers model, its folder, our model loaded from that folder), float64."""
    hf = hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder, load_hf(folder, dtype=torch.float64).eval()


def tokens(batch: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- the independent reference ---------------------------------------------------------------------
def _norm(x, w, eps, gemma):
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * (1 + w) if gemma else x * w


def _rope(x, cos, sin):  # x: (B, H, T, hd); cos, sin: (B, T, hd) as transformers' rotary module returns them
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def reference_branches(hf, layer: int, x, tables):
    """(attention branch, MLP-branch function) of one transformers layer, written out in float64.

    ``x``: (B, T, D) the layer input. Returns the attention branch output (after Gemma's post norm)
    and a function computing the MLP branch of a given input."""
    cfg = hf.config
    gemma = cfg.model_type == "gemma3_text"
    p = {n: t for n, t in hf.model.layers[layer].state_dict().items()}
    eps = cfg.rms_norm_eps
    lin = lambda x, name: F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))  # noqa: E731
    b, t, _ = x.shape
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    xn = _norm(x, p["input_layernorm.weight"], eps, gemma)
    q = lin(xn, "self_attn.q_proj").view(b, t, nh, hd).transpose(1, 2)
    k = lin(xn, "self_attn.k_proj").view(b, t, nkv, hd).transpose(1, 2)
    v = lin(xn, "self_attn.v_proj").view(b, t, nkv, hd).transpose(1, 2)
    if gemma:
        q, k = _norm(q, p["self_attn.q_norm.weight"], eps, True), _norm(k, p["self_attn.k_norm.weight"], eps, True)
    kind = cfg.layer_types[layer] if getattr(cfg, "layer_types", None) else "full_attention"
    cos, sin = tables[kind]
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
    scale = cfg.query_pre_attn_scalar**-0.5 if gemma else hd**-0.5
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = j <= i
    if kind == "sliding_attention":
        allowed &= i - j < cfg.sliding_window
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)
    attn = lin((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, nh * hd), "self_attn.o_proj")
    if gemma:
        attn = _norm(attn, p["post_attention_layernorm.weight"], eps, True)

    def mlp(y):
        yn = _norm(y, p["pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight"], eps, gemma)
        act = F.gelu(lin(yn, "mlp.gate_proj"), approximate="tanh") if gemma else F.silu(lin(yn, "mlp.gate_proj"))
        out = lin(act * lin(yn, "mlp.up_proj"), "mlp.down_proj")
        return _norm(out, p["post_feedforward_layernorm.weight"], eps, True) if gemma else out

    return attn, mlp


def reference_logits(hf, idx, fuse: int = 1, start: int | None = None):
    """Logits from transformers' weights in float64. ``fuse`` > 1: layers start.. in groups of
    ``fuse`` evaluated as spec section 3's fusion, M branches on one shared input."""
    cfg = hf.config
    gemma = cfg.model_type == "gemma3_text"
    x = F.embedding(idx, hf.model.embed_tokens.weight)
    if gemma:
        x = x * torch.tensor(cfg.hidden_size**0.5, dtype=torch.float32).to(x.dtype)
    positions = torch.arange(idx.size(1))[None].expand(idx.size(0), -1)
    rotary = hf.model.rotary_emb
    kinds = sorted(set(getattr(cfg, "layer_types", None) or ["full_attention"]))
    tables = {k: (rotary(x, positions, k) if gemma else rotary(x, positions)) for k in kinds}
    n = cfg.num_hidden_layers
    start = n if start is None else start
    for layer in range(start):
        attn, mlp = reference_branches(hf, layer, x, tables)
        x = x + attn
        x = x + mlp(x)
    for first in range(start, n, fuse):
        group = range(first, first + fuse)
        x = x + sum(reference_branches(hf, l, x, tables)[0] for l in group)
        x = x + sum(reference_branches(hf, l, x, tables)[1](x) for l in group)
    x = _norm(x, hf.model.norm.weight, cfg.rms_norm_eps, gemma)
    logits = F.linear(x, hf.lm_head.weight)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


# -- the model ------------------------------------------------------------------------------------
@torch.no_grad()
def test_sequential_logits_equal_transformers(pair):
    family, hf, _, ours = pair
    idx = tokens()
    logits = ours(idx)
    assert (logits - reference_logits(hf, idx)).abs().max() < 1e-10
    assert (logits - hf(idx).logits).abs().max() < 2e-6  # transformers' float32 norms
    assert ours.config.family == family


@torch.no_grad()
def test_k_equals_c_plans_equal_sequential(pair):
    _, _, _, ours = pair
    idx = tokens()
    sequential = ours(idx)
    n = ours.config.n_layer
    # Every method at K = C (fused plans converge to their chunk-sequential model: next test).
    for plan in (f"idn:n{n // 2}:K{n // 2}", f"idn:n{n}:K{n}", f"fixed:n{n // 2}:K{n // 2}", "damped:n2:K2:kappa=0.5",
                 "diagn:n2:K2:probes=2", "newton:n2:K2"):
        err = (snlp_forward(ours, idx, plan, generator=torch.Generator().manual_seed(0)) - sequential).abs().max()
        assert err < 1e-12, (plan, float(err))
    # K = 1 is not the sequential model: the test above could not pass by accident.
    assert (snlp_forward(ours, idx, f"idn:n{n // 2}:K1") - sequential).abs().max() > 1e-4


@torch.no_grad()
def test_fused_chunks_equal_branches_on_a_shared_input(pair):
    """A fused plan at K = C equals the M-branch computation from the unfused weights: every fused
    layer keeps its own norm gains (folded into its projections), nothing is averaged."""
    _, hf, _, ours = pair
    idx = tokens()
    n = ours.config.n_layer
    reference = reference_logits(hf, idx, fuse=2, start=n - 4)
    for plan in ("seq:n4:2xF2", "idn:n4:2xF2:K2"):
        assert (snlp_forward(ours, idx, plan) - reference).abs().max() < 1e-10, plan
    assert (reference - ours(idx)).abs().max() > 1e-4  # fusion changes the model


@torch.no_grad()
def test_sliding_windows_exact_far_beyond_the_window(pair):
    family, hf, _, ours = pair
    if ours.config.sliding_window is None:
        pytest.skip(f"{family} has no sliding layers")
    idx = tokens(batch=1, length=60)  # 12 windows of Qwen2's, 7.5 of Gemma's
    assert (ours(idx) - reference_logits(hf, idx)).abs().max() < 1e-10
    assert (ours(idx) - hf(idx).logits).abs().max() < 2e-6


@torch.no_grad()
def test_kv_cached_decode_equals_transformers_greedy(pair):
    from export.decoder import LayerParallelDecoder

    _, hf, _, ours = pair
    prompt = tokens(batch=1, length=7, seed=3)
    new = 12
    expected = hf.generate(prompt, max_new_tokens=new, do_sample=False, min_new_tokens=new, pad_token_id=0)[0, 7:]
    n = ours.config.n_layer
    for plan in ("seq", f"idn:n{n // 2}:K{n // 2}"):
        decoder = LayerParallelDecoder(ours, plan, batch_size=1, max_seq_len=32, dtype=torch.float64)
        positions = torch.arange(7)[None]
        logits = decoder.prefill_exact(prompt, positions, torch.zeros(1, dtype=torch.long))
        out, last, pos = [], prompt[:, -1], 7
        for _ in range(new):
            nxt = logits[:, -1].argmax(-1)
            out.append(int(nxt))
            logits = decoder.decode(nxt[:, None], torch.tensor([[pos]]), last)
            last, pos = nxt, pos + 1
        assert out == expected.tolist(), plan
    # Self-speculative decoding (a K = 1 draft, verified by the exact model) and a batch of two
    # prompts at different lengths (per-row positions) give transformers' greedy tokens too.
    from export.generate import generate_tokens, speculative_tokens

    drafter = LayerParallelDecoder(ours, f"idn:n{n // 2}:K1", batch_size=2, max_seq_len=32, dtype=torch.float64)
    short = prompt[0, 2:].tolist()
    other = hf.generate(prompt[:, 2:], max_new_tokens=new, do_sample=False, min_new_tokens=new, pad_token_id=0)[0, 5:]
    spec, _ = speculative_tokens(drafter, [prompt[0].tolist(), short], new, draft_len=3)
    assert spec == [expected.tolist(), other.tolist()]
    sequential = LayerParallelDecoder(ours, "seq", batch_size=2, max_seq_len=32, dtype=torch.float64)
    assert generate_tokens(sequential, [prompt[0].tolist(), short], new) == [expected.tolist(), other.tolist()]


# -- folders --------------------------------------------------------------------------------------
@torch.no_grad()
def test_saved_folder_reloads_in_transformers_with_the_same_logits(pair, tmp_path):
    family, hf, source, ours = pair
    idx = tokens()
    out = save_hf(ours, tmp_path / "saved", tokenizer_from=source)
    config = json.loads((out / "config.json").read_text())
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64, attn_implementation="eager").eval()
    assert type(again) is type(hf)
    assert (again(idx).logits - hf(idx).logits).abs().max() < 1e-12
    assert ("lm_head.weight" in again.state_dict()) and (config["tie_word_embeddings"] == ours.config.tie_embeddings)
    reloaded = load_hf(out, dtype=torch.float64)
    assert torch.equal(reloaded(idx), ours(idx))
    assert ModelConfig.from_hf(out) == ours.config


def test_save_refuses_a_folder_it_did_not_write(pair, tmp_path):
    _, _, _, ours = pair
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        save_hf(ours, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type='mistral' is not supported"),
    ({"model_type": "gemma3"}, "multimodal"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type='yarn' is not supported"),
    ({"num_hidden_layers": None}, "num_hidden_layers=None is not allowed"),
])
def test_config_errors_name_the_field(change, message, tmp_path):
    raw = {**CONFIGS["llama"], **change}
    if change.get("num_hidden_layers", 0) is None:
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_hf(raw)
        return
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=message):
        ModelConfig.from_hf(tmp_path)


def test_missing_and_misshapen_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = hf_model("llama")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(tmp_path)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"up_proj\.weight has shape \(3, 3\)"):
        load_hf(tmp_path)


# -- fine-tuning and back -------------------------------------------------------------------------
def test_optimizer_groups_cover_every_parameter_once():
    from snlp_lightning.optim import OptimConfig, param_groups

    for family in FAMILIES:
        ours = load_hf_model_in_memory(family)
        for optimizer in ("muon_adamw", "adamw", "nanochat"):
            groups = param_groups(ours, OptimConfig(optimizer=optimizer))
            ids = [id(p) for g in groups for p in g["params"]]
            assert sorted(ids) == sorted({id(p) for p in ours.parameters()}), (family, optimizer)  # each once (tied: once)
            assert all(p.dim() == 2 for g in groups if g["kind"] == "muon" for p in g["params"])
            vectors = [g for g in groups if any(p.dim() == 1 for p in g["params"])]
            assert all(g["kind"] == "adamw" and g["weight_decay"] == 0.0 for g in vectors)


def load_hf_model_in_memory(family: str):
    """Our model of a fresh transformers model of CONFIGS[family], through a saved folder."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        hf_model(family).save_pretrained(folder)
        return load_hf(folder)


def test_fit_from_a_hugging_face_folder_and_export_it_back(bundled_data, tmp_path):
    """snlp fit --model.init_from hf:DIR fine-tunes a Qwen2 folder with the regularizer; snlp
    export --format hf writes a folder transformers loads with our logits."""
    from cli_helpers import fit_args, snlp

    kw = {**CONFIGS["qwen2"], "vocab_size": 512}
    config = transformers.AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    source = tmp_path / "qwen2"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(source)
    (source / "tokenizer.json").write_bytes((bundled_data / "tokenizer.json").read_bytes())
    snlp(*fit_args(bundled_data, "ft", "--model.init_from", f"hf:{source}", "--trainer.max_steps", "4",
                   "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "4"), cwd=tmp_path)
    ckpt = tmp_path / "runs" / "ft" / "checkpoints" / "last.ckpt"
    out = tmp_path / "exported"
    snlp("export", "--format", "hf", "--checkpoint", str(ckpt), "--out", str(out), cwd=tmp_path)
    assert (out / "tokenizer.json").read_bytes() == (bundled_data / "tokenizer.json").read_bytes()

    from export.checkpoint import load_model

    tuned, _ = load_model(ckpt)
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    before = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    idx = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (again(idx).logits - tuned(idx)).abs().max() < 1e-4
        assert (again(idx).logits - before(idx).logits).abs().max() > 1e-3  # four steps moved the weights


def test_sharded_folder_loads_like_one_file(tmp_path):
    hf = hf_model("gemma3")
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(load_hf(tmp_path / "sharded", dtype=torch.float64)(idx), load_hf(tmp_path / "one", dtype=torch.float64)(idx))


@torch.no_grad()
def test_compiled_decode_step_equals_eager():
    """Gemma 3 (local and global RoPE, post norms, q/k norms inside one compiled region): the
    compiled decode step of a fused K = 1 plan against the eager decoder, float32."""
    from export.compiled import compile_steps
    from export.decoder import LayerParallelDecoder

    ours = load_hf_model_in_memory("gemma3").float().eval()
    prompt = tokens(batch=1, length=5, seed=4)
    outs = []
    for compiled in (False, True):
        decoder = LayerParallelDecoder(ours, "idn:n4:2xF2:K1", batch_size=1, max_seq_len=16)
        step = compile_steps(decoder)["decode"] if compiled else decoder.decode
        logits = decoder.prefill_exact(prompt, torch.arange(5)[None], torch.zeros(1, dtype=torch.long))
        row = []
        for pos in range(5, 9):
            nxt = logits[:, -1].argmax(-1)
            logits = step(nxt[:, None], torch.tensor([[pos]]), prompt[:, -1])
            row.append(logits)
        outs.append(torch.cat(row, 1))
    assert (outs[0] - outs[1]).abs().max() < 1e-5


def test_every_family_block_is_an_fsdp_unit():
    """FSDP wraps one unit per block (strategy.BLOCK_TYPES); a family whose block type is missing
    would be trained as one unit with the regularizer reading unsharded blocks that are not there."""
    from snlp_lightning.models import FAMILIES
    from snlp_lightning.strategy import BLOCK_TYPES

    configs = {"nanochat": ModelConfig.from_name("plain"), "mhc": ModelConfig.from_name("mhc"),
               **{f: ModelConfig.from_hf(raw) for f, raw in CONFIGS.items()}}
    assert set(configs) == set(FAMILIES)
    for family, config in configs.items():
        with torch.device("meta"):
            model = FAMILIES[family](config)
        assert isinstance(model.transformer.h[0], tuple(BLOCK_TYPES)), family


def _hf_tokenizer_folder(folder, eos_in: str):
    """A word-level tokenizer.json in Hugging Face's style (no <|bos|>; its template prepends <s>),
    with the EOS id </s> = 0 stated in ``eos_in``: generation_config.json or tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"</s>": 0, "<s>": 1, "<unk>": 2, "hello": 3, "world": 4, "again": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["</s>", "<s>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if eos_in == "generation_config.json":
        (folder / eos_in).write_text(json.dumps({"eos_token_id": [0, 5]}))
    else:
        (folder / eos_in).write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    return folder


@pytest.mark.parametrize("eos_in", ["generation_config.json", "tokenizer_config.json"])
def test_hugging_face_tokenizer_prompts_and_stop(tmp_path, eos_in):
    from export.text import TextCodec

    codec = TextCodec(_hf_tokenizer_folder(tmp_path, eos_in) / "tokenizer.json")
    assert codec.encode("hello world") == [1, 3, 4]  # the tokenizer's own template adds <s>
    assert codec.stop == 0 and codec.decode([1, 3, 0]) == "hello"


def test_generate_with_a_hugging_face_tokenizer_stops_at_eos(tmp_path):
    """snlp generate on an HF folder whose tokenizer has no <|bos|>: a model whose final-norm gain
    is 0 gives all-zero logits, so greedy decoding emits id 0 = </s> at once and the row ends."""
    from cli_helpers import snlp

    kw = {**CONFIGS["llama"], "vocab_size": 8}
    config = transformers.AutoConfig.for_model(kw.pop("model_type"), **kw)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        hf.model.norm.weight.zero_()
    hf.save_pretrained(tmp_path / "model")  # first: it writes a generation_config.json of its own
    folder = _hf_tokenizer_folder(tmp_path / "model", "generation_config.json")
    done = snlp("generate", "--checkpoint", f"hf:{folder}", "--prompt", "hello world", "--max-new-tokens", "6", cwd=tmp_path)
    assert "[1 tokens" in done.stderr, done.stderr
    more = snlp("generate", "--checkpoint", f"hf:{folder}", "--prompt", "hello world", "--max-new-tokens", "6", "--no-stop", cwd=tmp_path)
    assert "[6 tokens" in more.stderr, more.stderr
