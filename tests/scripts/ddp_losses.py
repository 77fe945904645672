"""Train a tiny SNLP model for a few steps on a fixed global batch and write the losses.

    python tests/scripts/ddp_losses.py OUT.json --devices 2 --strategy ddp --global-batch 8
    python tests/scripts/ddp_losses.py OUT.json --devices 2 --strategy fsdp --ckpt OUT.ckpt
    python tests/scripts/ddp_losses.py OUT.json --devices 2 --strategy fsdp --resume LEG.ckpt

Every step trains on the same global batch (one batch per epoch), so a run resumed from a
checkpoint sees the data an uninterrupted run sees. With N devices each rank reads global_batch / N
of its rows (an unshuffled DistributedSampler), so the averaged gradient equals the single-process
one. After step 4 one validation (sequential + two solver plans) runs on a fixed validation
set; its table goes into OUT.json. ``--ckpt`` saves the final checkpoint (under FSDP one full file,
written by rank 0); ``--resume`` continues a run from a checkpoint up to ``--steps``.
``--strategy fsdp`` is ``BlockFSDPStrategy`` (one FSDP unit per Block). Gradients are clipped to norm
0.1 (below their norm, so clipping acts in every step). ``--optimizer``: ``adamw`` (default; torch's
Muon cannot run on FSDP shards) or ``muon_adamw``; the schedule spans 4 steps.
Run by tests/test_distributed.py in a subprocess: Lightning's launcher re-runs this script.
"""

from __future__ import annotations

import argparse
import json

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from snlp_lightning import make_config
from snlp_lightning.checkpoint_io import AtomicCheckpointIO
from snlp_lightning.module import SNLPModule
from snlp_lightning.optim import OptimConfig
from snlp_lightning.regularizer import RegularizerConfig
from snlp_lightning.strategy import BlockFSDPStrategy

VOCAB = 512  # the bundled corpus' tokenizer size, so `snlp validate` can read a checkpoint of this model
SEQ = 16
EVAL_PLANS = ["idn:n2:K1", "idn:n4:2xF2:K1"]


def tiny_module(optimizer: str = "adamw") -> SNLPModule:
    config = make_config("nanochat", n_layer=4, n_embd=32, n_head=2, n_kv_head=2, vocab_size=VOCAB, sequence_len=SEQ)
    return SNLPModule(
        config=config,
        regularizer=RegularizerConfig(lambda_idn=0.5, n_par_configs=[2, 3], stride=1, warmup_fraction=0.0),
        optim=OptimConfig(optimizer=optimizer, schedule_steps=4),
        eval_plans=EVAL_PLANS,
    )


class FixedTokens(Dataset):
    def __init__(self, rows: int, length: int, vocab: int, seed: int):
        self.data = torch.randint(0, vocab, (rows, length + 1), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i, :-1], self.data[i, 1:]


class FixedData(L.LightningDataModule):
    """Rank r of N reads rows r, r + N, ... of the global batch (an unshuffled DistributedSampler)."""

    def __init__(self, global_batch: int):
        super().__init__()
        self.global_batch = global_batch

    def _loader(self, data: Dataset) -> DataLoader:
        world = self.trainer.world_size
        sampler = DistributedSampler(data, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=self.global_batch // world, sampler=sampler)

    def train_dataloader(self):
        return self._loader(FixedTokens(self.global_batch, SEQ, VOCAB, seed=0))

    def val_dataloader(self):
        return self._loader(FixedTokens(self.global_batch * 2, SEQ, VOCAB, seed=1))


class RecordLoss(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(pl_module.all_gather(outputs["loss"].detach()).mean()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon_adamw"])
    args = parser.parse_args()
    L.seed_everything(0)
    module = tiny_module(args.optimizer)
    recorder = RecordLoss()
    strategy = "auto" if args.devices == 1 else BlockFSDPStrategy() if args.strategy == "fsdp" else "ddp"
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
        use_distributed_sampler=False, gradient_clip_val=0.1, check_val_every_n_epoch=4, num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=FixedData(args.global_batch), ckpt_path=args.resume)
    if args.ckpt:
        trainer.save_checkpoint(args.ckpt)  # every rank takes part (FSDP gathers the shards); rank 0 writes
    if trainer.is_global_zero:
        with open(args.out, "w") as f:
            json.dump({"losses": recorder.losses, "world_size": trainer.world_size, "table": module.last_table,
                       "tokens": module.last_tokens}, f)


if __name__ == "__main__":
    main()
