"""Fault injection on the training side, through the real `snlp` CLI on the real bundled corpus.

Each test injects a real fault (SIGKILL of a writer, a file-size limit that fails the write as a
full disk would, a learning rate that overflows the weights) or feeds a real bad input, and checks
the project's promises (docs/reliability.md): the last good checkpoint is kept byte for byte and
holds finite weights, resume after the fault is exact, stale temporaries are removed on the next
start, and every failure is one line (`snlp: error: ...`, exit 2 for bad input, 1 for a fault).
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from snlp_lightning import build_model, snlp_forward, SolverPlan
from snlp_lightning.checkpoint_io import AtomicCheckpointIO, NonFiniteWeights
from snlp_lightning.errors import TEMP_RE, clean_stale_temps
from snlp_lightning.models import TokenRangeError
from snlp_lightning.solvers import PlanError

from cli_helpers import ONE_THREAD, ROOT, TINY_MODEL, fit_args, snlp

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
FAST = ["--trainer.limit_val_batches", "0", "--model.optim.schedule_steps", "8"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(done: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The run failed with ``code`` and a last stderr line 'snlp: error: ...' holding every fragment."""
    assert done.returncode == code, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("snlp: error: "), last
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def finite_weights(path: Path) -> bool:
    state = AtomicCheckpointIO().load_checkpoint(path)["state_dict"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# A writer that is SIGKILLed in the middle of torch.save: the checkpoint holds an object whose
# pickling announces itself and then blocks, so the kill lands with a half-written temporary.
KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from snlp_lightning.checkpoint_io import AtomicCheckpointIO

    class Stall:
        def __reduce__(self):
            Path(sys.argv[2]).write_text("writing")
            time.sleep(600)

    ckpt = torch.load(sys.argv[1], weights_only=True)
    ckpt["stall"] = Stall()
    AtomicCheckpointIO().save_checkpoint(ckpt, sys.argv[1])
    """
)


def test_kill_during_a_checkpoint_write_keeps_the_last_one_and_resume_is_exact(bundled_data, tmp_path):
    """4 steps; a writer killed mid-write over last.ckpt; resume to 8 == 8 steps uninterrupted,
    and the killed writer's temporary is gone after the resume started."""
    common = [*FAST, "--checkpoint.every_n_train_steps", "4"]
    snlp(*fit_args(bundled_data, "straight", "--trainer.max_steps", "8", *common), cwd=tmp_path)
    snlp(*fit_args(bundled_data, "legs", "--trainer.max_steps", "4", *common), cwd=tmp_path)
    folder = tmp_path / "runs/legs/checkpoints"
    last = folder / "last.ckpt"
    before = sha(last)

    flag = tmp_path / "writing.flag"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(last), str(flag)], env=ONE_THREAD)
    deadline = time.time() + 120
    while not flag.exists() and time.time() < deadline and writer.poll() is None:
        time.sleep(0.05)
    assert flag.exists(), "the writer never reached torch.save"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    stale = temps(folder)
    assert len(stale) == 1 and TEMP_RE.match(stale[0]), stale  # the half-written temporary
    assert sha(last) == before  # the kill did not touch last.ckpt

    snlp(*fit_args(bundled_data, "legs", "--trainer.max_steps", "8", *common, "--ckpt_path", "last"), cwd=tmp_path)
    assert temps(folder) == []
    straight = AtomicCheckpointIO().load_checkpoint(tmp_path / "runs/straight/checkpoints/last.ckpt")
    legs = AtomicCheckpointIO().load_checkpoint(last)
    assert legs["global_step"] == 8
    assert straight["state_dict"].keys() == legs["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, legs["state_dict"][key]), key


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last_checkpoint(bundled_data, tmp_path):
    snlp(*fit_args(bundled_data, "full", "--trainer.max_steps", "2", *FAST, "--checkpoint.every_n_train_steps", "1"), cwd=tmp_path)
    folder = tmp_path / "runs/full/checkpoints"
    last = folder / "last.ckpt"
    before = sha(last)
    limit = last.stat().st_size // 2  # logs and configs fit; a checkpoint does not
    args = fit_args(bundled_data, "full", "--trainer.max_steps", "4", *FAST, "--checkpoint.every_n_train_steps", "1",
                    "--ckpt_path", "last")
    done = subprocess.run([sys.executable, "-m", "snlp_lightning.cli", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=ONE_THREAD, preexec_fn=_file_size_limit(limit))
    one_line_error(done, 1, "cannot write checkpoint", "File too large", "earlier checkpoints are kept")
    assert sha(last) == before and temps(folder) == []
    assert AtomicCheckpointIO().load_checkpoint(last)["global_step"] == 2


def test_divergence_stops_before_anything_non_finite_is_saved(bundled_data, tmp_path):
    """A learning rate large enough to overflow the head's weights after a few steps: the run stops
    with one line naming the step, and every checkpoint on disk holds finite weights."""
    done = snlp(*fit_args(bundled_data, "div", "--trainer.max_steps", "30", *FAST, "--checkpoint.every_n_train_steps", "1",
                          "--checkpoint.save_top_k", "-1", "--model.optim.unembedding_lr", "1e6"), cwd=tmp_path, check=False)
    line = one_line_error(done, 1, "training diverged at step", "the last checkpoint is intact")
    step = int(line.split("at step ")[1].split(":")[0])
    folder = tmp_path / "runs/div/checkpoints"
    saved = sorted(folder.glob("*.ckpt"))
    assert saved, "no checkpoint before the divergence"
    for path in saved:
        assert finite_weights(path), path
        assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] <= step
    assert AtomicCheckpointIO().load_checkpoint(folder / "last.ckpt")["global_step"] == step


def test_non_finite_weights_are_never_written(tmp_path):
    target = tmp_path / "x.ckpt"
    with pytest.raises(NonFiniteWeights, match="NaN/inf at step 7"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 7, "state_dict": {"w": torch.tensor([1.0, float("nan")])}}, target)
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_writers_only_are_removed(tmp_path):
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".last.ckpt.{host}-{dead_pid}.abc123.tmp"
    live = tmp_path / f".last.ckpt.{host}-{os.getpid()}.def456.tmp"
    other_host = tmp_path / f".last.ckpt.otherhost-{dead_pid}.ghi789.tmp"
    user_file = tmp_path / "notes.tmp"
    for p in (stale, live, other_host, user_file):
        p.write_text("x")
    assert clean_stale_temps(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, other_host, user_file))


