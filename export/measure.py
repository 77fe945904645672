"""Timing and quality measurements for the benchmark (one process, side by side).

Timings: ``warmup`` untimed calls, then ``iters`` timed calls with the device synchronised around
each; the median is reported. Quality: PPL of a plan on validation windows, and its top-1
agreement and logit cosine against the sequential model on the same windows.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from snlp_lightning.metrics import plan_metrics
from snlp_lightning.models import GPT
from snlp_lightning.solvers import SolverPlan, snlp_forward


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    return interleaved_ms({"fn": fn}, device, warmup, iters, rounds=1)["fn"]


def interleaved_ms(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, iters: int, rounds: int = 5
) -> dict[str, float]:
    """Median wall time in ms of each of ``fns``, timed in ``rounds`` round-robin passes of
    ``iters / rounds`` calls each (after ``warmup`` calls of each), so that a slow spell of a shared
    machine lands on every row instead of on one."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    rounds = max(1, min(rounds, iters))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        per_round = iters // rounds + (r < iters % rounds)
        for name, fn in fns.items():
            for _ in range(per_round):
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(times) for name, times in samples.items()}


def validation_windows(data_dir: str | Path, seq_len: int, max_tokens: int) -> Tensor:
    """(W, seq_len + 1) token windows from the val split of a prepared data dir, up to max_tokens targets.

    The folder goes through the same checks as TokenDataModule (manifest, val/index.json, every chunk
    file's size, enough tokens for one window): bad data is one DataError line naming the file.
    """
    from litdata import StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    from snlp_lightning.prepared import DataError, data_uri, read_manifest, read_split_index, require_windows

    data_dir = str(data_dir)
    read_manifest(data_dir)
    index = read_split_index(data_dir, "val")
    if index is not None:
        require_windows(data_dir, "val", index, seq_len)
    dataset = StreamingDataset(data_uri(data_dir, "val"), item_loader=TokensLoader(block_size=seq_len + 1))
    count = min(len(dataset), max(1, max_tokens // seq_len))
    if count == 0:  # a remote split with too few tokens (local ones are checked above)
        raise DataError(
            f"the val split of {data_dir} holds no window of seq_len + 1 = {seq_len + 1} tokens; use a smaller seq_len"
        )
    return torch.stack([dataset[i].long() for i in range(count)])


@torch.no_grad()
def quality(model: GPT, windows: Tensor, plans: list[SolverPlan], batch: int = 8) -> dict[str, dict[str, float]]:
    """Per plan (and "seq"): PPL, top-1 agreement and mean logit cosine vs sequential."""
    sums = {str(p): {"nll": 0.0, "top1": 0.0, "cosine": 0.0} for p in plans}
    seq_nll, count = 0.0, 0
    device = model.lm_head.weight.device
    for start in range(0, windows.size(0), batch):
        chunk = windows[start : start + batch].to(device)
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        reference = model(inputs)
        seq_nll += float(F.cross_entropy(reference.flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
        for plan in plans:
            logits = snlp_forward(model, inputs, plan, generator=torch.Generator().manual_seed(start))
            for name, value in plan_metrics(reference, logits, targets).items():
                sums[str(plan)][name] += float(value.sum())
    out = {"seq": {"ppl": math.exp(seq_nll / count), "top1": 1.0, "cosine": 1.0}}
    for plan, acc in sums.items():
        out[plan] = {"ppl": math.exp(acc["nll"] / count), "top1": acc["top1"] / count, "cosine": acc["cosine"] / count}
    return out
