"""``snlp eval``: the paper's evaluation protocol (spec section 7) on any checkpoint and text.

    snlp eval --checkpoint runs/quickstart/checkpoints/last.ckpt --data data/bundled \\
        --plans idn:n6:K1 idn:n6:3xF2:K2 --out eval/quickstart

One stream of validation tokens (a prepared folder's val split, a .txt / .jsonl file, a .parquet
shard such as nanochat's) is cut into fixed contexts of ``--seq-len`` + 1 tokens (default the
paper's 2048, capped at the model's ``sequence_len``), up to ``--tokens`` targets (default 1M),
and scored at batch 1, one context at a time, as the authors do. Per plan, against the sequential
model on the same contexts:

- PPL = exp(mean NLL over the targets);
- bits per byte = the NLL in bits over the UTF-8 bytes of the targets (special tokens excluded
  from both; nanochat's ``evaluate_bpb``): comparable across tokenizers;
- top-1 agreement and logit cosine with the sequential model, per token;
- the paper's speed: sequential ms / plan ms for one (1, T) forward, ``--warmup`` 50 and ``--iters``
  150 calls each, interleaved in one process; and the ideal L / (S + K).

Results go to OUT/eval.json (rewritten atomically every ``--save-every`` contexts, so an interrupted
run keeps what it scored) and OUT/eval.md. Run the same command again to resume: it continues from
the contexts already scored (the settings must match; ``--overwrite`` starts over).

``--generate 8 16 32 64`` adds greedy generation quality per plan (export/quality.py), and
``--speculative`` the self-speculative sweep of the first plan (acceptance, tokens per round,
measured against modelled speedup).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from snlp_lightning.errors import (
    ArgumentParser, UserError, atomic_write_text, check_writable_parent, clean_stale_temps, path_kind, run_entry,
)
from snlp_lightning.metrics import plan_metrics
from snlp_lightning.solvers import PlanError, SolverPlan, snlp_forward

PROG = "snlp eval"
FILES = ("eval.json", "eval.md")
FORMAT = "snlp-eval/1"  # eval.json's "format": what resume checks before reading it


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description="The paper's evaluation protocol: PPL, bits per byte, agreement and speed per plan.")
    p.add_argument("--checkpoint", required=True, help="a .ckpt from snlp fit, or a nanochat checkpoint (model_*.pt or its folder)")
    p.add_argument("--data", required=True, help="a prepared folder (its val split), or a .txt / .jsonl / .parquet file")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or nanochat's tokenizer.pkl (default: the checkpoint's or the data's)")
    p.add_argument("--plans", nargs="*", default=[], help="solver plans, e.g. idn:n24:K2 idn:n24:12xF2:K1 (seq is always scored)")
    p.add_argument("--seq-len", type=int, default=2048, help="context length T (default 2048, the paper's v2; capped at the model's sequence_len)")
    p.add_argument("--tokens", type=int, default=1_048_576, help="targets to score (default 1M)")
    p.add_argument("--out", required=True, help="output folder: eval.json, eval.md")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip the timing")
    p.add_argument("--warmup", type=int, default=50, help="untimed forwards per row before timing (default 50)")
    p.add_argument("--iters", type=int, default=150, help="timed forwards per row (default 150)")
    p.add_argument("--generate", type=int, nargs="*", default=[], help="greedy continuation lengths for generation quality, e.g. 8 16 32 64")
    p.add_argument("--prompts", type=int, default=8, help="prompts for --generate / --speculative (taken from the stream)")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--speculative", action="store_true", help="self-speculative sweep (draft length x temperature) of the first plan")
    p.add_argument("--draft-lens", type=int, nargs="+", default=[2, 4, 6, 8], help="--speculative: draft lengths D (default 2 4 6 8)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7, 1.0], help="--speculative: temperatures (default 0 0.7 1)")
    p.add_argument("--new-tokens", type=int, default=64, help="--speculative: tokens generated per prompt (default 64)")
    p.add_argument("--save-every", type=int, default=8, help="rewrite eval.json every this many contexts (default 8)")
    p.add_argument("--overwrite", action="store_true", help="start over when OUT holds an earlier eval with other settings")
    p.add_argument("--seed", type=int, default=0, help="seed of the DiagN probes and of sampling")
    return p


@dataclass
class Row:
    """Running sums of one row (a plan, or "seq") over the contexts scored so far."""

    nll: float = 0.0  # nats, every target
    tokens: int = 0
    nll_bytes: float = 0.0  # nats, targets with > 0 bytes
    bytes: int = 0
    top1: float = 0.0
    cosine: float = 0.0

    def add(self, nll: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor | None,
            top1: torch.Tensor, cosine: torch.Tensor) -> None:
        """nll: per target (T,) nats; targets (T,); top1, cosine: per target (T,)."""
        self.nll += float(nll.double().sum())
        self.tokens += targets.numel()
        if token_bytes is not None:
            counts = token_bytes[targets.cpu()]
            keep = counts > 0
            self.nll_bytes += float(nll.double().cpu()[keep].sum())
            self.bytes += int(counts.sum())
        self.top1 += float(top1.double().sum())
        self.cosine += float(cosine.double().sum())

    def summary(self) -> dict:
        n = max(self.tokens, 1)
        return {
            "ppl": math.exp(self.nll / n) if self.tokens else None,
            "bits_per_byte": self.nll_bytes / (math.log(2) * self.bytes) if self.bytes else None,
            "top1": self.top1 / n if self.tokens else None,
            "cosine": self.cosine / n if self.tokens else None,
            "tokens": self.tokens,
            "bytes": self.bytes,
        }


@dataclass
class State:
    """What eval.json holds: the settings, progress and running sums (resumable), the results."""

    settings: dict
    contexts_total: int = 0
    contexts_done: int = 0
    rows: dict[str, Row] = field(default_factory=dict)
    speed: dict = field(default_factory=dict)
    generation: list = field(default_factory=list)
    speculative: list = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "settings": self.settings, "contexts_total": self.contexts_total,
            "contexts_done": self.contexts_done, "complete": self.contexts_done == self.contexts_total,
            "rows": {name: asdict(row) for name, row in self.rows.items()},
            "results": {name: row.summary() for name, row in self.rows.items()},
            "speed": self.speed, "generation": self.generation, "speculative": self.speculative, "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: dict) -> "State":
        state = cls(settings=data["settings"], contexts_total=data["contexts_total"], contexts_done=data["contexts_done"],
                    speed=data.get("speed", {}), generation=data.get("generation", []),
                    speculative=data.get("speculative", []), seconds=data.get("seconds", 0.0))
        state.rows = {name: Row(**row) for name, row in data["rows"].items()}
        return state


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command (``prog`` names it in --help and error lines)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(prog).parse_args(argv)
    run_entry(prog, run, args)  # run returns the results (for the API); the command's exit code is 0
    return 0


def _check_args(args) -> list[SolverPlan]:
    for name in ("seq_len", "tokens", "iters", "prompts", "prompt_len", "save_every", "new_tokens"):
        value = getattr(args, name)
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value} is not allowed: must be a positive integer")
    if args.warmup < 0:
        raise UserError(f"--warmup {args.warmup} is not allowed: must be >= 0")
    if any(d < 1 for d in args.draft_lens) or any(not 0 <= t < float("inf") for t in args.temperatures):
        raise UserError(f"--draft-lens {args.draft_lens} / --temperatures {args.temperatures} are not allowed: "
                        "draft lengths >= 1, temperatures finite and >= 0")
    if any(n < 1 for n in args.generate):
        raise UserError(f"--generate {args.generate} is not allowed: lengths must be positive integers")
    plans = []
    for text in args.plans:
        plan = SolverPlan.parse(text)
        if plan.method != "seq" and str(plan) not in {str(p) for p in plans}:
            plans.append(plan)
    if args.speculative and not plans:
        raise UserError("--speculative drafts with the first plan: give --plans")
    return plans


def _check_out(path: str, settings: dict, overwrite: bool) -> tuple[Path, State | None]:
    """OUT may be new, or hold an earlier eval: the same settings resume it, others need --overwrite.
    A folder with other files named like ours (not written by snlp eval) is never touched."""
    out = Path(path).expanduser()
    kind = path_kind(out)
    if kind == "missing":
        check_writable_parent(out, "--out")
        return out, None
    if kind != "a folder":
        raise UserError(f"--out {out} is {kind}, not a folder: give a folder for {', '.join(FILES)}")
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out} is not writable (permission denied)")
    clean_stale_temps(out)
    saved = out / "eval.json"
    if not saved.exists():
        theirs = [name for name in FILES if (out / name).exists()]
        if theirs:
            raise UserError(f"--out {out} holds {', '.join(theirs)} but no eval.json of snlp eval: choose another folder")
        return out, None
    try:
        data = json.loads(saved.read_text(encoding="utf-8"))
        ours = isinstance(data, dict) and data.get("format") == FORMAT
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise UserError(f"--out {out} holds an eval.json that snlp eval did not write: choose another folder (nothing was replaced)")
    if data["settings"] == settings:
        return out, State.from_json(data)
    if not overwrite:
        changed = sorted(k for k in set(settings) | set(data["settings"]) if settings.get(k) != data["settings"].get(k))
        raise UserError(f"--out {out} holds an eval with other settings ({', '.join(changed)}): "
                        "run the same command to resume it, or pass --overwrite to start over")
    return out, None


def _tokenizer(args, checkpoint_tokenizer):
    from snlp_lightning.text import load_tokenizer, tokenizer_near

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    found = tokenizer_near(args.checkpoint)
    if found is None and checkpoint_tokenizer is not None and Path(checkpoint_tokenizer).is_file():
        found = load_tokenizer(checkpoint_tokenizer)
    if found is None and Path(args.data).is_dir() and (Path(args.data) / "tokenizer.json").is_file():
        found = load_tokenizer(Path(args.data) / "tokenizer.json")
    return found


def run(args) -> dict:
    """Score every context not yet scored, then time, then generate; returns eval.json's contents."""
    from snlp_lightning.text import fixed_contexts, token_stream

    from .checkpoint import load_model, parse_device, parse_dtype

    plans = _check_args(args)
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, checkpoint_tokenizer = load_model(args.checkpoint)
    cfg = model.config
    for plan in plans:
        plan.validate(cfg)
    seq_len = min(args.seq_len, cfg.sequence_len)
    tokenizer = _tokenizer(args, checkpoint_tokenizer)
    if tokenizer is None and not Path(args.data).is_dir():
        raise UserError(f"no tokenizer found for {args.checkpoint}: pass --tokenizer (tokenizer.json or nanochat's tokenizer.pkl)")
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}: "
                        "pass the tokenizer the model was trained with (--tokenizer)")
    settings = {
        "checkpoint": str(Path(args.checkpoint).expanduser().resolve()), "data": str(Path(args.data).expanduser().resolve()),
        "seq_len": seq_len, "tokens": args.tokens, "plans": [str(p) for p in plans], "dtype": str(dtype).removeprefix("torch."),
        "device": device.type, "seed": args.seed, "speed": args.speed, "warmup": args.warmup, "iters": args.iters,
        "generate": list(args.generate), "prompts": args.prompts, "prompt_len": args.prompt_len, "speculative": args.speculative,
        "draft_lens": list(args.draft_lens), "temperatures": list(args.temperatures), "new_tokens": args.new_tokens,
    }
    out, state = _check_out(args.out, settings, args.overwrite)
    stream = token_stream(args.data, tokenizer, args.tokens, seq_len)
    contexts = fixed_contexts(stream, seq_len, args.tokens)
    if int(contexts.max()) >= cfg.vocab_size:
        raise UserError(f"the data holds token id {int(contexts.max())}, the model's vocabulary ends at {cfg.vocab_size - 1}: "
                        "tokenize the data with the model's tokenizer")
    if state is None:
        state = State(settings=settings, contexts_total=contexts.size(0),
                      rows={name: Row() for name in ["seq", *settings["plans"]]})
    token_bytes = tokenizer.token_bytes if tokenizer is not None else None
    model = model.to(device=device, dtype=dtype).eval()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter() - state.seconds

    def save() -> None:
        state.seconds = time.perf_counter() - started
        atomic_write_text(out / "eval.json", json.dumps(state.to_json(), indent=1))
        atomic_write_text(out / "eval.md", markdown(state, cfg.n_layer))

    from tqdm.auto import tqdm

    with torch.no_grad(), tqdm(total=state.contexts_total, initial=state.contexts_done, desc="contexts",
                               unit="ctx", disable=None, file=sys.stderr) as bar:
        for i in range(state.contexts_done, state.contexts_total):
            window = contexts[i : i + 1].to(device)
            inputs, targets = window[:, :-1], window[:, 1:]
            reference = model(inputs)
            seq = F.cross_entropy(reference.flatten(0, 1).float(), targets.flatten(), reduction="none")
            ones = torch.ones_like(seq)
            state.rows["seq"].add(seq, targets.flatten(), token_bytes, ones, ones)
            for plan in plans:
                logits = snlp_forward(model, inputs, plan, generator=torch.Generator().manual_seed(args.seed + i))
                m = plan_metrics(reference.float(), logits.float(), targets)
                nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
                state.rows[str(plan)].add(nll, targets.flatten(), token_bytes, m["top1"], m["cosine"])
            state.contexts_done = i + 1
            bar.update(1)
            if state.contexts_done % args.save_every == 0:
                save()
    save()
    if args.speed and not state.speed:
        state.speed = measure_speed(model, contexts[:1, :-1].to(device), plans, device, args.warmup, args.iters)
        save()
    prompts = contexts[: args.prompts, : args.prompt_len]
    if args.generate and not state.generation:
        from .quality import match_rows

        for plan in plans:  # fused plans also against their chunk-sequential model
            state.generation += _jsonable(match_rows(model, plan, prompts.to(device), lengths=tuple(args.generate)))
        save()
    if args.speculative and not state.speculative:
        from .quality import speculative_sweep

        state.speculative = _jsonable(speculative_sweep(
            model, plans[0], prompts.to(device), draft_lens=tuple(args.draft_lens), temperatures=tuple(args.temperatures),
            new_tokens=args.new_tokens, seed=args.seed))
        save()
    print(markdown(state, cfg.n_layer))
    print(f"\n{PROG}: results in {out / 'eval.json'} and {out / 'eval.md'}")
    return state.to_json()