def test_printed_and_saved_configs_load_again(bundled_data, tmp_path):
    printed = snlp(*fit_args(bundled_data, "cfg"), "--print_config", cwd=tmp_path)
    assert "Unable to serialize" not in printed.stderr
    (tmp_path / "printed.yaml").write_text(printed.stdout)
    snlp("fit", "--config", "printed.yaml", "--trainer.max_steps", "2", *FAST, cwd=tmp_path)
    saved = next((tmp_path / "runs" / "cfg").rglob("config.yaml"))
    snlp("fit", "--config", str(saved), "--trainer.max_steps", "3", *FAST, "--ckpt_path", "last", cwd=tmp_path)
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "runs/cfg/checkpoints/last.ckpt")["global_step"] == 3


def test_validate_without_a_checkpoint_is_an_error(bundled_data, tmp_path):
    base = ["validate", "--config", QUICKSTART, "--data.data_dir", str(bundled_data), *TINY_MODEL,
            "--checkpoint.dirpath", "runs/none/checkpoints", "--trainer.limit_val_batches", "1"]
    one_line_error(snlp(*base, "--ckpt_path", "last", cwd=tmp_path, check=False), 2, "no last*.ckpt in runs/none/checkpoints")
    one_line_error(snlp(*base, cwd=tmp_path, check=False), 2, "no checkpoint to score")


def run_in_process(args: list[str], capfd) -> subprocess.CompletedProcess:
    """`snlp ARGS` through its real entry point in this process (no interpreter start per case)."""
    from snlp_lightning.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["snlp", *args], code, out, err)


def test_bad_values_are_one_line_errors_before_training(bundled_data, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["snlp"])  # the arguments come from the test, not pytest's command line
    cases = {
        ("--model.optim.matrix_lr", "-0.01"): "matrix_lr=-0.01 is not allowed",
        ("--model.optim.embedding_lr", "nan"): 'Parser key "model.optim.embedding_lr"',
        ("--model.optim.embedding_lrr", "1"): "unrecognized arguments: --model.optim.embedding_lrr",
        ("--model.regularizer.lambda_idn", "-1"): "lambda_idn=-1.0 is not allowed",
        ("--model.eval_plans", "[idn:n4:K100000000]"): "K=100000000 but only C=4 chunk(s); K must lie in 1..4",
        ("--model.eval_plans", "[idn:n4:2xF2:K3]"): "K must lie in 1..2",
        ("--checkpoint.dirpath", "a_file/checkpoints"): "a_file/checkpoints cannot be created: ",
    }
    if not torch.cuda.is_available():
        cases[("--trainer.accelerator", "cuda")] = "`CUDAAccelerator` can not run on your system"
    (tmp_path / "a_file").write_text("the user's")
    for (flag, value), fragment in cases.items():
        start = time.perf_counter()
        done = run_in_process(fit_args(bundled_data, "bad", flag, value), capfd)
        one_line_error(done, 2, fragment)
        assert "Unable to serialize" not in done.stderr and "JsonargparseWarning" not in done.stderr
        assert "usage:" not in done.stderr  # one line, not jsonargparse's 120-line usage
        assert time.perf_counter() - start < 60  # nothing ran until killed
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()
    assert (tmp_path / "a_file").read_text() == "the user's"


