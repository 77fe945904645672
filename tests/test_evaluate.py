"""``snlp eval`` on a trained tiny model: every number against a direct computation, resume after an
interruption, the output-folder rules. No timing is asserted (the speed columns only exist)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from export import evaluate
from export.checkpoint import load_model
from snlp_lightning.errors import UserError
from snlp_lightning.text import load_tokenizer, token_stream

SEQ, TOKENS = 24, 240  # 10 contexts


def eval_args(checkpoint, data, out, *extra):
    return evaluate.build_parser().parse_args([
        "--checkpoint", str(checkpoint), "--data", str(data), "--seq-len", str(SEQ), "--tokens", str(TOKENS),
        "--plans", "idn:n2:K1", "idn:n4:K4", "--warmup", "1", "--iters", "2", "--save-every", "4",
        "--out", str(out), *extra,
    ])


def direct(model, stream, token_bytes):
    """Sequential NLL / bits per byte over contexts cut by hand: stride SEQ, SEQ + 1 tokens each."""
    nll, count, nll_b, nbytes = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for i in range(TOKENS // SEQ):
            window = stream[i * SEQ : i * SEQ + SEQ + 1].unsqueeze(0)
            losses = F.cross_entropy(model(window[:, :-1])[0].double(), window[0, 1:], reduction="none")
            nll += float(losses.sum())
            count += SEQ
            b = token_bytes[window[0, 1:]]
            nll_b += float(losses[b > 0].sum())
            nbytes += int(b.sum())
    return math.exp(nll / count), nll_b / (math.log(2) * nbytes), count


def test_eval_scores_every_plan_against_a_direct_computation(trained_checkpoint, bundled_data, tmp_path):
    out = tmp_path / "eval"
    result = evaluate.run(eval_args(trained_checkpoint, bundled_data, out))
    model, _ = load_model(trained_checkpoint)
    tokenizer = load_tokenizer(bundled_data / "tokenizer.json")
    ppl, bpb, count = direct(model.eval(), token_stream(bundled_data, tokenizer, TOKENS, SEQ), tokenizer.token_bytes)
    seq = result["results"]["seq"]
    assert seq["tokens"] == count == TOKENS
    assert seq["ppl"] == pytest.approx(ppl, rel=1e-6) and seq["bits_per_byte"] == pytest.approx(bpb, rel=1e-6)
    exact = result["results"]["idn:n4:K4:h0"]  # K = C on all 4 layers: the sequential model
    assert exact["ppl"] == pytest.approx(ppl, rel=1e-5) and exact["top1"] == 1.0 and exact["cosine"] > 0.99999
    approx = result["results"]["idn:n2:K1:h0"]
    assert approx["ppl"] != pytest.approx(ppl, rel=1e-6) and 0.5 < approx["top1"] <= 1.0  # a real approximation
    assert result["complete"] and result["contexts_done"] == result["contexts_total"] == TOKENS // SEQ
    assert set(result["speed"]) == {"seq", "idn:n2:K1:h0", "idn:n4:K4:h0"} and all(r["ms"] > 0 for r in result["speed"].values())
    report = (out / "eval.md").read_text()
    assert "| idn:n2:K1:h0 |" in report and "bits/byte" in report and "1.33x" in report  # ideal L / (S + K) = 4 / 3
    assert json.loads((out / "eval.json").read_text())["results"] == result["results"]


def test_an_interrupted_eval_resumes_to_the_same_numbers(trained_checkpoint, bundled_data, tmp_path, monkeypatch):
    whole = evaluate.run(eval_args(trained_checkpoint, bundled_data, tmp_path / "whole", "--no-speed"))
    calls = {"n": 0}
    real = evaluate.snlp_forward

    def dies_after_some_contexts(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2 * 6:  # two plans per context: dies inside context 7
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "snlp_forward", dies_after_some_contexts)
    args = eval_args(trained_checkpoint, bundled_data, tmp_path / "split", "--no-speed")
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(args)
    partial = json.loads((tmp_path / "split" / "eval.json").read_text())
    assert partial["contexts_done"] == 4 and not partial["complete"]  # the last save before the interruption
    assert "partial" in (tmp_path / "split" / "eval.md").read_text()
    monkeypatch.setattr(evaluate, "snlp_forward", real)
    resumed = evaluate.run(args)
    assert resumed["results"] == whole["results"]  # the same sums, in the same order: equal to the bit


def test_eval_output_folder_rules(trained_checkpoint, bundled_data, tmp_path):
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(trained_checkpoint), "--data", str(bundled_data), "--seq-len", str(SEQ), "--tokens", str(TOKENS),
            "--plans", "idn:n2:K1", "--no-speed", "--out", str(out)]
    assert evaluate.main(argv) == 0  # the command's exit code (run's return value is the results, for the API)
    assert evaluate.main(argv) == 0  # run again: a complete eval resumes to the same files
    with pytest.raises(UserError, match=r"holds an eval with other settings \(.*plans.*\): run the same command to resume it"):
        evaluate.run(evaluate.build_parser().parse_args([
            "--checkpoint", str(trained_checkpoint), "--data", str(bundled_data), "--seq-len", str(SEQ),
            "--tokens", str(TOKENS), "--plans", "idn:n2:K2", "--no-speed", "--out", str(out)]))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "eval.json").write_text("{}")
    with pytest.raises(UserError, match="eval.json that snlp eval did not write"):
        evaluate.run(eval_args(trained_checkpoint, bundled_data, foreign))
    assert (foreign / "eval.json").read_text() == "{}"
    with pytest.raises(UserError, match=r"^--tokens 0 is not allowed"):
        evaluate.run(eval_args(trained_checkpoint, bundled_data, tmp_path / "x", "--tokens", "0"))


def test_a_nanochat_checkpoint_is_scored_with_its_own_tiktoken_tokenizer(tmp_path):
    """nanochat's layout: model_*.pt + meta_*.json, tokenizer.pkl in BASE/tokenizer/; a .txt source."""
    import pickle

    from conftest import randomize
    from snlp_lightning import build_model
    from snlp_lightning.models.nanochat_io import save_nanochat
    from test_text import tiny_encoding

    enc = tiny_encoding()
    torch.manual_seed(0)
    model = randomize(build_model("nanochat", n_layer=4, n_embd=48, n_head=4, n_kv_head=2, vocab_size=enc.n_vocab,
                                  sequence_len=32, short_window=8), seed=1).float()
    checkpoint = save_nanochat(model, tmp_path / "base" / "base_checkpoints" / "d4", step=5)
    (tmp_path / "base" / "tokenizer").mkdir()
    with open(tmp_path / "base" / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    docs = ["the theme of the thesis", "héllo 1212 there", "then the other one, the end"] * 6
    source = tmp_path / "val.txt"
    source.write_text("\n\n".join(docs), encoding="utf-8")
    result = evaluate.run(evaluate.build_parser().parse_args([
        "--checkpoint", str(checkpoint), "--data", str(source), "--seq-len", "16", "--tokens", "64",
        "--plans", "idn:n2:K2", "--no-speed", "--out", str(tmp_path / "eval")]))
    # the stream by hand: every document with BOS first, in order; contexts of 17 with stride 16
    bos = enc.encode_single_token("<|bos|>")
    stream = torch.tensor([t for d in docs for t in [bos, *enc.encode_ordinary(d)]])
    nll, nats_b, nbytes = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(4):
            window = stream[i * 16 : i * 16 + 17].unsqueeze(0)
            losses = F.cross_entropy(model.eval()(window[:, :-1])[0].double(), window[0, 1:], reduction="none")
            nll += float(losses.sum())
            lengths = torch.tensor([0 if t == bos else len(enc.decode_single_token_bytes(t)) for t in window[0, 1:].tolist()])
            nats_b += float(losses[lengths > 0].sum())
            nbytes += int(lengths.sum())
    seq = result["results"]["seq"]
    assert seq["ppl"] == pytest.approx(math.exp(nll / 64), rel=1e-6)
    assert seq["bytes"] == nbytes and seq["bits_per_byte"] == pytest.approx(nats_b / (math.log(2) * nbytes), rel=1e-6)
    assert result["results"]["idn:n2:K2:h0"]["top1"] == 1.0  # K = C


def test_eval_speculative_sweep_lands_in_the_results(trained_checkpoint, bundled_data, tmp_path):
    result = evaluate.run(eval_args(trained_checkpoint, bundled_data, tmp_path / "spec", "--no-speed", "--generate", "4", "8",
                                    "--prompts", "2", "--prompt-len", "8", "--speculative", "--draft-lens", "2",
                                    "--temperatures", "0", "--new-tokens", "8"))
    (row,) = result["speculative"]
    assert (row["plan"], row["draft_len"], row["temperature"]) == ("idn:n2:K1:h0", 2, 0.0)
    assert row["equals_sequential"] is True and 0.0 <= row["alpha"] <= 1.0
    assert row["tokens_per_round"] == pytest.approx((row["accepted"] + row["row_rounds"]) / row["row_rounds"])
    plans = [(g["plan"], g["reference"]) for g in result["generation"]]
    assert plans == [("idn:n2:K1:h0", "sequential"), ("idn:n4:K4:h0", "sequential")]
    assert result["generation"][1]["match"] == {"4": 1.0, "8": 1.0}  # K = C decodes the sequential tokens
    report = (tmp_path / "spec" / "eval.md").read_text()
    assert "Self-speculative decoding" in report and "match@8" in report
