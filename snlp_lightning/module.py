"""The LightningModule: nanochat / mHC training with the SNLP regularizer, and layer-parallel validation.

Training loss (spec section 4): CE of the sequential model + w(step) * regularizer, w ramping from 0
to 1 over the first ``warmup_fraction`` of the steps. Validation: sequential PPL, and for every plan
in ``eval_plans`` its PPL, top-1 agreement and logit cosine against the sequential logits.

Under FSDP (one unit per Block, ``strategy.BlockFSDPStrategy``) a block's weights are whole only
inside its own forward, so the regularizer evaluates its suffix blocks one ``model.block`` call each
(``per_block``), and validation runs the stacked solver plans on an unsharded copy of the model
gathered once per validation.
"""

from __future__ import annotations

import dataclasses
import math
import time

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric, SumMetric

from .config import ConfigError, ModelConfig
from .errors import Fault
from .models import GPT, build
from .metrics import plan_metrics
from .models.nanochat_io import CheckpointError
from .models.pretrained import load_pretrained
from .optim import OptimConfig, build_optimizer
from .regularizer import (
    JACOBI_SEED_OFFSET,
    RegularizerConfig,
    apply_spectral_norm,
    check_spectral_norm,
    diag_probes,
    jacobi_vectors,
    snlp_regularizer,
    warmup_weight,
)
from .solvers import SolverPlan, snlp_forward


class TrainingDiverged(Fault, FloatingPointError):
    """The training loss became NaN or infinite."""


def _metric_key(plan: SolverPlan) -> str:
    """A metric-name-safe key for a plan (ModuleDict keys may not contain '.')."""
    return str(plan).replace(":", "_").replace(".", "p").replace("=", "")


