"""``model.compile: true``: real torch.compile (inductor, CPU) of the training loss, one graph, no recompiles."""

from __future__ import annotations

import lightning as L
import torch
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, TensorDataset

from conftest import randomize
from snlp_lightning import make_config
from snlp_lightning.module import SNLPModule
from snlp_lightning.regularizer import RegularizerConfig


class RecordLoss(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def train(compile: bool, steps: int = 2) -> list[float]:
    """``steps`` steps of a 2-layer model (random weights, IDN + DiagN regularizer on from step 0) on one batch."""
    L.seed_everything(0)
    config = make_config("nanochat", n_layer=2, n_embd=32, n_head=2, n_kv_head=2, vocab_size=128, sequence_len=16)
    reg = RegularizerConfig(lambda_idn=0.5, lambda_diag=0.25, n_par_configs=[2], stride=1, warmup_fraction=0.0)
    module = SNLPModule(config=config, regularizer=reg, compile=compile)
    randomize(module.model)  # nanochat's zero-init projections give exactly-zero gradients whose Adam steps amplify noise
    rows = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(rows[:, :-1], rows[:, 1:]), batch_size=4)
    recorder = RecordLoss()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder], limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    return recorder.losses


def test_compiled_training_matches_eager_without_recompiles():
    eager = train(compile=False)
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):  # a new step (or probe seed) must not recompile
            compiled = train(compile=True)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
        assert counters["inductor"], "inductor did not compile the loss"
    finally:
        torch._dynamo.reset()
    assert len(eager) == len(compiled) == 2 and eager[0] - eager[1] > 0.1  # the step trained
    for a, b in zip(eager, compiled):
        assert abs(a - b) < 1e-4, (eager, compiled)
