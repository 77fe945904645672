"""Train a tiny SNLP model for a few steps on a fixed token set and write the global-batch losses.

    python tests/scripts/ddp_losses.py OUT.json --devices 2 --global-batch 8

With N devices each rank sees global_batch / N rows of every global batch (an unshuffled
DistributedSampler), so the DDP-averaged gradient equals the single-process one.
Run by tests/test_distributed.py in a subprocess: Lightning's DDP launcher re-runs this script.
"""

from __future__ import annotations

import argparse
import json

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from snlp_lightning import make_config
from snlp_lightning.module import SNLPModule
from snlp_lightning.regularizer import RegularizerConfig


class FixedTokens(Dataset):
    def __init__(self, rows: int, length: int, vocab: int):
        self.data = torch.randint(0, vocab, (rows, length + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i, :-1], self.data[i, 1:]


class FixedData(L.LightningDataModule):
    """Rank r of N reads rows r, r + N, ... of each global batch (an unshuffled DistributedSampler)."""

    def __init__(self, global_batch: int, steps: int):
        super().__init__()
        self.global_batch, self.steps = global_batch, steps

    def train_dataloader(self):
        data = FixedTokens(self.global_batch * self.steps, 16, 128)
        world = self.trainer.world_size
        sampler = DistributedSampler(data, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=self.global_batch // world, sampler=sampler)


class RecordLoss(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(pl_module.all_gather(outputs["loss"].detach()).mean()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    L.seed_everything(0)
    config = make_config("nanochat", n_layer=4, n_embd=32, n_head=2, n_kv_head=2, vocab_size=128, sequence_len=16)
    module = SNLPModule(config=config, regularizer=RegularizerConfig(lambda_idn=0.5, n_par_configs=[2, 3], stride=1, warmup_fraction=0.0))
    recorder = RecordLoss()
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=args.strategy if args.devices > 1 else "auto",
        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder], use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=FixedData(args.global_batch, args.steps))
    if trainer.is_global_zero:
        with open(args.out, "w") as f:
            json.dump({"losses": recorder.losses, "world_size": trainer.world_size}, f)


if __name__ == "__main__":
    main()