class SNLPModule(L.LightningModule):
    """Trains a nanochat or mHC model with the SNLP regularizer.

    Args:
        config: the model architecture (every field overridable: ``--model.config.n_layer 8``).
        regularizer: lambdas, ``n_par_configs``, stride, detach, warmup fraction (all lambdas 0 = baseline).
        optim: optimizer and schedule (nanochat's Muon + AdamW groups).
        eval_plans: solver plans measured at validation, e.g. ``["idn:n4:K1", "idn:n4:K2"]``.
        compile: ``torch.compile`` the training loss computation (CE + regularizer, forward and backward).
        init_from: a pretrained model to start from, its config replacing ``config``: a nanochat
            checkpoint (``model_*.pt`` with ``meta_*.json``) or a Hugging Face Llama / Qwen2 /
            Gemma 3 folder (``hf:PATH``, or any folder holding a config.json).
        probe_seed: seeds the DiagN regularizer probes (per step, so resumed runs draw the same probes).
    """

    def __init__(
        self,
        config: ModelConfig = ModelConfig(),
        regularizer: RegularizerConfig = RegularizerConfig(),
        optim: OptimConfig = OptimConfig(),
        eval_plans: list[str] = [],  # noqa: B006 - jsonargparse reads the default; never mutated
        compile: bool = False,
        init_from: str | None = None,
        probe_seed: int = 0,
    ):
        super().__init__()
        if init_from:
            self.model = load_pretrained(init_from)
            config = self.model.config
        else:
            self.model = build(config)
        self.config = config
        self.regularizer = regularizer.validate(config)
        if self.regularizer.spectral_norm:  # before the optimizer and any checkpoint load see the parameters
            apply_spectral_norm(self.model)
        self._spectral_checked = not self.regularizer.spectral_norm  # zero weights: checked at the first step
        self.optim_config = optim.validate()
        self.plans = [SolverPlan.parse(p).validate(config) for p in eval_plans]
        self.probe_seed = probe_seed
        self.init_from = init_from
        self.require_weights = False  # set by `snlp validate`: scoring without a checkpoint is an error
        self.save_hyperparameters(
            {
                "config": dataclasses.asdict(config),
                "regularizer": dataclasses.asdict(regularizer),
                "optim": dataclasses.asdict(optim),
                "eval_plans": [str(p) for p in self.plans],
                "compile": compile,
                "init_from": init_from,
                "probe_seed": probe_seed,
            }
        )
        self._losses = torch.compile(self._loss_graph) if compile else self._loss_graph
        self.per_block = False  # set in setup under FSDP: the regularizer calls each block's own forward
        self._full_model: GPT | None = None  # under FSDP, during validation: an unsharded copy
        self.val_ce = SumMetric()
        self.val_tokens = SumMetric()
        self.plan_ce = torch.nn.ModuleDict({_metric_key(p): SumMetric() for p in self.plans})
        self.plan_top1 = torch.nn.ModuleDict({_metric_key(p): MeanMetric() for p in self.plans})
        self.plan_cosine = torch.nn.ModuleDict({_metric_key(p): MeanMetric() for p in self.plans})
        self.last_table: list[dict] = []  # rows of the last validation's table
        self.last_tokens = 0
        self._step_start = None
        self._last_losses: tuple[torch.Tensor, torch.Tensor] | None = None  # (loss, CE) of the last step, for messages

    # -- data and strategy checks -----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_vocab = getattr(datamodule, "vocab_size", None)
        if data_vocab is not None and data_vocab > self.config.vocab_size:
            raise ConfigError(
                f"model vocab_size={self.config.vocab_size} is smaller than the data's tokenizer vocabulary "
                f"({data_vocab}); set model.config.vocab_size >= {data_vocab}"
            )
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and seq_len > self.config.sequence_len:
            raise ConfigError(f"data.seq_len={seq_len} exceeds model.config.sequence_len={self.config.sequence_len}")
        if self._trainer is not None:
            self.per_block = self.check_strategy(self.trainer.strategy, fitting=stage == "fit")

    def check_strategy(self, strategy, fitting: bool) -> bool:
        """True under FSDP (the regularizer then calls the blocks one by one); a ConfigError for
        settings FSDP cannot run. The CLI calls it before it starts the other processes."""
        if not isinstance(strategy, FSDPStrategy):
            return False
        if not strategy.kwargs.get("use_orig_params"):
            raise ConfigError(
                f"trainer.strategy {type(strategy).__name__} without use_orig_params=True is not supported: "
                "use --trainer.strategy fsdp (snlp_lightning.strategy.BlockFSDPStrategy)"
            )
        if fitting and self.optim_config.optimizer != "adamw":
            raise ConfigError(
                f"optim.optimizer={self.optim_config.optimizer!r} does not work under FSDP (Muon orthogonalises whole "
                "2-D matrices, FSDP shards them): set --model.optim.optimizer adamw"
            )
        return True

    # -- training ---------------------------------------------------------------------------------
    def compute_losses(self, inputs: torch.Tensor, targets: torch.Tensor, reg_weight: torch.Tensor, step: int) -> dict:
        """CE of the sequential model plus the weighted regularizer. inputs, targets: (B, T).

        The DiagN probes and the Jacobi vectors are drawn here from (probe_seed, step), outside the
        compiled graph (each from its own generator), so ``compile: true`` compiles once and does not
        recompile for every step. On a CPU run they are drawn on the CPU (the recorded numbers); on
        CUDA they are drawn on the device from a CUDA generator with the same seed (no host draw and
        copy of ~500 MB a step at paper size), so their values depend on the device type: a CUDA run
        draws other probes than a CPU run of the same seed, reproducibly from step to step and on resume.
        """
        if not self._spectral_checked:  # after any checkpoint load: all-zero weights would give NaN
            if not self.per_block:  # under FSDP each rank holds shards: not checked
                check_spectral_norm(self.model)
            self._spectral_checked = True
        probes = vectors = None
        shape = (*inputs.shape, self.config.n_streams, self.config.n_embd)
        device = inputs.device
        on_device = device if device.type == "cuda" else None  # CPU (and other devices): the CPU draw
        if self.regularizer.lambda_diag:
            gen = torch.Generator(device=on_device or "cpu").manual_seed(self.probe_seed * 1_000_003 + step)
            probes = diag_probes(shape, len(self.regularizer.n_par_list(self.config.n_layer)), gen, device=on_device).to(device)
        if self.regularizer.lambda_jacobi:
            gen = torch.Generator(device=on_device or "cpu").manual_seed(self.probe_seed * 1_000_003 + step + JACOBI_SEED_OFFSET)
            vectors = jacobi_vectors(shape, self.config.n_layer, gen, device=on_device).to(device)
        return self._losses(inputs, targets, reg_weight, probes, vectors)

    def _loss_graph(
        self, inputs: torch.Tensor, targets: torch.Tensor, reg_weight: torch.Tensor, probes: torch.Tensor | None, vectors: torch.Tensor | None = None
    ):
        """The compiled part of ``compute_losses``. probes: (len(n_par_configs), B, T, n, D) or None;
        vectors: the Jacobi regularizer's (n_layer, B, T, n, D) or None."""
        block_inputs, trace = self.model.forward_trace(inputs)
        hidden = self.model.hidden(trace[-1], trace[self.model.backout_layer + 1])
        ce = F.cross_entropy(self.model.logits(hidden).flatten(0, 1), targets.flatten())
        out = {"ce": ce, "loss": ce}
        # Multi-token prediction: head k predicts targets[:, k:] from positions :-k (not ramped by w(t)).
        for k, mtp_logits in enumerate(self.model.mtp_logits(hidden), start=1):
            out[f"mtp_{k}"] = F.cross_entropy(mtp_logits.flatten(0, 1), targets[:, k:].flatten())
            out["loss"] = out["loss"] + self.config.mtp_loss_weight * out[f"mtp_{k}"]
        ce_and_mtp = out["loss"]
        if self.regularizer.active:
            terms = snlp_regularizer(
                self.model, block_inputs, trace, self.regularizer, probes=probes, per_block=self.per_block, vectors=vectors
            )
            out["loss"] = ce_and_mtp + reg_weight * terms["total"]
            out.update({f"reg_{k}": v for k, v in terms.items()})
        return out

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        weight = warmup_weight(self.global_step, self.schedule_steps, self.regularizer.warmup_fraction)
        losses = self.compute_losses(inputs, targets, torch.tensor(weight, device=inputs.device), self.global_step)
        loss = losses["loss"]
        # Checked with the gradients in on_before_optimizer_step: there every rank sees the same
        # reduced gradients, so all ranks stop together (a stop on one rank would hang the others).
        self._last_losses = (loss.detach(), losses["ce"].detach())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ce", losses["ce"])
        self.log("train/reg", losses.get("reg_total", torch.zeros(())))
        self.log("train/reg_weight", weight)
        for k in range(1, self.config.num_mtp_steps + 1):
            self.log(f"train/mtp_{k}", losses[f"mtp_{k}"])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[-1]["lr"])
        # The values this step's update uses (the scheduler set them after the previous step).
        muon = next((g for g in self.trainer.optimizers[0].param_groups if g.get("kind") == "muon"), None)
        if muon is not None:
            self.log("train/muon_momentum", float(muon["momentum"]))
            self.log("train/weight_decay", float(muon["weight_decay"]))
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._step_start is not None:
            tokens = batch[0].numel() * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / max(time.perf_counter() - self._step_start, 1e-9))

    def on_before_optimizer_step(self, optimizer):
        """Log the gradient norm; stop before the update when the loss or a gradient is NaN / inf."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if self.per_block:  # FSDP: each rank holds a shard of every gradient; sum the squares over ranks
            squares = sum((g.float().square().sum() for g in grads), torch.zeros((), device=self.device))
            norm = self.trainer.strategy.reduce(squares, reduce_op="sum").sqrt()
        elif grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        else:
            return
        self.log("train/grad_norm", norm)
        # fp16 with a GradScaler expects inf gradients now and then: the scaler skips those steps.
        if getattr(self.trainer.precision_plugin, "scaler", None) is None and not torch.isfinite(norm):
            loss, ce = self._last_losses or (torch.tensor(float("nan")),) * 2
            raise TrainingDiverged(
                f"training diverged at step {self.global_step}: loss {loss.item():.6g} (CE {ce.item():.6g}), "
                f"gradient norm {norm.item()}; no update was applied and the last checkpoint is intact"
            )

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """The optimizer step, then a check that the weights are still finite, before any callback
        (the checkpoint) sees them: finite gradients times a large learning rate can still overflow."""
        step = self.global_step
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finite = torch.stack([torch.isfinite(p).all() for p in self.parameters()]).all()
        bad = (~finite).float()
        if self.per_block:  # FSDP: every rank checks its shards; stop all ranks together
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bool(bad > 0):
            raise TrainingDiverged(
                f"training diverged at step {step}: the optimizer step made weights NaN/inf "
                f"(lower the learning rates); nothing was saved after it, the last checkpoint is intact"
            )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Norm clipping under FSDP goes through the root FSDP unit (the norm over all shards)."""
        if self.per_block and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @property
    def schedule_steps(self) -> int:
        """Steps of the LR schedule and the regularizer ramp (optim.schedule_steps or max_steps)."""
        return self.optim_config.schedule_steps or max(int(self.trainer.estimated_stepping_batches), 1)

    def configure_optimizers(self):
        # Tokens per optimizer step over all ranks, for the batch-size LR / weight-decay scaling
        # (None when the batch or the sequence length is unknown: build_optimizer then refuses them).
        datamodule = getattr(self.trainer, "datamodule", None)
        batch, seq_len = getattr(datamodule, "batch_size", None), getattr(datamodule, "seq_len", None)
        tokens_per_step = None
        if isinstance(batch, int) and isinstance(seq_len, int):
            tokens_per_step = self.trainer.world_size * batch * self.trainer.accumulate_grad_batches * seq_len
        optimizer, scheduler = build_optimizer(self.model, self.optim_config, self.schedule_steps, tokens_per_step=tokens_per_step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation -------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint whose weights do not fit its model: one line naming what differs (Lightning's
        own load would raise a multi-line RuntimeError)."""
        if self.per_block:  # under FSDP the module's own state dict holds sharded names; the strategy checks
            return
        expected, got = self.state_dict(), checkpoint.get("state_dict", {})
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        shapes = [f"{k} {tuple(got[k].shape)} (model: {tuple(v.shape)})" for k, v in expected.items()
                  if k in got and hasattr(got[k], "shape") and tuple(got[k].shape) != tuple(v.shape)]
        if missing or unexpected or shapes:
            parts = [f"{label}: {', '.join(items[:3])}" + (f" ... ({len(items)} in all)" if len(items) > 3 else "")
                     for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items]
            raise CheckpointError(f"checkpoint {self.trainer.ckpt_path} does not fit its model config ({'; '.join(parts)})")

    def on_validation_start(self):
        # The Trainer knows which checkpoint it restored only now (after setup).
        if self.require_weights and self.trainer.state.fn == "validate" and self.trainer.ckpt_path is None and not self.init_from:
            raise CheckpointError(
                "snlp validate found no checkpoint to score (an untrained model would be scored): "
                "pass --ckpt_path PATH.ckpt, or --model.init_from for a nanochat checkpoint or a Hugging Face folder"
            )

    def on_validation_epoch_start(self):
        if self.per_block and self.plans:
            self.__dict__["_full_model"] = self._gather_full_model()  # not a registered submodule: no state-dict keys

    def _gather_full_model(self) -> GPT:
        """Under FSDP: this rank's unsharded copy of the model (the stacked plans read all blocks at once)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(self.trainer.model, writeback=False), torch.no_grad():
            state = {name.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for name, p in self.model.named_parameters()}
        with torch.device(self.device):
            full = build(self.config)
        full.load_state_dict(state)
        return full.to(self.model.transformer.wte.weight.dtype).eval()

    def validation_step(self, batch, batch_idx):
        inputs, targets = batch
        model = self.model if self._full_model is None else self._full_model
        reference = model(inputs)
        self.val_ce.update(F.cross_entropy(reference.flatten(0, 1), targets.flatten(), reduction="sum"))
        self.val_tokens.update(torch.tensor(float(targets.numel()), device=inputs.device))
        for plan in self.plans:
            key = _metric_key(plan)
            gen = torch.Generator().manual_seed(self.probe_seed + batch_idx)
            logits = snlp_forward(model, inputs, plan, generator=gen)
            metrics = plan_metrics(reference, logits, targets)
            self.plan_ce[key].update(metrics["nll"])
            self.plan_top1[key].update(metrics["top1"])
            self.plan_cosine[key].update(metrics["cosine"])

    def on_validation_epoch_end(self):
        self._full_model = None
        tokens = self.val_tokens.compute()
        if float(tokens) == 0:
            return
        seq_ppl = math.exp(float(self.val_ce.compute() / tokens))
        self.log("val/ppl", seq_ppl, prog_bar=True, sync_dist=False)
        rows = [dict(plan="seq", ppl=seq_ppl, delta=0.0, top1=1.0, cosine=1.0, ideal=1.0)]
        for plan in self.plans:
            key = _metric_key(plan)
            ppl = math.exp(float(self.plan_ce[key].compute() / tokens))
            top1, cosine = float(self.plan_top1[key].compute()), float(self.plan_cosine[key].compute())
            self.log(f"val/{key}/ppl", ppl)
            self.log(f"val/{key}/top1", top1)
            self.log(f"val/{key}/cosine", cosine)
            rows.append(dict(plan=str(plan), ppl=ppl, delta=ppl / seq_ppl - 1, top1=top1, cosine=cosine, ideal=plan.ideal_speedup(self.config.n_layer)))
        for metric in [self.val_ce, self.val_tokens, *self.plan_ce.values(), *self.plan_top1.values(), *self.plan_cosine.values()]:
            metric.reset()
        self.last_table, self.last_tokens = rows, int(tokens)
        if self.trainer.state.fn == "validate" and not self.trainer.sanity_checking:
            rank_zero_info(format_table(rows, int(tokens), self.config.n_layer))


def format_table(rows: list[dict], tokens: int, n_layer: int) -> str:
    lines = [
        f"\nSequential vs layer-parallel on {tokens} validation tokens (L = {n_layer}):\n",
        "| plan | PPL | vs seq | top-1 agree | logit cosine | ideal speedup |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['plan']} | {r['ppl']:.3f} | {100 * r['delta']:+.1f}% | {r['top1']:.3f} | {r['cosine']:.4f} | {r['ideal']:.2f}x |")
    return "\n".join(lines)
