"""The one ``snlp`` command (its subcommands, their names in help and errors, the old aliases) and the
compat module's signature check. Real runs of the installed console scripts; no training."""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import pytest

from cli_helpers import ONE_THREAD, installed, run_installed
from snlp_lightning import compat
from snlp_lightning.__main__ import ALIASES, COMMANDS

SUBCOMMANDS = ("fit", "validate", "prepare", "generate", "export", "bench", "eval", "diagnose", "gpu-check", "quickstart", "demo")


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_snlp_help_lists_every_subcommand_with_a_line_each():
    done = run_installed("snlp", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: snlp COMMAND")
    described = dict(re.findall(r"^  ([a-z-]+)  +(\S.*)$", done.stdout, flags=re.MULTILINE))
    assert tuple(described) == SUBCOMMANDS == tuple(COMMANDS)
    assert all(len(about) > 20 for about in described.values())
    assert all(alias in done.stdout for alias in ALIASES)  # the old names are mentioned as aliases


def test_a_subcommand_names_itself_in_help_and_errors(tmp_path):
    helped = run_installed("snlp", "prepare", "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: snlp prepare ") and "--vocab-size" in helped.stdout

    bad = run_installed("snlp", "prepare", "--bundled", "--vocab-size", "many", "--out", str(tmp_path / "out"))
    line = one_line(bad.stderr)
    assert bad.returncode == 2
    assert line.startswith("snlp prepare: error: argument --vocab-size: invalid int value: 'many'"), line
    assert line.endswith("(all options: snlp prepare --help)")
    assert not (tmp_path / "out").exists()


def test_an_unknown_subcommand_is_one_line_naming_it_and_the_allowed_ones():
    done = run_installed("snlp", "frobnicate", "--out", "x")
    line = one_line(done.stderr)
    assert done.returncode == 2 and done.stdout == ""
    assert line.startswith("snlp: error: unknown command 'frobnicate'"), line
    assert all(name in line for name in SUBCOMMANDS)
    # a near miss gets a suggestion
    from snlp_lightning.__main__ import _unknown

    assert "did you mean prepare?" in str(_unknown("prepar"))


def test_snlp_cpu_attention_picks_the_kernel_or_names_the_bad_value(monkeypatch):
    from snlp_lightning.__main__ import main
    from snlp_lightning.models import attention

    monkeypatch.setenv("SNLP_CPU_ATTENTION", "flash")
    bad = subprocess.run([installed("snlp"), "demo", "--help"], capture_output=True, text=True, env={**ONE_THREAD, "SNLP_CPU_ATTENTION": "flash"})
    assert bad.returncode == 2 and bad.stdout == ""
    assert one_line(bad.stderr) == "snlp: error: SNLP_CPU_ATTENTION: CPU attention kernel 'flash' is not allowed: one of math, fast"
    monkeypatch.setenv("SNLP_CPU_ATTENTION", "fast")
    monkeypatch.setattr(attention, "_cpu_kernel", "math")  # restored after the test
    with pytest.raises(SystemExit) as done:
        main(["demo", "--help"])
    assert done.value.code == 0 and attention._cpu_kernel == "fast"


def test_the_old_command_names_still_work():
    done = run_installed("snlp-prepare", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: snlp-prepare ")


def test_every_subcommand_main_takes_argv_and_prog():
    """The dispatch table points at real mains that accept (argv, prog=...), as ``snlp`` calls them."""
    import importlib

    for name, (target, _) in COMMANDS.items():
        module, function = target.split(":")
        main = getattr(importlib.import_module(module), function)
        params = inspect.signature(main).parameters
        assert list(params)[0] in ("argv", "args"), (name, params)
        assert name in ("fit", "validate") or "prog" in params, (name, params)


# -- compat: private APIs checked at first use ---------------------------------------------------------
def test_compat_check_names_the_api_and_the_installed_version_in_one_line():
    def muon(params, grads, momentum_bufs, *, lr, weight_decay):  # an older / newer private signature
        pass

    with pytest.raises(compat.CompatError) as err:
        compat.check_call(muon, "torch.optim._muon.muon", "torch", 3, compat.MUON_KEYWORDS)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"torch.optim._muon.muon of {compat.installed_version('torch')} does not take")
    assert "momentum" in message and "(params, grads, momentum_bufs, *, lr, weight_decay)" in message
    assert isinstance(err.value, compat.Fault)  # exit code 1 under errors.run_entry: the environment, not the input

    with pytest.raises(compat.CompatError, match=r"^torch\.optim\._muon\.gone of torch \S+ does not exist;"):
        compat.lookup("torch.optim._muon.gone", "torch")

    class Base:
        def _hook(self, model):
            pass

    compat.check_hook(Base, "_hook", "lightning", positional=1)
    with pytest.raises(compat.CompatError, match=r"Base\._renamed of lightning \S+ does not exist \(this project overrides it\)"):
        compat.check_hook(Base, "_renamed", "lightning")
    with pytest.raises(compat.CompatError, match=r"Base\._hook of lightning \S+ does not take the call"):
        compat.check_hook(Base, "_hook", "lightning", positional=2)


def test_the_installed_private_apis_pass_their_checks():
    import torch
    from litdata.streaming.fs_provider import _get_fs_provider
    from torch.optim._muon import muon

    update, coefficients = compat.torch_muon()
    assert update is muon and len(coefficients) == 3
    assert compat.litdata_fs_provider() is _get_fs_provider
    assert len(compat.lightning_fsdp_helpers()) == 2
    compat.check_lightning_cli_hooks()
    compat.check_fsdp_strategy_hooks()
    assert issubclass(compat.backend_compiler_failed(), Exception)

    before = torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit
    try:
        compat.raise_dynamo_limits()
        assert torch._dynamo.config.recompile_limit >= 256 and torch._dynamo.config.accumulated_recompile_limit >= 4096
    finally:
        torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit = before


def test_quickstart_takes_overlay_configs_and_names_a_missing_one(tmp_path):
    """``snlp quickstart --config base --config overlay``: every file is checked before anything runs."""
    base = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    done = run_installed("snlp", "quickstart", "--data-dir", str(tmp_path / "data"), "--config", base,
                         "--config", str(tmp_path / "nope.yaml"))
    line = one_line(done.stderr)
    assert done.returncode == 2 and f"--config {tmp_path / 'nope.yaml'} not found" in line, line
    assert not (tmp_path / "data").exists()  # nothing prepared
