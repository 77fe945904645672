"""configs/ and ModelConfig's classmethods.

- Every file under configs/ is a commented YAML mapping and takes part in one of the runs below.
- Every run (its files combined as configs/README.md gives them) resolves, through the real CLI's
  ``--print_config``, to exactly the values written out here: those of the complete YAML files
  the runs were before their twins and variants became overlays. Every field not written out
  keeps the CLI's default, so nothing else changed either.
- The model of each run is ``ModelConfig.from_name(run)``: the architectures are defined once.
- ``ModelConfig.from_name`` / ``from_checkpoint`` / ``from_nanochat`` on real files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from snlp_lightning import CheckpointError, ConfigError, ModelConfig, build_model, make_config
from snlp_lightning.checkpoint_io import AtomicCheckpointIO
from snlp_lightning.cli import run as cli_run
from snlp_lightning.models.nanochat_io import save_nanochat
from snlp_lightning.module import SNLPModule
from snlp_lightning.regularizer import RegularizerConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Each run: the files it combines, in order (the commands of configs/README.md).
RUNS = {
    "quickstart": ["quickstart"],
    "quickstart-baseline": ["quickstart", "quickstart-baseline"],
    "quickstart-mhc": ["quickstart", "quickstart-mhc"],
    "quickstart-mhc-baseline": ["quickstart", "quickstart-mhc", "quickstart-mhc-baseline"],
    "quickstart-llama": ["quickstart", "quickstart-llama"],
    "finetune-hf": ["quickstart", "finetune-hf"],
    "paper-0.5b": ["paper-0.5b"],
    "paper-0.5b-baseline": ["paper-0.5b", "paper-0.5b-baseline"],
    "paper-0.5b-plain": ["paper-0.5b", "paper-0.5b-plain"],
    "paper-0.5b-plain-baseline": ["paper-0.5b", "paper-0.5b-plain", "paper-0.5b-plain-baseline"],
    "paper-0.5b-mhc": ["paper-0.5b", "paper-0.5b-mhc"],
    "paper-0.5b-mhc-baseline": ["paper-0.5b", "paper-0.5b-mhc", "paper-0.5b-mhc-baseline"],
    "paper-0.5b-mtp": ["paper-0.5b", "paper-0.5b-mtp"],
    "paper-0.5b-mtp-baseline": ["paper-0.5b", "paper-0.5b-mtp", "paper-0.5b-mtp-baseline"],
    "paper-3b": ["paper-0.5b", "paper-3b"],
    "paper-3b-baseline": ["paper-0.5b", "paper-3b", "paper-3b-baseline"],
}

# -- the expected values, written out (quickstart: as at 06ea0b8; paper runs: the authors' recipe) --
QUICKSTART = {
    "seed_everything": 1234,
    "trainer": {
        "accelerator": "cpu", "devices": 1, "max_steps": 300, "gradient_clip_val": 1.0, "log_every_n_steps": 5,
        "val_check_interval": 300, "check_val_every_n_epoch": None, "limit_val_batches": 16, "num_sanity_val_steps": 0,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": "runs", "name": "quickstart"}},
    },
    "model": {
        "config": {"sequence_len": 128, "vocab_size": 4096, "n_layer": 8, "n_head": 4, "n_kv_head": 4, "n_embd": 128,
                   "window_pattern": "L", "no_x0_resid": True, "no_ve": True, "smear": True, "backout": True,
                   "use_mhc": False},
        "regularizer": {"lambda_idn": 0.5, "n_par_configs": [2, 4, 6], "stride": 2, "detach": False,
                        "warmup_fraction": 0.2},
        "eval_plans": ["idn:n2:K1", "idn:n4:K1", "idn:n4:K2", "idn:n6:K1", "idn:n6:K2", "idn:n4:2xF2:K1",
                       "idn:n4:2xF2:K2", "idn:n6:3xF2:K1", "idn:n6:3xF2:K2"],
    },
    "data": {"data_dir": "data/bundled", "seq_len": 128, "batch_size": 16, "num_workers": 0},
    "checkpoint": {"dirpath": "runs/quickstart/checkpoints", "save_last": True, "every_n_train_steps": 50},
}
PAPER_05B = {
    "seed_everything": 1234,
    "trainer": {
        "accelerator": "gpu", "devices": 8, "num_nodes": 1, "strategy": "ddp", "precision": "bf16-mixed",
        "max_steps": 4800, "gradient_clip_val": None, "log_every_n_steps": 10, "val_check_interval": 500,
        "check_val_every_n_epoch": None, "limit_val_batches": 320, "accumulate_grad_batches": 8,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": "runs", "name": "paper-0.5b"}},
    },
    "model": {
        "config": {"sequence_len": 2048, "vocab_size": 32768, "n_layer": 32, "n_head": 5, "n_kv_head": 5, "n_embd": 640,
                   "window_pattern": "SSSL", "no_x0_resid": False, "no_ve": False, "smear": True, "backout": True,
                   "use_mhc": False},
        "regularizer": {"lambda_idn": 0.0625, "n_par_configs": [8, 16, 24], "stride": 3, "detach": False,
                        "warmup_fraction": 0.2},
        "optim": {"optimizer": "nanochat", "matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008,
                  "scalar_lr": 0.5, "weight_decay": 0.28, "scale_weight_decay": True, "lr_batch_reference": 524288,
                  "warmup_steps": 40, "warmdown_ratio": 0.65, "final_lr_frac": 0.05, "muon_momentum_schedule": True,
                  "weight_decay_schedule": "cosine"},
        "eval_plans": ["idn:n8:K4", "idn:n8:K4:batch_fwd", "idn:n24:K2", "idn:n24:K4", "idn:n12:K2:batch_fwd"],
    },
    "data": {"data_dir": "data/fineweb-edu", "seq_len": 2048, "batch_size": 8, "num_workers": 4},
    "checkpoint": {"dirpath": "runs/paper-0.5b/checkpoints", "save_last": True, "every_n_train_steps": 500},
}
MHC_FIELDS = {"use_mhc": True, "mhc_variant": "static", "mhc_num_streams": 4, "mhc_sinkhorn_iters": 10,
              "mhc_sinkhorn_tau": 0.05}


def flat(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists are values)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def named(name: str) -> dict:
    return {"trainer.logger.init_args.name": name, "checkpoint.dirpath": f"runs/{name}/checkpoints"}


def baseline(name: str) -> dict:
    return {**named(f"{name}-baseline"), "model.regularizer.lambda_idn": 0.0, "model.regularizer.lambda_hcn": 0.0,
            "model.regularizer.lambda_diag": 0.0, "model.regularizer.detach": False}


def expected_runs() -> dict[str, dict]:
    quickstart, paper = flat(QUICKSTART), flat(PAPER_05B)
    mhc = {f"model.config.{k}": v for k, v in MHC_FIELDS.items()}
    runs = {
        "quickstart": quickstart,
        "quickstart-mhc": {
            **quickstart, **named("quickstart-mhc"), **mhc, "model.config.no_ve": False,
            "model.regularizer.lambda_idn": 0.0, "model.regularizer.lambda_hcn": 0.5, "model.regularizer.detach": True,
            "model.eval_plans": ["hcn:n2:K1", "hcn:n4:K1", "hcn:n4:K2", "hcn:n6:K1", "hcn:n6:K2", "hcn:n4:2xF2:K1",
                                 "hcn:n4:2xF2:K2", "hcn:n6:3xF2:K1", "hcn:n6:3xF2:K2", "idn:n4:K2"],
        },
        "quickstart-llama": {
            **quickstart, **named("quickstart-llama"), "model.config.family": "llama", "model.config.smear": False,
            "model.config.backout": False, "model.config.intermediate_size": 352, "model.config.rope_base": 10000.0,
            "model.config.tie_embeddings": True, "model.config.pad_vocab_to": 1, "model.config.logit_softcap": None,
            "model.regularizer.lambda_idn": 0.0, "model.regularizer.lambda_hcn": 0.0, "model.regularizer.lambda_diag": 0.0,
            "model.optim.embedding_lr": 0.01, "model.optim.unembedding_lr": 0.01, "model.optim.scalar_lr": 0.01,
        },
        "finetune-hf": {  # its model comes from --model.init_from
            **quickstart, **named("finetune-hf"), "trainer.max_steps": 100, "trainer.val_check_interval": 100,
            "model.regularizer.warmup_fraction": 0.0, "model.optim.optimizer": "adamw", "model.optim.matrix_lr": 0.001,
            "model.optim.embedding_lr": 0.001, "model.optim.unembedding_lr": 0.001, "model.optim.scalar_lr": 0.001,
            "model.optim.warmup_steps": 10, "model.optim.warmdown_ratio": 0.5, "model.optim.final_lr_frac": 0.1,
        },
        "paper-0.5b": paper,
        "paper-0.5b-plain": {
            **paper, **named("paper-0.5b-plain"), "model.config.no_x0_resid": True, "model.config.no_ve": True,
            "model.regularizer.lambda_idn": 0.5, "model.regularizer.stride": 6,
            "model.eval_plans": ["idn:n20:K4:batch_fwd", "idn:n8:K4", "idn:n24:12xF2:K1", "idn:n24:12xF2:K2",
                                 "idn:n12:1xF12:K1"],
        },
        "paper-0.5b-mhc": {
            **paper, **named("paper-0.5b-mhc"), **mhc, "model.config.no_x0_resid": True,
            "model.regularizer.lambda_idn": 0.0, "model.regularizer.lambda_hcn": 0.5, "model.regularizer.stride": 0,
            "model.regularizer.detach": True, "trainer.accumulate_grad_batches": 16, "trainer.limit_val_batches": 640,
            "data.batch_size": 4,
            "model.eval_plans": ["hcn:n8:K2:batch_fwd", "hcn:n8:K4", "hcn:n16:K1", "hcn:n16:K4"],
        },
        "paper-0.5b-mtp": {
            **paper, **named("paper-0.5b-mtp"), "model.config.num_mtp_steps": 1, "model.config.mtp_loss_weight": 0.3,
        },
        "paper-3b": {
            **paper, **named("paper-3b"), "trainer.max_steps": 9600, "trainer.accumulate_grad_batches": 16,
            "model.config.n_head": 16, "model.config.n_kv_head": 16, "model.config.n_embd": 2048,
            "model.regularizer.lambda_idn": 0.5, "model.regularizer.n_par_configs": [8], "model.regularizer.stride": 0,
            "model.eval_plans": ["idn:n8:K1", "idn:n8:K1:batch_fwd", "idn:n8:K4", "idn:n8:K8"],
        },
    }
    for name in list(runs):
        runs[f"{name}-baseline"] = {**runs[name], **baseline(name)}
    return runs


def resolve(*files: str) -> dict:
    """What ``snlp fit --config F1 --config F2 ... --print_config`` prints, as a dict."""
    args = ["fit"]
    for name in files:
        args += ["--config", str(CONFIGS / f"{name}.yaml")]
    out = io.StringIO()
    # sys.argv holds pytest's arguments: LightningCLI warns when it sees them beside args.
    with mock.patch.object(sys, "argv", sys.argv[:1]), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        cli_run([*args, "--print_config"])
    assert done.value.code in (None, 0), out.getvalue()[-2000:]
    return yaml.safe_load(out.getvalue())


@pytest.fixture(scope="module")
def defaults() -> dict:
    return flat(resolve())


# -- the files ------------------------------------------------------------------------------------
def test_every_config_file_is_a_commented_mapping_used_by_a_run():
    files = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert not list(CONFIGS.glob("*.yml")), "name config files *.yaml"
    assert sorted({f for combo in RUNS.values() for f in combo}) == files
    assert sorted(RUNS) == files  # one run per file: the file named after it is its last one
    for name in files:
        text = (CONFIGS / f"{name}.yaml").read_text(encoding="utf-8")
        assert isinstance(yaml.safe_load(text), dict), name
        lines = text.splitlines()
        for i, line in enumerate(lines):
            field = re.match(r"\s*([A-Za-z_]\w*):(.*)", line)
            if not field:
                continue
            comment = []  # the comment block right above the field
            for above in reversed(lines[:i]):
                if not above.lstrip().startswith("#"):
                    break
                comment.insert(0, above)
            where = f"configs/{name}.yaml line {i + 1} ({field[1]})"
            assert comment, f"{where}: no comment above the field"
            if field[2].strip():  # a value, not a section: the comment gives its type
                assert "(type: " in " ".join(comment), f"{where}: the comment gives no (type: ...)"


@pytest.mark.parametrize("run", sorted(RUNS))
def test_run_resolves_to_its_settings(run, defaults):
    resolved = flat(resolve(*RUNS[run]))
    expected = {**defaults, **expected_runs()[run]}
    assert set(resolved) == set(expected)
    wrong = {k: (resolved[k], expected[k]) for k in expected if resolved[k] != expected[k]}
    assert not wrong, f"{run}: {wrong}"
    model = {k.removeprefix("model.config."): v for k, v in resolved.items() if k.startswith("model.config.")}
    named_model = "quickstart" if run == "finetune-hf" else run.removesuffix("-baseline")  # finetune: replaced by init_from
    assert ModelConfig(**model) == ModelConfig.from_name(named_model)


# -- the authors' recipe -----------------------------------------------------------------------------
# Each paper run against the runs_snlp/train_*.sh script it reproduces (phymhan/nanochat-snlp):
# tokens per optimizer step and in all (their total_batch_size, auto-computed by base_train.py from
# the model's size, times --num-iterations), the regularizer (kind, lambda, N, stride, detach), MTP
# heads, and the Muon weight decay the run ends up with (their weight_decay_scaled, evaluated with
# their base_train.py formulas on their own GPT on the meta device; 0.28 x sqrt(B / 2^19) x D_ref / D).
RECIPE = {
    # run:                      (script,                     tokens/step, total tokens,   regularizer,                       mtp, weight decay)
    "paper-0.5b":               ("train_d32s_idn.sh",        1_048_576, 5_033_164_800, ("idn", 0.0625, [8, 16, 24], 3, False), 0, 0.039598086372440715),
    "paper-0.5b-baseline":      ("train_d32s_base.sh",       1_048_576, 5_033_164_800, None,                                   0, 0.039598086372440715),
    "paper-0.5b-plain":         ("train_d32s_nox0ve_idn.sh", 1_048_576, 5_033_164_800, ("idn", 0.5, [8, 16, 24], 6, False),   0, 0.03959797974644667),
    "paper-0.5b-plain-baseline": ("train_d32s_nox0ve_base.sh", 1_048_576, 5_033_164_800, None,                                 0, 0.03959797974644667),
    "paper-0.5b-mhc":           ("train_d32s_mhc_hcn.sh",    1_048_576, 5_033_164_800, ("hcn", 0.5, [8, 16, 24], 0, True),     0, 0.03959902467218457),
    "paper-0.5b-mhc-baseline":  ("train_d32s_mhc_base.sh",   1_048_576, 5_033_164_800, None,                                   0, 0.03959902467218457),
    "paper-0.5b-mtp":           ("train_d32s_idn_mtp.sh",    1_048_576, 5_033_164_800, ("idn", 0.0625, [8, 16, 24], 3, False), 1, 0.039652553482859294),
    "paper-0.5b-mtp-baseline":  ("train_d32s_base_mtp.sh",   1_048_576, 5_033_164_800, None,                                   1, 0.039652553482859294),
    "paper-3b":                 ("train_d32_idn.sh",         2_097_152, 20_132_659_200, ("idn", 0.5, [8], 0, False),           0, 0.03675007690415606),
    "paper-3b-baseline":        ("train_d32_base.sh",        2_097_152, 20_132_659_200, None,                                  0, 0.03675007690415606),
}


def test_the_recipe_table_covers_every_paper_run():
    assert sorted(RECIPE) == sorted(run for run in RUNS if run.startswith("paper-"))


@pytest.mark.parametrize("run", sorted(RECIPE))
def test_paper_run_trains_with_the_authors_recipe(run):
    from snlp_lightning.optim import OptimConfig, nanochat_weight_decay

    _, per_step, total, reg, mtp, weight_decay = RECIPE[run]
    r = flat(resolve(*RUNS[run]))
    tokens = r["trainer.devices"] * r["trainer.num_nodes"] * r["data.batch_size"] * r["trainer.accumulate_grad_batches"] * r["data.seq_len"]
    assert tokens == per_step and tokens * r["trainer.max_steps"] == total
    lambdas = {k: r[f"model.regularizer.lambda_{k}"] for k in ("idn", "hcn", "diag")}
    if reg is None:
        assert not any(lambdas.values())
    else:
        kind, lam, n_par, stride, detach = reg
        assert lambdas == {"idn": 0.0, "hcn": 0.0, "diag": 0.0, kind: lam}
        assert (r["model.regularizer.n_par_configs"], r["model.regularizer.stride"], r["model.regularizer.detach"]) == (n_par, stride, detach)
    assert r["model.regularizer.warmup_fraction"] == 0.2  # their --jacobi-reg-warmup 0.2
    config = ModelConfig(**{k.removeprefix("model.config."): v for k, v in r.items() if k.startswith("model.config.")})
    assert config.num_mtp_steps == mtp and (config.mtp_loss_weight == 0.3 or not mtp)
    optim = OptimConfig(**{k.removeprefix("model.optim."): v for k, v in r.items() if k.startswith("model.optim.")})
    assert optim.scale_weight_decay and optim.lr_batch_reference == 2**19
    assert nanochat_weight_decay(config, optim.weight_decay, tokens) == pytest.approx(weight_decay, rel=1e-12)
    assert r["trainer.gradient_clip_val"] is None and r["trainer.precision"] == "bf16-mixed"
    # their eval_tokens, 80 x 524,288, per validation
    assert r["trainer.limit_val_batches"] * r["trainer.devices"] * r["data.batch_size"] * r["data.seq_len"] == 80 * 524_288


@pytest.mark.parametrize("overlay", sorted(set(RUNS) - {"quickstart", "paper-0.5b"}))
def test_an_overlay_alone_is_not_a_run(overlay):
    data = resolve(overlay)["data"]
    assert data["data_dir"] is None and data["seq_len"] is None  # snlp fit refuses: "arguments are required"


# -- ModelConfig.from_name ------------------------------------------------------------------------
def test_from_name_presets_sizes_and_overrides():
    assert ModelConfig.from_name("plain") == make_config("plain") == ModelConfig(no_x0_resid=True, no_ve=True)
    assert ModelConfig.from_name("nanochat", n_layer=4) == make_config("nanochat", n_layer=4)
    assert make_config("nanochat", size="3b") == ModelConfig.from_name("paper-3b")
    assert ModelConfig.from_name("paper-0.5b-mhc", n_layer=4).n_layer == 4
    quick = ModelConfig.from_name("quickstart")
    assert (quick.n_layer, quick.n_embd, quick.sequence_len, quick.vocab_size) == (8, 128, 128, 4096)
    assert ModelConfig.from_name("mhc-dynamic").mhc_variant == "dynamic"


def test_from_name_errors_name_the_value_and_the_choices():
    with pytest.raises(ConfigError, match=r"^unknown model name 'paper-1b'; allowed: \['llama', 'mhc', .*'paper-0\.5b', .*'quickstart-mhc'\]$"):
        ModelConfig.from_name("paper-1b")
    with pytest.raises(ConfigError, match=r"unknown ModelConfig field\(s\) \['layers'\]"):
        ModelConfig.from_name("plain", layers=4)
    with pytest.raises(ConfigError, match="n_layer=0 is not allowed"):
        ModelConfig.from_name("plain", n_layer=0)
    with pytest.raises(ConfigError, match="unknown model name None"):
        ModelConfig.from_name(None)


# -- ModelConfig.from_checkpoint / from_nanochat ----------------------------------------------------
TINY = dict(n_layer=2, n_embd=32, n_head=2, n_kv_head=2, vocab_size=64, sequence_len=16)


def test_from_checkpoint_reads_what_snlp_fit_saved(tmp_path):
    config = make_config("mhc", **TINY)
    module = SNLPModule(config=config, regularizer=RegularizerConfig(n_par_configs=[1]))
    path = tmp_path / "last.ckpt"
    # The entries a Lightning checkpoint holds for this purpose, written by the project's checkpoint IO.
    AtomicCheckpointIO().save_checkpoint({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    assert ModelConfig.from_checkpoint(path) == config
    assert ModelConfig.from_checkpoint(str(path)) == config

    with pytest.raises(CheckpointError, match="does not exist"):
        ModelConfig.from_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="is a folder"):
        ModelConfig.from_checkpoint(tmp_path)
    bare = tmp_path / "bare.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": module.state_dict()}, bare)
    with pytest.raises(CheckpointError, match=r"bare\.ckpt has no model config"):
        ModelConfig.from_checkpoint(bare)
    odd = tmp_path / "odd.ckpt"
    hparams = {**module.hparams, "config": {**dataclasses.asdict(config), "n_layers": 2}}
    AtomicCheckpointIO().save_checkpoint({"state_dict": module.state_dict(), "hyper_parameters": hparams}, odd)
    with pytest.raises(CheckpointError, match=r"odd\.ckpt has a model config this version cannot use"):
        ModelConfig.from_checkpoint(odd)


def test_from_nanochat_reads_a_checkpoint_folder_file_or_config(tmp_path):
    torch.manual_seed(0)
    model = build_model("nanochat", **TINY)
    path = save_nanochat(model, tmp_path / "ckpt", step=3)
    assert ModelConfig.from_nanochat(tmp_path / "ckpt") == model.config
    assert ModelConfig.from_nanochat(str(path)) == model.config
    nanochat_fields = {k: v for k, v in dataclasses.asdict(model.config).items() if k not in ("smear", "backout", "mhc_variant")}
    assert ModelConfig.from_nanochat(nanochat_fields) == model.config  # nanochat's own GPTConfig dict

    with pytest.raises(CheckpointError, match="no model_\\*.pt checkpoint in"):
        ModelConfig.from_nanochat(tmp_path)
    (tmp_path / "ckpt" / "meta_000003.json").unlink()
    with pytest.raises(CheckpointError, match="has no meta_000003.json beside it"):
        ModelConfig.from_nanochat(path)
    with pytest.raises(ConfigError, match="lacks n_layer"):
        ModelConfig.from_nanochat({k: v for k, v in nanochat_fields.items() if k != "n_layer"})
    with pytest.raises(CheckpointError, match="takes a checkpoint path or nanochat's config dict, got int"):
        ModelConfig.from_nanochat(3)
