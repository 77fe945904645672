"""Why does a plan fail? Per-layer IDN errors and block spectral radii over depth.

    errors = idn_layer_errors(model, idx, n_par)      # per parallel layer: rel_err, abs_err of K = 1 IDN
    radii = spectral_radius(model, idx)               # per block: power-iteration |lambda_max| of dF/dh
    plot_depth(errors, radii, "diagnose.png")

    snlp diagnose --checkpoint CKPT --data SOURCE --n-par N [--tokens 4096] [--seq-len 512] [--out DIR]

Both quantities are the authors' diagnostics (``compute_per_layer_idn_error`` and
``estimate_spectral_radius`` of phymhan/nanochat-snlp's ``snlp/inference_idn.py``), computed here
only through the family interface (``model.forward_trace``, ``model.block``), so every family works.
A layer whose blocks expand (radius well above 1) makes the identity surrogate's error grow along
the suffix; the IDN error curve shows where K = 1 stops being good enough.

Unlike the authors' batched code, the blocks here attend with the model's own sliding windows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import ArgumentParser, UserError, at_least, atomic_write_text, path_kind, run_entry, save_figure

PROG = "snlp diagnose"
FILES = ("diagnose.md", "diagnose.json", "diagnose.png")
BATCH = 8  # windows per call of the command


# -- the two diagnostics -----------------------------------------------------------------------------
@torch.no_grad()
def idn_layer_errors(model, idx: Tensor, n_par: int) -> list[dict]:
    """Per parallel layer (the last ``n_par``), the error of the K = 1 IDN iterate from h0 init.

    With S = L - N, h_init = the sequential state after block S (the embedding when N = L), the
    iterate of parallel layer j is ``h_init + sum_{i<=j} (F_i(h_init) - h_init)`` (every block
    evaluated at h_init, corrected by the cumulative sum). Against the sequential state h_seq of
    that layer: ``rel_err`` = mean over (batch, time, stream) of ||h_idn - h_seq|| / max(||h_seq||,
    1e-6), norms over the model width, ``abs_err`` = the mean of ||h_idn - h_seq||. The first
    parallel layer is exact (0). Returns [{"layer", "rel_err", "abs_err"}, ...] in depth order.
    """
    n_layer = model.config.n_layer
    if not 1 <= n_par <= n_layer:
        raise UserError(f"n_par={n_par} is not allowed: 1..{n_layer} (the model's layers)")
    inputs, trace = model.forward_trace(idx)
    start = n_layer - n_par
    h_init = trace[start]
    h_idn, rows = h_init, []
    for layer in range(start, n_layer):
        h_idn = h_idn + (model.block(layer, h_init, inputs)[0] - h_init)
        h_seq = trace[layer + 1]
        wide = torch.promote_types(h_seq.dtype, torch.float32)  # float32 at least, float64 stays
        diff = (h_idn.to(wide) - h_seq.to(wide)).norm(dim=-1)  # (B, T, n)
        ref = h_seq.to(wide).norm(dim=-1).clamp(min=1e-6)
        rows.append({"layer": layer, "rel_err": float((diff / ref).mean()), "abs_err": float(diff.mean())})
    return rows


def power_iteration(fn, h: Tensor, iters: int = 10, generator: torch.Generator | None = None) -> float:
    """Per-token power iteration on the Jacobian of ``fn`` at h (B, T, ...): JVPs only.

    v starts Gaussian (drawn on the CPU by ``generator``), normalised per token (over every axis
    after (B, T)); each step v <- Jv / ||Jv|| per token; returns the mean over tokens of ||Jv|| at
    the last step. On a single token this is the ordinary power iteration: it converges to the
    largest |eigenvalue| when that one is real and well separated (at the rate |lambda_2 / lambda_1|).
    """
    if iters < 1:
        raise UserError(f"iters={iters} is not allowed: the power iteration needs at least 1 step")
    h = h.detach().clone()  # a dense tensor (a broadcast view cannot carry a tangent)
    axes = tuple(range(2, h.dim()))

    def unit(v: Tensor) -> Tensor:
        return v / v.norm(dim=axes, keepdim=True).clamp(min=1e-12)

    v = unit(torch.randn(h.shape, generator=generator, dtype=h.dtype).to(h.device))
    sigma = None
    for _ in range(iters):
        # Forward-mode AD through attention exists only in SDPA's math kernel.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            jv = torch.func.jvp(fn, (h,), (v,))[1]
        sigma = jv.norm(dim=axes)  # (B, T)
        v = unit(jv)
    return float(sigma.mean())


def spectral_radius(model, idx: Tensor, layers=None, iters: int = 10, generator: torch.Generator | None = None) -> list[float]:
    """Per block (``layers``, default all), the power-iteration estimate of the spectral radius of
    its Jacobian dF_l/dh at its sequential input h_l (the state before its lambda blend; F_l
    includes the blend, as the solvers' F does).

    What it estimates: the largest |eigenvalue| of the (B T n D)-square Jacobian, normalised per
    token: attention makes the Jacobian block lower-triangular over time, so its eigenvalues are
    those of the per-token diagonal blocks, and with v normalised per token each token's ||Jv||
    tends to the largest |eigenvalue| reachable at that token; the estimate is the mean over
    tokens after ``iters`` steps (the authors' per-token normalisation and mean). Computed with
    exact JVPs (``torch.func.jvp``), so it differs from the authors' finite-difference version
    (||F(h + eps v) - F(h)|| / eps with eps = 0.1) by that version's finite-difference error.
    On CUDA the blocks must take forward-mode AD: attention runs on SDPA's math kernel; sliding
    windows there go through flex attention, which has none (use full windows or the CPU).
    """
    n_layer = model.config.n_layer
    layers = list(range(n_layer)) if layers is None else [int(l) for l in layers]
    for layer in layers:
        if not 0 <= layer < n_layer:
            raise UserError(f"layer {layer} is out of range: 0..{n_layer - 1}")
    with torch.no_grad():
        inputs, trace = model.forward_trace(idx)
    radii = []
    for layer in layers:
        # A private input cache, so nothing built inside the transform is kept outside it.
        def block(x: Tensor, layer=layer) -> Tensor:
            return model.block(layer, x, inputs.private())[0]

        radii.append(power_iteration(block, trace[layer], iters, generator))
    return radii


# -- the picture -------------------------------------------------------------------------------------
def plot_depth(errors: list[dict], radii: list[float], path, layers=None) -> None:
    """One PNG: IDN relative error (log scale; the exact first parallel layer left out) and spectral
    radius, both over depth.

    ``errors`` as from ``idn_layer_errors``; ``radii`` per layer of ``layers`` (default 0 .. len - 1).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(len(radii))) if layers is None else list(layers)
    fig, left = plt.subplots(figsize=(6, 4), dpi=120)
    left.plot(layers, radii, "o-", color="tab:blue", label="spectral radius")
    left.axhline(1.0, color="tab:blue", alpha=0.3, linestyle=":")
    left.set_xlabel("layer")
    left.set_ylabel("spectral radius of dF/dh", color="tab:blue")
    right = left.twinx()
    shown = errors[1:]  # the first parallel layer is exact (its input h_init is): 0 has no place on a log axis
    if shown:
        right.plot([e["layer"] for e in shown], [max(e["rel_err"], 1e-12) for e in shown], "s-", color="tab:red",
                   label="IDN K=1 relative error")
        right.set_yscale("log")
        left.set_title(f"N = {len(errors)} parallel layers (from layer {errors[0]['layer']}, exact)", fontsize=8)
    right.set_ylabel("IDN K=1 relative error", color="tab:red")
    left.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# -- the command -------------------------------------------------------------------------------------
def build_parser(prog: str = PROG) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Per-layer IDN errors and block spectral radii of a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a .ckpt from snlp fit, or a nanochat checkpoint")
    p.add_argument("--data", required=True, help="text to evaluate on (a prepared data folder: its val split)")
    p.add_argument("--n-par", type=at_least(1), required=True, help="N, the number of parallel (last) layers")
    p.add_argument("--tokens", type=at_least(1), default=4096, help="tokens to average over")
    p.add_argument("--seq-len", type=at_least(1), default=512, help="context length of each window (capped at the model's)")
    p.add_argument("--iters", type=at_least(1), default=10, help="power-iteration steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the power iteration's start vectors")
    p.add_argument("--out", default="diagnose", help="output folder (diagnose.md, diagnose.json, diagnose.png)")
    return p


def _windows(source: str, checkpoint: str, seq_len: int, max_tokens: int) -> Tensor:
    """(W, seq_len + 1) token windows of any source ``snlp eval`` reads (snlp_lightning/text.py):
    a prepared folder's val split, a .txt / .jsonl / .parquet file, tokenized with the checkpoint's
    tokenizer (or, for a prepared folder, its own)."""
    from . import text

    tokenizer = text.tokenizer_near(checkpoint)
    if tokenizer is None and Path(source).is_dir() and (Path(source) / "tokenizer.json").is_file():
        tokenizer = text.load_tokenizer(Path(source) / "tokenizer.json")
    if tokenizer is None:
        raise UserError(f"--data {source}: no tokenizer found for {checkpoint} to encode it")
    stream = text.token_stream(source, tokenizer, max_tokens, seq_len)
    return text.fixed_contexts(stream, seq_len, max_tokens)


def _check_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is {path_kind(out)}; give a folder")
    for name in FILES:
        if (out / name).exists() and not (out / name).is_file():
            raise UserError(f"--out {out} holds {name} as {path_kind(out / name)}, where {PROG} writes a file: choose another folder")
    own = out / "diagnose.json"
    if own.exists():
        try:
            ok = "idn" in json.loads(own.read_text(encoding="utf-8")).get("header", {}).get("diagnostics", [])
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise UserError(f"--out {out} holds a diagnose.json that {PROG} did not write: choose another folder (nothing was replaced)")
    elif any((out / name).exists() for name in FILES):
        raise UserError(f"--out {out} holds diagnose files but no diagnose.json of {PROG}: choose another folder (nothing was replaced)")
    return out


def report(results: dict) -> str:
    h = results["header"]
    lines = [
        "# SNLP diagnostics", "",
        f"checkpoint `{h['checkpoint']}`, data `{h['data']}`: {h['windows']} window(s) of {h['seq_len']} tokens; "
        f"N = {h['n_par']} of L = {h['n_layer']} layers parallel; {h['iters']} power-iteration steps.", "",
        "| layer | parallel | spectral radius | IDN K=1 rel. error | IDN K=1 abs. error |",
        "|---:|:---:|---:|---:|---:|",
    ]
    errors = {e["layer"]: e for e in results["idn"]}
    for layer, radius in enumerate(results["spectral_radius"]):
        e = errors.get(layer)
        cells = ("yes", f"{e['rel_err']:.4g}", f"{e['abs_err']:.4g}") if e else ("", "", "")
        lines.append(f"| {layer} | {cells[0]} | {radius:.4f} | {cells[1]} | {cells[2]} |")
    return "\n".join(lines) + "\n"


def run(args, command: str = PROG) -> str:
    from export.checkpoint import load_model

    out = _check_out(Path(args.out).expanduser())
    model, _ = load_model(args.checkpoint)
    cfg = model.config
    if args.n_par > cfg.n_layer:
        raise UserError(f"--n-par {args.n_par} is not allowed: 1..{cfg.n_layer} (the model's layers)")
    seq_len = min(args.seq_len, cfg.sequence_len)
    windows = _windows(args.data, args.checkpoint, seq_len, args.tokens)
    idx = windows[:, :-1].contiguous()
    # Means over the windows, a few at a time (weighted by their count).
    n = idx.size(0)
    errors, radii = None, None
    generator = torch.Generator().manual_seed(args.seed)
    for rows in idx.split(BATCH):
        w = rows.size(0) / n
        e = idn_layer_errors(model, rows, args.n_par)
        r = spectral_radius(model, rows, iters=args.iters, generator=generator)
        if errors is None:
            errors = [{**b, "rel_err": 0.0, "abs_err": 0.0} for b in e]
            radii = [0.0] * len(r)
        for a, b in zip(errors, e):
            a["rel_err"] += w * b["rel_err"]
            a["abs_err"] += w * b["abs_err"]
        radii = [a + w * b for a, b in zip(radii, r)]
    results = {
        "header": {"command": command, "checkpoint": str(args.checkpoint), "data": str(args.data), "n_par": args.n_par,
                   "n_layer": cfg.n_layer, "seq_len": seq_len, "windows": n, "iters": args.iters, "seed": args.seed,
                   "diagnostics": ["idn", "spectral_radius"]},
        "idn": errors,
        "spectral_radius": radii,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "diagnose.json", json.dumps(results, indent=2) + "\n")
    text = report(results)
    atomic_write_text(out / "diagnose.md", text)
    plot_depth(errors, radii, out / "diagnose.png")
    return text


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command (``prog`` names it in --help and error lines)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(prog).parse_args(argv)
    return run_entry(prog, lambda: print(run(args, command=f"{prog} " + " ".join(argv))))


if __name__ == "__main__":
    raise SystemExit(main())