def test_a_checkpoint_of_another_architecture(bundled_data, tmp_path):
    snlp(*fit_args(bundled_data, "arch", "--trainer.max_steps", "1", *FAST), cwd=tmp_path)
    ckpt = tmp_path / "runs/arch/checkpoints/last.ckpt"
    deeper = snlp(*fit_args(bundled_data, "arch", "--model.config.n_layer", "6", "--ckpt_path", str(ckpt)), cwd=tmp_path, check=False)
    one_line_error(deeper, 2, "trained with n_layer=4 (config: 6)", "resuming needs the same architecture")
    # validate takes the checkpoint's architecture and says so
    done = snlp("validate", "--config", QUICKSTART, "--data.data_dir", str(bundled_data), "--ckpt_path", str(ckpt),
                "--data.seq_len", "64", "--model.eval_plans", "[idn:n2:K1]", "--trainer.limit_val_batches", "1",
                "--model.regularizer.n_par_configs", "[2]", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert "snlp: using the architecture of" in done.stderr and "n_layer=4 (config: 8)" in done.stderr
    no_config = tmp_path / "bare.ckpt"
    state = torch.load(ckpt, weights_only=True)
    del state["hyper_parameters"]
    torch.save(state, no_config)
    done = snlp("validate", "--config", QUICKSTART, "--data.data_dir", str(bundled_data), "--ckpt_path", str(no_config),
                cwd=tmp_path, check=False)
    one_line_error(done, 2, f"checkpoint {no_config} has no model config")
    folder = snlp("validate", "--config", QUICKSTART, "--data.data_dir", str(bundled_data), "--ckpt_path", str(tmp_path),
                  cwd=tmp_path, check=False)
    one_line_error(folder, 2, "is a folder, not a .ckpt file")


def test_traceback_on_request(bundled_data, tmp_path):
    done = subprocess.run([sys.executable, "-m", "snlp_lightning.cli", *fit_args(bundled_data, "bad", "--model.optim.matrix_lr", "-1")],
                          cwd=tmp_path, capture_output=True, text=True, env={**ONE_THREAD, "SNLP_TRACEBACK": "1"})
    assert done.returncode == 1 and "Traceback" in done.stderr and "ConfigError" in done.stderr


def test_empty_or_malformed_tokens_are_clear_errors():
    model = build_model("plain", n_layer=2, n_embd=32, n_head=2, n_kv_head=2, vocab_size=64, sequence_len=16)
    for bad in (torch.empty(1, 0, dtype=torch.long), torch.empty(0, 4, dtype=torch.long), torch.zeros(4, dtype=torch.long)):
        with pytest.raises(TokenRangeError, match=r"shape \(batch, time\)"):
            model(bad)
        with pytest.raises(TokenRangeError, match=r"shape \(batch, time\)"):
            snlp_forward(model, bad, SolverPlan.parse("idn:n2:K1"))
    with pytest.raises(TokenRangeError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(PlanError, match="K must lie in 1..2"):
        SolverPlan.parse("idn:n2:K3")


# -- bad values through the Python API and the smaller commands (found by a bad-input sweep) ------------
def test_model_config_fields_must_have_their_types():
    from snlp_lightning import ConfigError

    cases = {
        "short_window": ("abc", "short_window='abc'"), "window_pattern": (5, "window_pattern=5"),
        "use_mhc": ("no", "use_mhc='no' is not allowed: must be true or false"), "no_ve": ("false", "no_ve='false'"),
        "mhc_sinkhorn_iters": (2.5, "mhc_sinkhorn_iters=2.5"), "rope_base": (float("nan"), "rope_base=nan"),
        "logit_softcap": (0.0, "logit_softcap=0.0"),
    }
    for field, (value, fragment) in cases.items():
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            build_model("plain", n_layer=2, n_embd=32, n_head=2, n_kv_head=2, **{field: value})


def test_plan_options_of_other_methods_are_refused():
    for text, fragment in {
        "idn:n4:K2:kappa=0.3": "kappa applies only to damped", "fixed:n4:K4:probes=2": "probes applies only to diagn",
        "idn:n4:K2:est=vjp": "est applies only to diagn", "idn:n4:K1:avg": "avg divides fused branch sums",
        "idn:n4:2xF2:K2:avg:avg": "gives avg twice", "diagn:n4:K1:eps=inf": "eps=inf is not allowed",
    }.items():
        with pytest.raises(PlanError, match=re.escape(fragment)):
            SolverPlan.parse(text)
    with pytest.raises(PlanError, match="a plan must be a string"):
        SolverPlan.parse(4)
    assert str(SolverPlan.parse("seq:n4:2xF2:avg")) == "seq:n4:2xF2:avg"  # avg is no longer dropped when printed


def test_tokens_and_decoder_arguments_are_checked():
    from export import LayerParallelDecoder
    from export.decoder import DecoderError

    model = build_model("plain", n_layer=2, n_embd=32, n_head=2, n_kv_head=2, vocab_size=64, sequence_len=16)
    with pytest.raises(TokenRangeError, match="int64 or int32"):
        model(torch.zeros(1, 4, dtype=torch.uint8))
    with pytest.raises(TokenRangeError, match="got list"):
        model([[1, 2, 3]])
    with pytest.raises(DecoderError, match="max_seq_len=0 is not allowed"):
        LayerParallelDecoder(model, "seq", batch_size=1, max_seq_len=0)
    with pytest.raises(DecoderError, match="batch_size=2.5 is not allowed"):
        LayerParallelDecoder(model, "seq", batch_size=2.5)


def test_sampling_settings_that_cannot_sample_are_refused():
    from export.runtime import GenerationError, check_sampling

    for temperature in (1e-300, float("inf"), float("nan"), -1.0):
        with pytest.raises(GenerationError, match="temperature="):
            check_sampling(temperature, None)
    with pytest.raises(GenerationError, match="top_k=5 applies only when sampling"):
        check_sampling(0.0, 5)
    check_sampling(0.7, 5)


def test_the_default_sweep_fits_small_models():
    from export.bench import sweep_plans

    for layers in (2, 4, 8):
        plans = sweep_plans(layers, False, [1, 2], [1, 2], ["h0"])
        assert plans and all(p.iters <= p.chunks for p in plans)


def test_broken_checkpoints_are_one_line(bundled_data, tmp_path, monkeypatch, capfd):
    """NaN weights, weights that do not fit their config, a config this version cannot use."""
    snlp(*fit_args(bundled_data, "src", "--trainer.max_steps", "1", *FAST), cwd=tmp_path)
    source = torch.load(tmp_path / "runs/src/checkpoints/last.ckpt", weights_only=True)
    broken = {}
    nan = {**source, "state_dict": dict(source["state_dict"])}
    nan["state_dict"]["model.lm_head.weight"] = nan["state_dict"]["model.lm_head.weight"].clone().fill_(float("nan"))
    broken["nan"] = (nan, "holds NaN/inf weights (model.lm_head.weight)")
    shape = {**source, "state_dict": dict(source["state_dict"])}
    shape["state_dict"]["model.lm_head.weight"] = shape["state_dict"]["model.lm_head.weight"][:10]
    broken["shape"] = (shape, "does not fit its model config (shape: model.lm_head.weight (10, 64)")
    unknown = {**source, "hyper_parameters": {**source["hyper_parameters"], "config": {**source["hyper_parameters"]["config"], "bogus": 1}}}
    broken["unknown"] = (unknown, "has a model config this version cannot use")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["snlp"])
    for name, (state, fragment) in broken.items():
        torch.save(state, tmp_path / f"{name}.ckpt")
        done = run_in_process(["validate", "--config", QUICKSTART, "--data.data_dir", str(bundled_data), *TINY_MODEL,
                               "--trainer.limit_val_batches", "1", "--ckpt_path", f"{name}.ckpt"], capfd)
        one_line_error(done, 2, f"checkpoint {name}.ckpt", fragment)
    from snlp_lightning import CheckpointError, load_nanochat

    with pytest.raises(CheckpointError, match=r"holds NaN/inf weights \(transformer.wte.weight\)"):
        model = build_model("plain", n_layer=2, n_embd=32, n_head=2, n_kv_head=2, vocab_size=64, sequence_len=16)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["transformer.wte.weight"][0, 0] = float("inf")
        load_nanochat(state, model.config)


def test_nanochat_files_that_cannot_be_read_are_one_line(tmp_path):
    from snlp_lightning import CheckpointError, load_nanochat
    from snlp_lightning.models.nanochat_io import save_nanochat

    model = build_model("plain", n_layer=2, n_embd=32, n_head=2, n_kv_head=2, vocab_size=64, sequence_len=16)
    path = save_nanochat(model, tmp_path)
    meta = tmp_path / "meta_000000.json"
    good_meta = meta.read_text()
    for text, fragment in {
        b"\xff\xfe not utf-8": "is not a nanochat meta file", '{"model_config": [1, 2]}': "must be a mapping",
        '{"model_config": {"n_embd": 32}}': "lacks sequence_len, vocab_size, n_layer",
        '{"model_config": ' + good_meta.split('"model_config": ', 1)[1].replace('"no_ve": true', '"no_ve": "false"'): "no_ve='false'",
    }.items():
        meta.write_bytes(text) if isinstance(text, bytes) else meta.write_text(text)
        with pytest.raises(CheckpointError, match=re.escape(fragment)):
            load_nanochat(path)
    meta.write_text(good_meta)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is corrupt or not a torch file"):
        load_nanochat(path)
    lightning_ckpt = tmp_path / "last.ckpt"
    lightning_ckpt.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="resume it with --ckpt_path"):
        load_nanochat(lightning_ckpt)


