"""FSDP for SNLP models: one FSDP unit per Block, a single-file checkpoint that loads on one device.

    snlp fit --config configs/quickstart.yaml --trainer.strategy fsdp --trainer.devices 2 \
         --model.optim.optimizer adamw                                              # 2 CPU processes (gloo)
    snlp fit --config configs/paper-0.5b.yaml --trainer.strategy fsdp --trainer.devices 8 \\
         --model.optim.optimizer adamw

``--trainer.strategy fsdp`` in the ``snlp`` CLI selects ``BlockFSDPStrategy``. The module notices
FSDP in ``setup`` and switches the regularizer to per-block calls (``SNLPModule.per_block``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, OptimStateKeyType, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from . import compat
from .models import FAMILIES

BLOCK_TYPES = {family.block_type for family in FAMILIES.values()}  # every family's block module


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy (torch FSDP1) with SNLP's settings.

    - ``auto_wrap_policy=BLOCK_TYPES``: one FSDP unit per Transformer block of any family; embeddings, head and the
      per-layer scalars live in the root unit (whole during every training / validation step).
    - ``use_orig_params=True``: the optimizer's per-parameter groups (nanochat's learning rates) and
      the frozen parameters kept for nanochat's state-dict layout need the original parameters.
    - ``state_dict_type="full"``: rank 0 writes one ordinary ``.ckpt`` through the trainer's
      CheckpointIO (atomic writes), which a single process loads like any other checkpoint.
    - The saved optimizer state is keyed like a single-process run's, so checkpoints move freely
      between FSDP and single-process runs (resume included).
    - CPU processes (gloo) work too: Lightning's FSDPStrategy refuses ``accelerator=cpu`` only for
      its own class, torch's FSDP needs an explicit CPU ``device_id`` there, and full state dicts
      are gathered without ``offload_to_cpu`` (on CPU that option frees the gathered parameters
      while the state dict still points at them, and saving crashes).

    Every other argument is FSDPStrategy's (``sharding_strategy``, ``cpu_offload``, ...).
    """

    def __init__(self, state_dict_type: str = "full", **kwargs: Any):
        kwargs.setdefault("auto_wrap_policy", BLOCK_TYPES)
        kwargs.setdefault("use_orig_params", True)
        compat.check_fsdp_strategy_hooks()  # _setup_model below overrides a private hook
        super().__init__(state_dict_type=state_dict_type, **kwargs)

    @property
    def _full(self) -> bool:
        return self._state_dict_type == "full"

    def _full_state_dict(self, rank0_only: bool) -> AbstractContextManager:
        """FSDP's full state-dict mode; gathered tensors go to the CPU, except on CPU processes
        (there ``offload_to_cpu`` frees the gathered parameters the state dict still points at)."""
        offload = self.root_device.type != "cpu"
        return FSDP.state_dict_type(
            self.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
        )

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        model = FSDP(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        move_torchmetrics_to_device, setup_activation_checkpointing = compat.lightning_fsdp_helpers()
        move_torchmetrics_to_device(model, self.root_device)
        setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self._full:
            return super().lightning_module_state_dict()
        with self._full_state_dict(rank0_only=True):
            return self.model.state_dict()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """Rank 0: the optimizer state as a single-process run saves it (keys = indices in the order of
        the optimizer's param_groups; Lightning's version numbers them in ``model.parameters()``
        order, which is not the order of nanochat's groups)."""
        if not self._full:
            return super().optimizer_state(optimizer)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with self._full_state_dict(rank0_only=True):
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank != 0:
                return state
            return FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model, optim=optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """A full (single-file) checkpoint, from an FSDP or a single-process run, through the CheckpointIO."""
        path = Path(self.broadcast(checkpoint_path))
        if not (self._full and path.is_file()):
            return super().load_checkpoint(path, weights_only)
        checkpoint = self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
        with self._full_state_dict(rank0_only=False):
            self.model.load_state_dict(checkpoint.pop("state_dict"), strict=self.lightning_module.strict_loading)
            if self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
                for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
                    state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model, optim=optimizer)
                    optimizer.load_state_dict(FSDP.optim_state_dict_to_load(self.model, optimizer, state))
        return checkpoint
