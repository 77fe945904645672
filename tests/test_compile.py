"""Real torch.compile (inductor, CPU): ``model.compile: true`` compiles the training loss as one graph
without recompiles; the compiled decoder compiles per wide-block region, not per layer."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, TensorDataset

from conftest import randomize, tiny_model
from export import LayerParallelDecoder
from export.compiled import compile_steps, example_inputs
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


@pytest.mark.parametrize("preset, plan", [("nanochat", "idn:n4:2xF2:K1"), ("mhc", "hcn:n4:2xF2:K1")])
def test_compiled_decoder_graphs_do_not_grow_with_depth(preset, plan):
    """Regional compilation: every wide-block call is one compiled region shared by all layers and
    plans, so an L = 8 decoder compiles exactly the graphs of an L = 4 one (same window patterns,
    same chunk shape): as many graphs, and as many operations traced into them (a whole-step graph
    would trace twice as many), and its decode / verify logits equal eager."""
    graphs = {}
    try:
        for n_layer in (4, 8):
            torch._dynamo.reset()
            counters.clear()
            model = tiny_model(preset, dtype=torch.float32, n_layer=n_layer, sequence_len=32, short_window=8)
            # A raised limit that fails when hit: a silent eager fallback would also stop the count.
            with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
                for name in ("seq", plan):
                    eager = LayerParallelDecoder(model, name, batch_size=2, max_seq_len=32)
                    compiled = LayerParallelDecoder(model, name, batch_size=2, max_seq_len=32)
                    steps = compile_steps(compiled)
                    for start in (0, 5):
                        one, three = example_inputs(eager, 1, start), example_inputs(eager, 3, start + 1)
                        torch.testing.assert_close(steps["decode"](*one), eager.decode(*one), atol=1e-5, rtol=1e-5)
                        torch.testing.assert_close(steps["verify"](*three), eager.prefill_exact(*three), atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(compiled.k_cache, eager.k_cache, atol=1e-5, rtol=1e-5)
            assert not counters["graph_break"], dict(counters["graph_break"])
            graphs[n_layer] = counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"]
    finally:
        torch._dynamo.reset()
    # seq: 3 layer kinds (window x value embedding) x 2 shapes; the plan: its chunk call and kv refresh.
    assert graphs[4] == graphs[8] and graphs[8][0] <= 8, graphs


def test_region_writes_the_cache_in_place():
    """A region's functional graph writes its narrowed cache (a view made outside the graph, its
    input) with one index_put per projection, copied back onto the input in place; a scatter of a
    view into its base would be a copy of the whole cache per call (kv_cache.KVCache.update)."""
    from collections import Counter

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from export.compiled import _forward
    from snlp_lightning.models.kv_cache import KVCache

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    model = tiny_model("nanochat", dtype=torch.float32, sequence_len=32)
    decoder = LayerParallelDecoder(model, "seq", batch_size=2, max_seq_len=32)
    tokens, positions, prev = example_inputs(decoder, 1, start=3)
    cache = KVCache(decoder.k_cache, decoder.v_cache, decoder.cache_masks, decoder.mask_windows)
    with torch.inference_mode():
        inputs, h = decoder.shell.embed(tokens, positions, prev)
        stack, local, part = decoder._layers.build().select(1).local(inputs, cache)
        torch._dynamo.reset()
        try:
            backend = aot_autograd(fw_compiler=keep, keep_inference_input_mutations=True)  # as inductor does
            out, _ = torch.compile(_forward, backend=backend, fullgraph=True)(stack, h.unsqueeze(0), local, part)
        finally:
            torch._dynamo.reset()
        want, _ = decoder._layers.build().select(1)(h.unsqueeze(0), inputs, cache)
    torch.testing.assert_close(out, want)
    (graph,) = graphs
    ops = Counter(str(n.target).split(".")[1] for n in graph.graph.nodes if n.op == "call_function" and "aten" in str(n.target))
    assert ops["index_put"] == 2 and ops["copy_"] == 2, ops
    assert not [op for op in ops if op.endswith("_scatter")], ops
