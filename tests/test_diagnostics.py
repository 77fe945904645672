"""snlp_lightning.diagnostics: per-layer IDN errors, spectral radii, the plot and the command."""

from __future__ import annotations

import json

import pytest
import torch

import reference
from conftest import tiny_model, tokens
from snlp_lightning import diagnostics
from snlp_lightning.diagnostics import idn_layer_errors, plot_depth, power_iteration, spectral_radius


def hand_idn_errors(model, idx, n_par):
    """The K = 1 IDN iterate written out with tests/reference.py's blocks."""
    x0 = reference.embed(model, idx)
    trace = [x0]
    for layer in range(model.config.n_layer):
        trace.append(reference.block(model, layer, trace[-1], x0, idx))
    start = model.config.n_layer - n_par
    h_init = trace[start]
    increments = torch.stack([reference.block(model, l, h_init, x0, idx) - h_init for l in range(start, model.config.n_layer)])
    iterates = h_init + torch.cumsum(increments, 0)
    rows = []
    for j, layer in enumerate(range(start, model.config.n_layer)):
        diff = (iterates[j] - trace[layer + 1]).norm(dim=-1)
        ref = trace[layer + 1].norm(dim=-1).clamp(min=1e-6)
        rows.append({"layer": layer, "rel_err": float((diff / ref).mean()), "abs_err": float(diff.mean())})
    return rows


@pytest.mark.parametrize("preset", ["plain", "nanochat", "mhc"])
@pytest.mark.parametrize("n_par", [3, 6])
def test_idn_layer_errors_match_a_hand_computation(preset, n_par):
    model = tiny_model(preset)
    idx = tokens(2, 10)
    with torch.no_grad():
        got = idn_layer_errors(model, idx, n_par)
        want = hand_idn_errors(model, idx, n_par)
    assert [r["layer"] for r in got] == list(range(6 - n_par, 6))
    assert got[0]["rel_err"] < 1e-12 and got[0]["abs_err"] < 1e-12  # the first parallel layer is exact
    for g, w in zip(got, want):
        assert g["rel_err"] == pytest.approx(w["rel_err"], rel=1e-9, abs=1e-12)
        assert g["abs_err"] == pytest.approx(w["abs_err"], rel=1e-9, abs=1e-12)
    assert got[-1]["rel_err"] > 1e-3  # the later layers really carry an error
    with pytest.raises(ValueError, match="n_par"):
        idn_layer_errors(model, idx, 7)


def test_power_iteration_on_a_linear_map_is_exact():
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    p = q + 0.3 * torch.randn(6, 6, dtype=torch.float64)  # a non-orthogonal eigenbasis
    m = p @ torch.diag(torch.tensor([-3.0, 1.0, 0.5, 0.2, -0.1, 0.05], dtype=torch.float64)) @ torch.linalg.inv(p)
    h = torch.randn(2, 5, 1, 6, dtype=torch.float64)
    est = power_iteration(lambda x: x @ m.T, h, iters=60, generator=torch.Generator().manual_seed(1))
    assert est == pytest.approx(3.0, rel=1e-10)


@pytest.mark.parametrize("preset", ["plain", "nanochat"])
def test_spectral_radius_of_a_single_token_matches_the_dense_jacobian(preset):
    model = tiny_model(preset)
    idx = tokens(1, 1)
    with torch.no_grad():
        inputs, trace = model.forward_trace(idx)
    # The layer whose dominant eigenvalue is best separated (the power iteration's rate).
    best = None
    for layer in range(model.config.n_layer):
        fn = lambda x, layer=layer: model.block(layer, x, inputs)[0]  # noqa: E731
        h = trace[layer].clone()
        jac = torch.autograd.functional.jacobian(fn, h).reshape(h.numel(), h.numel())
        mags = torch.linalg.eigvals(jac).abs().sort(descending=True).values
        ratio = float(mags[1] / mags[0])
        if best is None or ratio < best[1]:
            best = (layer, ratio, float(mags[0]))
    layer, ratio, radius = best
    assert ratio < 0.99, f"no layer with a well separated dominant eigenvalue (best ratio {ratio})"
    iters = int(torch.tensor(1e-6).log() / torch.tensor(ratio).log()) + 5
    (est,) = spectral_radius(model, idx, layers=[layer], iters=iters, generator=torch.Generator().manual_seed(0))
    assert est == pytest.approx(radius, rel=1e-3)


