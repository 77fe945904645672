"""``snlp fit`` and ``snlp validate``: LightningCLI over SNLPModule + TokenDataModule.

(``snlp`` itself, with every other subcommand, is ``snlp_lightning/__main__.py``.)

    snlp fit --config configs/quickstart.yaml
    snlp fit --config configs/quickstart.yaml --ckpt_path last          # resume exactly
    snlp validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    snlp fit --config configs/quickstart.yaml --print_config            # every field, overridable
    snlp fit --config configs/quickstart.yaml --trainer.strategy fsdp --trainer.devices 2 --model.optim.optimizer adamw

Errors follow the project's one policy (``errors.run_entry``): bad input is one line on stderr and
exit code 2, a fault (divergence, a full disk) one line and exit code 1; SNLP_TRACEBACK=1 shows
the traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from . import compat
from .checkpoint_io import AtomicCheckpointIO
from .config import ConfigError, ModelConfig
from .data import TokenDataModule
from .errors import EXIT_BAD_INPUT, TRACEBACK_ENV, check_writable_parent, first_line, path_kind, run_entry
from .models.nanochat_io import CheckpointError
from .module import SNLPModule
from .strategy import BlockFSDPStrategy


class OneLineParser(LightningArgumentParser):
    """jsonargparse's parser, but a bad argument ends with one line instead of the whole usage."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG") or os.environ.get(TRACEBACK_ENV):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        line = " ".join(str(message).split())
        line = line if len(line) <= 400 else line[:397] + "..."
        words = parser.prog.replace(" [options]", "").split()
        prog = " ".join(["snlp", *words[1:]])  # the console script's name, also under python -m
        print(f"snlp: error: {line} (all options: {prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)

    def _parse_common(self, cfg, *args, **kwargs):
        """Resolve the accelerator-dependent precision default before jsonargparse prints
        (``--print_config``), validates and returns the config (so the printed and saved configs
        show the precision the run uses). A jsonargparse without this hook falls back to
        ``SNLPCLI.before_instantiate_classes``, which resolves it for the run itself."""
        resolve_precision(cfg)
        return super()._parse_common(cfg, *args, **kwargs)


def default_precision(accelerator) -> str:
    """The precision of a run that does not set ``trainer.precision``: ``bf16-mixed`` (bf16 autocast
    over float32 weights) when the run trains on CUDA, ``32-true`` otherwise. ``accelerator``: the
    config's ``trainer.accelerator``; "cpu" is float32 even on a machine with CUDA, "gpu" / "cuda"
    is CUDA, "auto" (or unset) is CUDA when there is one; any other accelerator (mps, tpu, an
    Accelerator object) gets 32-true."""
    name = accelerator.lower() if isinstance(accelerator, str) else accelerator
    if name in ("gpu", "cuda") or (name in ("auto", None) and torch.cuda.is_available()):
        return "bf16-mixed"
    return "32-true"


def resolve_precision(cfg) -> None:
    """Replace an unset ``trainer.precision`` (None) of ``cfg`` (a subcommand's namespace) by
    ``default_precision`` of its ``trainer.accelerator``; an explicit precision is kept."""
    try:
        if "trainer.precision" in cfg and cfg["trainer.precision"] is None:
            cfg["trainer.precision"] = default_precision(cfg.get("trainer.accelerator"))
    except (KeyError, TypeError, AttributeError):  # not a namespace with a trainer section
        pass


class SNLPCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit and validate (SNLPModule has no test or predict step); ``snlp`` dispatches the rest."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def init_parser(self, **kwargs):
        kwargs.setdefault("prog", "snlp")  # the command's name also under python -m (--help's usage line)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 50})

    def _instantiate_trainer(self, config: dict, callbacks: list):
        """``trainer.strategy: fsdp`` means SNLP's FSDP: one unit per Block (``strategy.BlockFSDPStrategy``);
        checkpoints go through AtomicCheckpointIO unless the config names another CheckpointIO.

        The plugin is added here rather than in the trainer defaults so that ``--print_config`` and
        the run's saved config.yaml stay loadable with ``--config`` (an instance does not serialize).
        """
        if config.get("strategy") == "fsdp":
            config["strategy"] = BlockFSDPStrategy()
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        config["plugins"] = plugins
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        self.model.check_strategy(self.trainer.strategy, fitting=True)  # fail before other processes start
        self._check_output_folders()

    def _check_output_folders(self) -> None:
        """Checkpoint and log folders must be creatable now, not after the first N training steps."""
        folders = [("checkpoint.dirpath", getattr(self.trainer.checkpoint_callback, "dirpath", None))]
        folders += [("trainer.logger save_dir", getattr(logger, "save_dir", None)) for logger in self.trainer.loggers]
        for what, folder in folders:
            if not folder or "://" in str(folder):
                continue
            folder = Path(folder)
            if folder.exists() and not folder.is_dir():
                raise ConfigError(f"{what} {folder} is {path_kind(folder)}, not a folder; choose a folder path")
            if not folder.exists():
                check_writable_parent(folder, what)

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        resolve_precision(self.config[subcommand] if subcommand else self.config)

    def before_validate(self) -> None:
        # Scoring needs trained weights: a checkpoint (resolved by the Trainer for "last") or init_from.
        self.model.require_weights = True

    def _parse_ckpt_path(self) -> None:
        """Take the model architecture (and only it) from the checkpoint given with --ckpt_path.

        Lightning's own version copies every saved hyperparameter over the command line; here the
        architecture must match the weights, while eval_plans, regularizer and optim stay the
        user's (so ``validate --ckpt_path X --model.eval_plans [...]`` sweeps plans).

        - ``last`` is resolved here when ``checkpoint.dirpath`` is set, so it gets the same treatment;
          ``validate`` with no last checkpoint there is an error (it would score an untrained model).
        - ``fit`` (a resume) refuses a checkpoint whose architecture differs from the config;
          ``validate`` takes the checkpoint's and says which fields it changed.
        - A missing, corrupt or config-less file is a CheckpointError naming it.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        section = self.config[subcommand]
        ckpt_path = section.get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = self._resolve_last(subcommand, section)
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
        saved = dataclasses.asdict(ModelConfig.from_checkpoint(ckpt_path, checkpoint))
        given = section.get("model", {}).get("config")
        given = given.as_dict() if hasattr(given, "as_dict") else dataclasses.asdict(given) if dataclasses.is_dataclass(given) else dict(given or {})
        changed = [f"{k}={saved[k]!r} (config: {given[k]!r})" for k in saved if k in given and given[k] != saved[k]]
        if changed and subcommand == "fit":
            raise ConfigError(
                f"checkpoint {ckpt_path} was trained with {', '.join(changed)}: resuming needs the same "
                "architecture; use the config it was trained with or drop those overrides"
            )
        if changed:
            print(f"snlp: using the architecture of {ckpt_path}: {', '.join(changed)}", file=sys.stderr)
        section["ckpt_path"] = ckpt_path
        self.config = self.parser.parse_object({subcommand: {"model": {"config": saved}}}, self.config)

    @staticmethod
    def _resolve_last(subcommand: str, section) -> str:
        """``last`` -> the newest last*.ckpt in checkpoint.dirpath (Lightning's rule); unresolved
        ``last`` is left to the Trainer when no dirpath is configured."""
        dirpath = (section.get("checkpoint") or {}).get("dirpath")
        if not dirpath:
            return "last"
        found = sorted(Path(dirpath).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
        if found:
            return str(found[-1])
        if subcommand == "fit":
            print(f"snlp: no last checkpoint in {dirpath}; training starts from step 0", file=sys.stderr)
            return ""
        raise CheckpointError(f"--ckpt_path last: there is no last*.ckpt in {dirpath}; train first (snlp fit) or pass a .ckpt path")


def trainer_defaults() -> dict:
    return {
        # Unset here: resolve_precision makes it bf16-mixed for a run on CUDA and 32-true for any
        # other (trainer.accelerator: cpu included, on a machine with CUDA); a config's trainer.precision wins.
        "precision": None,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "snlp"}},
    }


def run(args: list[str] | None = None) -> SNLPCLI:
    compat.check_lightning_cli_hooks()  # SNLPCLI overrides two private LightningCLI hooks
    return SNLPCLI(
        SNLPModule,
        TokenDataModule,
        trainer_defaults=trainer_defaults(),
        parser_class=OneLineParser,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def check_config_files(args: list[str]) -> None:
    """Each ``--config FILE`` must be UTF-8 YAML holding a mapping: one line naming the file and the
    line otherwise (jsonargparse reports a YAML error against "<unicode string>" and a binary file
    as a traceback)."""
    import yaml

    paths = [b for a, b in zip(args, args[1:]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in map(Path, paths):
        if not path.is_file():
            if path.exists():
                raise ConfigError(f"--config {path} is {path_kind(path)}, not a YAML file")
            continue  # jsonargparse: "File does not exist", or an inline YAML string
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"--config {path} is not UTF-8 text: give a YAML file") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"--config {path}{where}: {getattr(err, 'problem', None) or first_line(err)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"--config {path} holds a YAML {type(loaded).__name__}, not a mapping of settings")
        if loaded is None:
            raise ConfigError(f"--config {path} is empty: give a YAML file of settings (e.g. configs/quickstart.yaml)")


def _run(args: list[str] | None) -> SNLPCLI:
    check_config_files(list(sys.argv[1:] if args is None else args))
    return run(args)


def main(args: list[str] | None = None) -> int:
    """``snlp fit | validate ...`` (``snlp_lightning.__main__`` dispatches the other commands)."""
    # Lightning's MisconfigurationException is its "bad Trainer setting" error (an accelerator this
    # machine lacks, devices=0, ...): bad input, so one line and exit code 2.
    run_entry("snlp", _run, args, user_errors=(MisconfigurationException,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
