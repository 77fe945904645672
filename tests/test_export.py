"""Compiled and exported decoders: same numbers as eager, a package that runs without the training
code, the generate / export commands and self-speculation on a trained model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export import LayerParallelDecoder, generate_tokens, speculative_tokens
from export.checkpoint import load_model
from export.compiled import compile_steps, example_inputs, no_recompiles, warm_up
from export.package import ExportError, export_package
from snlp_lightning.models.nanochat_io import CheckpointError

from conftest import tiny_model

# Imports of the training code fail in the process that runs the package.
BLOCKER = """
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('snlp_lightning', 'export', 'data_prep', 'lightning'):
            raise ImportError('training code imported: ' + name)
sys.meta_path.insert(0, Blocker())
"""


def test_compiled_decode_matches_eager_without_recompiling():
    model = tiny_model("nanochat", dtype=torch.float32, sequence_len=32, short_window=8)
    eager = LayerParallelDecoder(model, "idn:n4:2xF2:K1", batch_size=2, max_seq_len=32)
    compiled = LayerParallelDecoder(model, "idn:n4:2xF2:K1", batch_size=2, max_seq_len=32)
    steps = compile_steps(compiled)
    warm_up(steps["decode"], compiled)
    prompts = [[1, 2, 3, 4], [5, 6]]
    with no_recompiles():  # new positions and rows at different lengths reuse the one graph
        got = generate_tokens(compiled, prompts, 12, steps=steps)
    assert got == generate_tokens(eager, prompts, 12)
    eager.reset_cache()
    compiled.reset_cache()
    args = example_inputs(eager, 1, start=5)
    torch.testing.assert_close(steps["decode"](*args), eager.decode(*args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("plan", ["seq", "idn:n4:2xF2:K1"])
@pytest.mark.parametrize("entry", ["decode", "prefill"])
def test_cache_writes_stay_in_place_in_the_functional_graph(plan, entry):
    """The functional graph (what inductor and AOTInductor compile) writes the KV cache with one
    index_put per projection into the whole cache. A write through a view of it would show up as
    slice/select_scatter of the view back into the cache: a copy of the whole cache every step."""
    from collections import Counter

    from export.package import _Entry

    model = tiny_model("plain", dtype=torch.float32, sequence_len=32)
    decoder = LayerParallelDecoder(model, plan, batch_size=2, max_seq_len=32)
    args = (*example_inputs(decoder, 1), torch.zeros_like(decoder.k_cache), torch.zeros_like(decoder.v_cache))
    graph = torch.export.export(_Entry(decoder, entry), args, strict=False).run_decompositions({}).graph
    ops = Counter(str(n.target).split(".")[1] for n in graph.nodes if n.op == "call_function")
    s_len = decoder.prefix_len
    # k and v per call: S prefix layers, then C chunks one after another (prefill) or K batched
    # iterations plus the final refresh (decode); the sequential model writes every layer.
    calls = {"seq": model.config.n_layer, "prefill": s_len + decoder.plan.chunks, "decode": s_len + decoder.plan.iters + 1}
    writes = 2 * calls["seq" if plan == "seq" else entry]
    assert ops["index_put"] == writes
    assert not [op for op in ops if op.endswith("_scatter") or op == "copy"], ops


def test_exported_package_matches_eager_in_a_fresh_process(tmp_path):
    model = tiny_model("mhc", dtype=torch.float32, sequence_len=32, short_window=8)
    decoder = LayerParallelDecoder(model, "hcn:n4:2xF2:K1", batch_size=2, max_seq_len=32)
    out = export_package(decoder, tmp_path / "pkg")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plan"] == "hcn:n4:2xF2:K1:h0" and manifest["config"]["use_mhc"] and manifest["cache_shape"][:2] == [2, 6]  # (B, L, Hkv, Tmax, hd)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    want = generate_tokens(decoder, prompts, 10)
    decoder.reset_cache()
    args = example_inputs(decoder, 3)
    want_logits = decoder.prefill(*args)
    script = BLOCKER + f"""
import json, torch
sys.path.insert(0, {str(out)!r})
from snlp_runtime.standalone import load_package
package = load_package({str(out)!r})
tokens = package.generate({prompts!r}, 10)
package.k_cache.zero_(); package.v_cache.zero_()
ids = torch.ones(2, 3, dtype=torch.long); pos = torch.arange(3).expand(2, 3); prev = torch.zeros(2, dtype=torch.long)
torch.save(package.prefill(ids, pos, prev), {str(tmp_path / "logits.pt")!r})
print(json.dumps(tokens))
"""
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == want
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want_logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ExportError, match="exists: pass --overwrite"):
        export_package(decoder, out)


def test_self_speculative_on_a_trained_model_equals_sequential_greedy(trained_checkpoint):
    model, _ = load_model(trained_checkpoint)
    prompts = [[0, 71, 300, 12], [0, 5]]
    sequential = generate_tokens(LayerParallelDecoder(model, "seq", batch_size=2), prompts, 40)
    drafter = LayerParallelDecoder(model, "idn:n3:K1", batch_size=2)
    got, stats = speculative_tokens(drafter, prompts, 40, draft_len=4)
    assert got == sequential
    assert stats.mean_accepted > 1.0  # a regularized model's K = 1 drafts are mostly right


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=900, cwd=cwd)


def test_generate_and_export_commands(trained_checkpoint, tmp_path):
    gen = _run(["export.generate_cli", "--checkpoint", str(trained_checkpoint), "--plan", "idn:n3:K2",
                "--prompt", "The module", "--prompt", "def", "--max-new-tokens", "12"], tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert "--- 'def'" in gen.stdout and "24 tokens in" in gen.stderr
    spec = _run(["export.generate_cli", "--checkpoint", str(trained_checkpoint), "--plan", "idn:n2:K1",
                 "--speculative", "3", "--prompt", "The module", "--max-new-tokens", "12", "--compile"], tmp_path)
    assert spec.returncode == 0, spec.stderr[-3000:]
    assert "compiling the decode step" in spec.stderr and "draft tokens accepted per round" in spec.stderr
    bad = _run(["export.generate_cli", "--checkpoint", str(trained_checkpoint), "--plan", "idn:n9:K1", "--prompt", "x"], tmp_path)
    assert bad.returncode == 2 and "snlp-generate: error:" in bad.stderr and "n9" in bad.stderr
    missing = _run(["export.package", "--checkpoint", str(tmp_path / "none.ckpt"), "--out", "pkg"], tmp_path)
    assert missing.returncode == 2 and f"checkpoint {tmp_path / 'none.ckpt'} does not exist" in missing.stderr


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="is corrupt or truncated"):
        load_model(bad)
