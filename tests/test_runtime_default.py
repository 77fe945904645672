"""Generation ends at the end-of-document token and never prints special tokens; the AOTInductor
runtime of ``snlp generate`` (a package built in-process, cached, reused, never stale) gives the
eager decoder's tokens."""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import pytest
import torch

from export import LayerParallelDecoder, generate_tokens
from export.generate_cli import default_runtime
from export import generate_cli
from export.package import cached_package, find_cached_package
from export.standalone import generate_text, load_package
from export.text import BOS_TOKEN, Streamer, TextCodec

from conftest import tiny_model

PROMPTS = [[1, 2, 3, 4], [5, 6]]


def _model():
    return tiny_model("plain", dtype=torch.float32, sequence_len=32, n_layer=2)


def _first_new(row: list[int], start: int = 2) -> tuple[int, int]:
    """(token, index) of the first token from ``start`` on that did not occur before it in ``row``."""
    for i in range(start, len(row)):
        if row[i] not in row[:i]:
            return row[i], i
    raise AssertionError(f"greedy output {row} repeats one token: no stop token to choose")


def _tokenizer(path: Path, size: int, bos: int) -> Path:
    """A word-level tokenizer of ``size`` ids whose ``<|bos|>`` (a special token) is id ``bos``."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {f"w{i}": i for i in range(size) if i != bos} | {BOS_TOKEN: bos}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=f"w{1 if bos != 1 else 2}"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens([AddedToken(BOS_TOKEN, special=True)])
    tokenizer.save(str(path))
    return path


def test_generation_stops_at_the_stop_token_and_keeps_its_ids():
    decoder = LayerParallelDecoder(_model(), "seq", batch_size=2, max_seq_len=32)
    free = generate_tokens(decoder, PROMPTS, 16)
    stop, at = _first_new(free[0])
    got = generate_tokens(decoder, PROMPTS, 16, stop_token=stop)
    assert got[0] == free[0][: at + 1]  # ends with the stop token itself
    other = free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert got[1] == other  # the other row goes on to its own end
    assert generate_tokens(decoder, PROMPTS, 16, stop_token=None) == free  # the option to go on


def test_generation_ends_when_every_row_has_stopped():
    calls = []

    def step(tokens, positions, prev):
        calls.append(tokens.shape)
        logits = torch.zeros(tokens.size(0), tokens.size(1), 8)
        logits[..., 3] = 1.0  # always token 3
        return logits

    from export.runtime import generate

    streamed = []
    out = generate(step, step, [[1], [2, 2]], 50, rows=2, max_seq_len=64, stop_token=3,
                   on_tokens=lambda t: streamed.append(t.tolist()))
    assert out == [[3], [3]] and len(calls) == 1  # the prefill only: no decode step after both rows ended
    assert streamed == [[3, 3]]


def test_streamed_and_decoded_text_never_holds_special_tokens(tmp_path):
    codec = TextCodec(_tokenizer(tmp_path / "tok.json", 16, bos=0))
    out = io.StringIO()
    streamer = Streamer(codec, out)
    for token in (5, 0, 7, 0):
        streamer(torch.tensor([token]))
    assert BOS_TOKEN not in out.getvalue() and "w5" in out.getvalue() and "w7" in out.getvalue()
    assert BOS_TOKEN not in codec.decode([5, 0, 7]) and BOS_TOKEN in codec.decode([5, 0, 7], skip_special=False)


def test_default_runtime():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_runtime(cuda, 0, False) == "compile"
    assert default_runtime(cpu, 0, True) == "aot" and default_runtime(cpu, 0, False) == "eager"
    assert default_runtime(cpu, 3, True) == "eager"  # the package has no verify graph


@pytest.mark.parametrize("argv, words", [
    (["--runtime", "aot", "--speculative", "2"], ["--speculative", "--runtime eager or compile"]),
    (["--runtime", "eager", "--compile"], ["--compile", "--runtime eager"]),
])
def test_runtime_settings_that_cannot_work_are_refused_before_loading(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        generate_cli.main(["--checkpoint", str(tmp_path / "none.ckpt"), "--prompt", "x", *argv])
    code = exit_.value.code
    err = capsys.readouterr().err
    assert code == 2 and all(w in err for w in words), err


def test_aot_runtime_matches_eager_is_cached_and_never_stale(tmp_path):
    model = _model()
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"weights")  # the cache key reads its path, size and time only
    cache = tmp_path / "cache"
    decoder = LayerParallelDecoder(model, "seq", batch_size=2, max_seq_len=32)
    want = generate_tokens(decoder, PROMPTS, 12)

    folder, built = cached_package(decoder, checkpoint, cache)
    assert built and find_cached_package(decoder, checkpoint, cache) == folder
    package = load_package(folder)
    with torch.inference_mode():
        assert package.generate(PROMPTS, 12) == want  # greedy, float32: the eager tokens
    again, built = cached_package(decoder, checkpoint, cache)
    assert again == folder and not built  # reused, no rebuild

    # A different plan never uses the seq package.
    other = LayerParallelDecoder(model, "idn:n2:K2", batch_size=2, max_seq_len=32)
    assert find_cached_package(other, checkpoint, cache) is None
    # A changed checkpoint file makes the package stale.
    os.utime(checkpoint, ns=(1, 1))
    assert find_cached_package(decoder, checkpoint, cache) is None
    os.utime(checkpoint, ns=(2, 2))
    assert load_package(folder).manifest["source"]["plan"] == str(decoder.plan)  # the key a package is checked against

    # The package's own text path (generate.py, snlp generate --package) stops at <|bos|> and never prints it.
    # <|bos|> gets an id that greedy decoding after "<|bos|> w1 w2 w3" produces again within 12 tokens.
    for stop in range(6, model.config.vocab_size):
        full = generate_tokens(decoder, [[stop, 1, 2, 3], [stop, 5]], 12)
        if stop in full[0][1:]:
            break
    else:
        pytest.skip("no token id recurs in greedy output")
    tokenizer = _tokenizer(tmp_path / "tok.json", model.config.vocab_size, bos=stop)
    args = argparse.Namespace(package=str(folder), tokenizer=str(tokenizer), prompt=["w1 w2 w3", "w5"], max_new_tokens=12,
                              temperature=0.0, top_k=None, seed=0, no_stop=False)
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        codec, new, _, _ = generate_text(args)
    assert [codec.encode(p) for p in args.prompt] == [[stop, 1, 2, 3], [stop, 5]]
    at = full[0].index(stop, 1)
    assert new[0] == full[0][: at + 1] and len(new[0]) < 12  # stopped, <|bos|> kept in the ids
    assert new[1] == (full[1][: full[1].index(stop) + 1] if stop in full[1] else full[1])
    assert BOS_TOKEN not in out.getvalue() and out.getvalue().strip()
    args.no_stop = True
    with contextlib.redirect_stdout(io.StringIO()):
        assert generate_text(args)[1] == full  # the option to go on


def test_decode_runtimes_reports_every_runtime_and_the_floor():
    from export.runtimes import decode_runtimes

    result = decode_runtimes(_model(), "seq", batch_size=2, new_tokens=4, prompt_len=3, rounds=2, runtimes=("eager", "eager"))
    assert set(result["tokens_per_s"]) == {"eager"} and result["tokens_per_s"]["eager"] > 0
    assert result["floor_tokens_per_s"] > 0 and result["weight_bytes"] > 0 and result["same_tokens"]
    assert len(result["seconds"]["eager"]) == 2


def test_bench_runtime_table_compares_each_plan_with_the_fastest_sequential_runtime():
    from export.bench import runtime_markdown

    rows = {"seq": {"tokens_per_s": {"eager": 100.0, "compiled": 300.0, "aot": 400.0}, "same_tokens": True},
            "idn:n2:K1:h0": {"tokens_per_s": {"eager": 150.0, "compiled": 350.0, "aot": 500.0}, "same_tokens": False}}
    md = runtime_markdown({"rows": rows, "fastest_seq_tokens_per_s": 400.0, "floor_tokens_per_s": 1000.0})
    assert "| seq | 100 | 300 | 400 | 1.00x | yes |" in md
    assert "| idn:n2:K1:h0 | 150 | 350 | 500 | 1.25x | no |" in md  # 500 / 400, not 500 / its own eager
    assert "floor 1000 tok/s" in md
