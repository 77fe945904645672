"""``snlp``: the project's one command, a subcommand per job (``snlp --help`` lists them).

    snlp prepare --bundled --out data/bundled
    snlp fit --config configs/quickstart.yaml
    snlp validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    snlp generate --checkpoint runs/quickstart/checkpoints/last.ckpt --plan idn:n6:3xF2:K2 --prompt "The"
    python -m snlp_lightning ...                                   # the same command

``fit`` and ``validate`` are LightningCLI (``snlp_lightning/cli.py``); every other subcommand is the
``main(argv, prog)`` of its module, run with the remaining arguments and ``prog="snlp NAME"``, so
its --help and its one-line errors say ``snlp prepare`` and so on. The old console scripts
(``snlp-prepare``, ``snlp-generate``, ...) call the same mains and remain as aliases.

``SNLP_CPU_ATTENTION=fast`` makes every subcommand run CPU attention on SDPA's flash kernel instead of
the math kernel the recorded CPU numbers were computed with (models/attention.py; about 15% off a
regularized CPU training step, docs/benchmarks.md; float32 results change in the last digits).

This module imports only what the chosen subcommand needs: ``snlp prepare`` never loads Lightning
(its spawned tokenizing workers re-import the command's script, so that would cost every worker).
"""

from __future__ import annotations

import importlib
import os
import sys

from .errors import UserError, run_entry

# subcommand -> (its main as "module:function"; one line for ``snlp --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("snlp_lightning.cli:main", "train (LightningCLI: --config YAML, every field overridable; --ckpt_path last resumes)"),
    "validate": ("snlp_lightning.cli:main", "score a checkpoint: sequential vs layer-parallel perplexity for every eval plan"),
    "prepare": ("data_prep.prepare:main", "text files or the bundled corpus -> tokenizer + litdata token chunks"),
    "generate": ("export.generate_cli:main", "stream text from a checkpoint (any plan, eager or compiled) or a package"),
    "export": ("export.package:main", "a checkpoint + a plan -> one AOTInductor package that runs without this project"),
    "bench": ("export.bench:main", "layer-parallel vs sequential, speed and quality, side by side in one process"),
    "eval": ("export.evaluate:main", "the paper's evaluation: PPL, bits per byte, agreement, speed per plan (resumable)"),
    "diagnose": ("snlp_lightning.diagnostics:main", "why a plan fails: per-layer IDN error and Jacobian spectral radius over depth"),
    "gpu-check": ("export.gpu_check:main", "every CUDA path in one timed run (a CPU dry run without CUDA): summary, checks.json, tables"),
    "quickstart": ("snlp_lightning.quickstart:main", "the README's main job offline on a CPU: prepare, fit, validate, PPL table"),
    "demo": ("snlp_lightning.demo:main", "every solver plan against the sequential model, on small untrained models"),
}
LIGHTNING_COMMANDS = ("fit", "validate")  # LightningCLI parses the subcommand name itself
# The console scripts of before the one command (pyproject.toml); newer subcommands have none.
ALIASES = {f"snlp-{name}": name for name in ("prepare", "generate", "export", "bench", "quickstart", "demo")}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join([
        "usage: snlp COMMAND [options]          (snlp COMMAND --help: that command's options)",
        "",
        "Structured Newton Layer Parallelism on PyTorch Lightning: one command, a subcommand per job.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()),
        "",
        f"The old command names remain as aliases: {', '.join(ALIASES)}.",
        "A failed run ends with one line: exit code 2 for bad input, 1 for a fault (SNLP_TRACEBACK=1: the traceback).",
    ])


def _choices() -> str:
    return f"one of {', '.join(COMMANDS)} (snlp --help says what each does)"


def _unknown(name: str) -> UserError:
    import difflib

    close = difflib.get_close_matches(name, COMMANDS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return UserError(f"unknown command {name!r}{hint}: choose {_choices()}")


def _raise(err: Exception) -> None:
    raise err


def main(args: list[str] | None = None) -> int:
    """``snlp COMMAND ...``; returns the exit code (bad input ends in SystemExit(2), as everywhere)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv:
        return run_entry("snlp", _raise, UserError(f"give a command: {_choices()}"))
    name = argv[0]
    kernel = os.environ.get("SNLP_CPU_ATTENTION")
    if kernel:  # a process-wide choice, made here at the entry point (torch only loads when asked)
        from .models.attention import set_cpu_kernel

        try:
            set_cpu_kernel(kernel)
        except UserError as err:
            return run_entry("snlp", _raise, UserError(f"SNLP_CPU_ATTENTION: {err}"))
    if name in LIGHTNING_COMMANDS or name.startswith("-"):  # options before the command are LightningCLI's (--config)
        from .cli import main as lightning_main

        # From the command line LightningCLI reads sys.argv itself (given both, it warns).
        return lightning_main(None if args is None else argv)
    if name not in COMMANDS:
        return run_entry("snlp", _raise, _unknown(name))
    module, function = COMMANDS[name][0].split(":")
    code = getattr(importlib.import_module(module), function)(argv[1:], prog=f"snlp {name}")
    return 0 if code is None else code


if __name__ == "__main__":
    sys.exit(main())