def measure_speed(model, inputs: torch.Tensor, plans: list[SolverPlan], device, warmup: int, iters: int) -> dict:
    """The paper's speed: ms of one (1, T) forward per row, interleaved; speedup = seq ms / plan ms."""
    from .measure import interleaved_ms

    fns = {"seq": lambda: model(inputs)}
    for plan in plans:
        fns[str(plan)] = lambda plan=plan: snlp_forward(model, inputs, plan, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ms = interleaved_ms(fns, device, warmup, iters)
    return {name: {"ms": value, "speedup": ms["seq"] / value} for name, value in ms.items()}


def markdown(state: State, n_layer: int) -> str:
    """The results table (and the generation tables, when there are any)."""
    s = state.settings
    lines = [
        f"{state.contexts_done} of {state.contexts_total} contexts of {s['seq_len']} tokens "
        f"({state.rows['seq'].tokens:,} targets), batch 1, {s['dtype']} on {s['device']}"
        + ("" if state.contexts_done == state.contexts_total else " (partial: run the command again to resume)"),
        "",
        "| plan | PPL | vs seq | bits/byte | top-1 agree | logit cosine | ms (1, T) | speedup | ideal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    seq = state.rows["seq"].summary()
    for name, row in state.rows.items():
        r = row.summary()
        ideal = 1.0 if name == "seq" else SolverPlan.parse(name).ideal_speedup(n_layer)
        speed = state.speed.get(name)
        vs = f"{100 * (r['ppl'] / seq['ppl'] - 1):+.2f}%" if r["ppl"] and seq["ppl"] else "-"
        lines.append(
            f"| {name} | {_num(r['ppl'], 3)} | {vs} | {_num(r['bits_per_byte'], 4)} | {_num(r['top1'], 4)} | "
            f"{_num(r['cosine'], 5)} | {_num(speed and speed['ms'], 2)} | "
            f"{_num(speed and speed['speedup'], 2, 'x')} | {ideal:.2f}x |"
        )
    if state.generation or state.speculative:
        from .quality import markdown as quality_markdown

        match = [{**row, "match": {int(n): v for n, v in row["match"].items()}} for row in state.generation]  # JSON keys are strings
        lines += ["", quality_markdown(match=match or None, sweep=state.speculative or None)]
    return "\n".join(lines)


def _jsonable(value):
    """Tensors and tuples inside the quality results as plain lists (eval.json is JSON)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _num(value, digits: int, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


__all__ = ["PlanError", "main", "markdown", "measure_speed", "run"]
