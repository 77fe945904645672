"""``snlp``: LightningCLI over SNLPModule + TokenDataModule.

    snlp fit --config configs/quickstart.yaml
    snlp fit --config configs/quickstart.yaml --ckpt_path last          # resume exactly
    snlp validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    snlp fit --config configs/quickstart.yaml --print_config            # every field, overridable
    snlp fit --config configs/quickstart.yaml --trainer.strategy fsdp --trainer.devices 2 --model.optim.optimizer adamw

Config errors, missing data and bad checkpoints end with one line on stderr (exit code 2), not a
traceback; set SNLP_TRACEBACK=1 to see the traceback.
"""

from __future__ import annotations

import os
import sys

import torch

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .checkpoint_io import AtomicCheckpointIO
from .strategy import BlockFSDPStrategy
from .config import ConfigError
from .data import DataError, TokenDataModule
from .models.gpt import TokenRangeError
from .models.nanochat_io import CheckpointError
from .module import SNLPModule, TrainingDiverged
from .solvers import PlanError

USER_ERRORS = (ConfigError, PlanError, CheckpointError, TokenRangeError, TrainingDiverged, DataError)


class SNLPCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 50})

    def _instantiate_trainer(self, config: dict, callbacks: list):
        """``trainer.strategy: fsdp`` means SNLP's FSDP: one unit per Block (``strategy.BlockFSDPStrategy``)."""
        if config.get("strategy") == "fsdp":
            config["strategy"] = BlockFSDPStrategy()
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        self.model.check_strategy(self.trainer.strategy, fitting=True)  # fail before other processes start

    def _parse_ckpt_path(self) -> None:
        """Take the model architecture (and only it) from the checkpoint given with --ckpt_path.

        Lightning's own version copies every saved hyperparameter over the command line; here the
        architecture must match the weights, while eval_plans, regularizer and optim stay the
        user's (so ``validate --ckpt_path X --model.eval_plans [...]`` sweeps plans). A missing
        or corrupt file is a CheckpointError naming it.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
        config = checkpoint.get("hyper_parameters", {}).get("config")
        if config:
            self.config = self.parser.parse_object({subcommand: {"model": {"config": config}}}, self.config)


def trainer_defaults() -> dict:
    return {
        # bf16 autocast where CUDA is, full fp32 on CPU (a config's trainer.precision wins).
        "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
        "plugins": [AtomicCheckpointIO()],
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "snlp"}},
    }


def run(args: list[str] | None = None) -> SNLPCLI:
    return SNLPCLI(
        SNLPModule,
        TokenDataModule,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    try:
        run(args)
    except USER_ERRORS as err:
        if os.environ.get("SNLP_TRACEBACK"):
            raise
        print(f"snlp: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