@pytest.mark.parametrize("preset", ["plain", "mhc"])
def test_spectral_radius_every_layer_and_finite_differences(preset):
    """Default: one radius per block; the authors' finite difference with a tiny eps agrees."""
    model = tiny_model(preset)
    idx = tokens(2, 8)
    radii = spectral_radius(model, idx, iters=3, generator=torch.Generator().manual_seed(0))
    assert len(radii) == 6 and all(r > 0 for r in radii)
    radii[2:3] = spectral_radius(model, idx, layers=[2], iters=3, generator=torch.Generator().manual_seed(0))
    inputs, trace = model.forward_trace(idx)
    layer, eps = 2, 1e-7
    v = torch.randn(trace[layer].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = v / v.norm(dim=(2, 3), keepdim=True)  # per token: over (stream, width)
    with torch.no_grad():
        for _ in range(3):
            jv = (model.block(layer, trace[layer] + eps * v, inputs)[0] - trace[layer + 1]) / eps
            sigma = jv.norm(dim=(2, 3))
            v = jv / sigma[..., None, None]
    assert radii[layer] == pytest.approx(float(sigma.mean()), rel=1e-5)
    with pytest.raises(ValueError, match="layer 6"):
        spectral_radius(model, idx, layers=[6])


def test_plot_writes_a_png(tmp_path):
    errors = [{"layer": 3, "rel_err": 0.0, "abs_err": 0.0}, {"layer": 4, "rel_err": 0.05, "abs_err": 0.2}]
    path = tmp_path / "depth.png"
    plot_depth(errors, [1.1, 1.3, 0.9, 1.2, 1.05], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_writes_its_three_files(tmp_path, monkeypatch, capsys):
    import export.checkpoint

    model = tiny_model("nanochat")
    monkeypatch.setattr(export.checkpoint, "load_model", lambda path: (model, None))
    monkeypatch.setattr(diagnostics, "_windows", lambda source, tok, seq_len, n: tokens(3, seq_len + 1))
    out = tmp_path / "diag"
    argv = ["--checkpoint", "m.ckpt", "--data", "d", "--n-par", "4", "--seq-len", "12", "--iters", "2", "--out", str(out)]
    assert diagnostics.main(argv) == 0
    results = json.loads((out / "diagnose.json").read_text())
    assert [e["layer"] for e in results["idn"]] == [2, 3, 4, 5] and len(results["spectral_radius"]) == 6
    assert results["header"]["windows"] == 3 and results["header"]["seq_len"] == 12
    assert "| 5 | yes |" in (out / "diagnose.md").read_text()
    assert (out / "diagnose.png").read_bytes()[:4] == b"\x89PNG"
    assert diagnostics.main(argv) == 0  # its own earlier output may be replaced
    (out / "diagnose.json").write_text("{}")
    with pytest.raises(SystemExit) as info:
        diagnostics.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("snlp diagnose: error: --out") and "\n" not in err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--checkpoint", "m.ckpt", "--data", "d", "--n-par", "0"], "--n-par"),
        (["--data", "d", "--n-par", "2"], "--checkpoint"),
        (["--checkpoint", "m.ckpt", "--data", "d", "--n-par", "2", "--tokens", "x"], "--tokens"),
    ],
)
def test_command_bad_argument_is_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        diagnostics.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("snlp diagnose: error:") and words in err and "\n" not in err


def test_command_missing_checkpoint_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        diagnostics.main(["--checkpoint", str(tmp_path / "nope.ckpt"), "--data", str(tmp_path), "--n-par", "2",
                          "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("snlp diagnose: error:") and "nope.ckpt" in err and "\n" not in err