def test_config_files_that_are_not_yaml_mappings_are_one_line(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["snlp"])
    files = {"bin.yaml": (b"\xff\xfe\x00", "is not UTF-8 text"), "bad.yaml": (b"a: b: c\n", "bad.yaml line 1: mapping values"),
             "empty.yaml": (b"", "is empty"), "list.yaml": (b"- 1\n", "holds a YAML list")}
    for name, (data, fragment) in files.items():
        (tmp_path / name).write_bytes(data)
        one_line_error(run_in_process(["fit", "--config", name], capfd), 2, f"--config {name}", fragment)
    one_line_error(run_in_process(["fit", "--config", str(tmp_path)], capfd), 2, "is a folder, not a YAML file")


def test_argparse_commands_answer_in_one_line(tmp_path):
    """snlp-generate / -export / -bench / -prepare / -demo: a bad argument is one line, not the usage."""
    for module, args in {
        "export.generate_cli": ["--checkpoint", "x", "--prompt", "a", "--max-new-tokens", "0"],
        "export.package": ["--checkpoint", "x", "--out", "o", "--batch-size", "0"],
        "export.bench": ["--preset", "plain", "--budget", "x"],
        "snlp_lightning.demo": ["--layers", "x"],
    }.items():
        done = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True, env=ONE_THREAD)
        assert done.returncode == 2 and "usage:" not in done.stderr, (module, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and ": error: argument" in done.stderr, (module, done.stderr)


def test_written_files_are_as_readable_as_any_other(tmp_path):
    from snlp_lightning.errors import atomic_write_text, path_kind

    atomic_write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert path_kind(tmp_path / "dangling") == "a broken link"


def test_settings_that_would_be_ignored_or_truncated_are_refused(tmp_path):
    from data_prep import PrepareOptions, prepare
    from data_prep.errors import PrepareError
    from export import LayerParallelDecoder, generate_tokens
    from export.runtime import GenerationError

    with pytest.raises(PrepareError, match="--bos-token '<s>' needs --tokenizer"):
        prepare(PrepareOptions(out=str(tmp_path / "out"), bundled=True, bos_token="<s>", progress=False))
    assert not (tmp_path / "out").exists()
    model = build_model("plain", n_layer=2, n_embd=32, n_head=2, n_kv_head=2, vocab_size=64, sequence_len=16)
    decoder = LayerParallelDecoder(model, "seq", batch_size=1)
    with pytest.raises(GenerationError, match="must be integers"):
        generate_tokens(decoder, [[0, 1.5]], 2)
    with pytest.raises(GenerationError, match="list of token-id lists"):
        generate_tokens(decoder, torch.tensor([[0, 1]]), 2)
    for args, fragment in {("--preset", "plain", "--plans", "hcn:n2:K1"): "hcn plans need an mHC model",
                           ("--layers", "4"): "the default plans solve N = 6 blocks"}.items():
        done = subprocess.run([sys.executable, "-m", "snlp_lightning.demo", *args], cwd=tmp_path, capture_output=True,
                              text=True, env=ONE_THREAD)
        assert done.returncode == 2 and fragment in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
