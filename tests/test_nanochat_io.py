"""nanochat checkpoint import / export: round trips to identical logits, clear errors otherwise."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model, tokens
from snlp_lightning import CheckpointError, ConfigError, export_nanochat, load_nanochat
from snlp_lightning.models.nanochat_io import save_nanochat

NANOCHAT_FIELDS = {
    "sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern",
    "no_x0_resid", "no_ve", "use_mhc", "mhc_num_streams", "mhc_sinkhorn_iters", "mhc_sinkhorn_tau",
}


def test_round_trip_gives_identical_logits(preset):
    model = tiny_model(preset)
    state, config = export_nanochat(model)
    assert NANOCHAT_FIELDS <= set(config)
    loaded = load_nanochat(state, config).double()
    idx = tokens()
    assert torch.equal(loaded(idx), model(idx))


def test_state_dict_uses_nanochat_keys():
    state, _ = export_nanochat(tiny_model("mhc"))
    for key in (
        "transformer.wte.weight", "transformer.h.0.attn.c_q.weight", "transformer.h.5.attn.ve_gate.weight",
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.3.hc_attn.H_res_logits", "transformer.h.3.hc_mlp.H_post_logits",
        "lm_head.weight", "resid_lambdas", "x0_lambdas", "value_embeds.5.weight", "smear_gate.weight",
        "smear_lambda", "backout_lambda",
    ):
        assert key in state, key
    assert "transformer.h.4.attn.ve_gate.weight" not in state  # only layers with value embeddings


def test_compiled_prefix_mtp_heads_and_unpadded_vocab_are_accepted():
    model = tiny_model("nanochat")
    state, config = export_nanochat(model)
    state = {f"_orig_mod.{k}": v for k, v in state.items()}
    mtp = torch.randn(48, 48, generator=torch.Generator().manual_seed(3))
    state["_orig_mod.mtp_projs.0.weight"] = mtp
    for key in ("_orig_mod.transformer.wte.weight", "_orig_mod.lm_head.weight", "_orig_mod.value_embeds.5.weight"):
        state[key] = state[key][: config["vocab_size"]].to(torch.bfloat16)  # unpadded rows, bf16 as nanochat saves
    config = {**config, "num_mtp_steps": 1, "mtp_loss_weight": 0.3}
    loaded = load_nanochat(state, config)
    assert loaded.transformer.wte.weight.shape[0] == 128 and loaded.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(loaded.mtp_projs[0].weight, mtp)  # the MTP head comes in, and goes out again
    assert torch.equal(export_nanochat(loaded)[0]["mtp_projs.0.weight"], mtp)
    assert export_nanochat(loaded)[1]["num_mtp_steps"] == 1
    idx = tokens()
    assert (loaded.double()(idx) - model(idx)).abs().max() < 0.1  # bf16 storage rounds the tables


def test_checkpoint_files_round_trip(tmp_path):
    model = tiny_model("mhc-dynamic", dtype=torch.float32)
    path = save_nanochat(model, tmp_path, step=7)
    assert path.name == "model_000007.pt" and (tmp_path / "meta_000007.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    idx = tokens()
    assert torch.equal(load_nanochat(tmp_path)(idx), model(idx))


def test_missing_and_unknown_keys_are_listed():
    state, config = export_nanochat(tiny_model("plain"))
    del state["transformer.h.2.mlp.c_fc.weight"]
    state["transformer.h.9.attn.c_q.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys: transformer\.h\.2\.mlp\.c_fc\.weight; unknown keys: transformer\.h\.9\.attn\.c_q\.weight"):
        load_nanochat(state, config)


def test_mismatched_config_is_a_clear_error():
    state, config = export_nanochat(tiny_model("plain"))
    with pytest.raises(CheckpointError, match=r"'transformer\.wte\.weight' has shape \(128, 48\), the config needs \(128, 64\)"):
        load_nanochat(state, {**config, "n_embd": 64})
    with pytest.raises(ConfigError, match=r"unknown model config field\(s\) \['depth'\]"):
        load_nanochat(state, {**config, "depth": 6})


def test_corrupt_or_incomplete_checkpoint_files(tmp_path):
    path = save_nanochat(tiny_model("plain", dtype=torch.float32), tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is corrupt or not a torch file"):
        load_nanochat(path)
    (tmp_path / "meta_000000.json").unlink()
    with pytest.raises(CheckpointError, match="has no meta_000000.json beside it"):
        load_nanochat(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model_\\*.pt checkpoint in"):
        load_nanochat(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_nanochat(tmp_path / "model_999999.pt")


def test_meta_without_model_config(tmp_path):
    path = save_nanochat(tiny_model("plain", dtype=torch.float32), tmp_path)
    (tmp_path / "meta_000000.json").write_text(json.dumps({"step": 0}))
    with pytest.raises(CheckpointError, match="not a nanochat meta file with a 'model_config' entry"):
        load_nanochat(path)
