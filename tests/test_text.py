"""snlp_lightning.text: tokenizers (HF tokenizer.json, nanochat tokenizer.pkl), evaluation token
streams (prepared folder, .txt, .jsonl, .parquet), fixed contexts and bits per byte."""

from __future__ import annotations

import importlib.util
import json
import math
import pickle

import pytest
import torch

from snlp_lightning.errors import UserError
from snlp_lightning.text import (
    HFTokenizer,
    TiktokenTokenizer,
    bits_per_byte,
    fixed_contexts,
    load_tokenizer,
    token_stream,
    tokenizer_file_near,
    tokenizer_near,
)

tiktoken = pytest.importorskip("tiktoken")

DOCS = [
    "the theme of the thesis",
    "naïve café crème brûlée, déjà vu",
    "numbers 12345 and 6789\nsecond line of the same document",
    "€ 42 — the end",
    "<|bos|> written inside a text is text",
]
SPLIT = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


def tiny_encoding():
    """A tiktoken Encoding built like nanochat's: bytes, a few merges (one a whole 2-byte character), <|bos|> last."""
    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"th", b"he", b"the", b" t", b" the", "é".encode(), b"12"):
        ranks[merge] = len(ranks)
    return tiktoken.Encoding(name="tiny-test", pat_str=SPLIT, mergeable_ranks=ranks, special_tokens={"<|bos|>": len(ranks)})


def nanochat_token_bytes(enc) -> torch.Tensor:
    """token_bytes.pt as nanochat's tok_train.py writes it: the decoded text's UTF-8 length, specials 0."""
    out = []
    for i in range(enc.n_vocab):
        text = enc.decode([i])
        out.append(0 if text in enc.special_tokens_set else len(text.encode("utf-8")))
    return torch.tensor(out, dtype=torch.int32)


@pytest.fixture
def pkl_dir(tmp_path):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    with open(folder / "tokenizer.pkl", "wb") as f:
        pickle.dump(tiny_encoding(), f)
    return folder


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    from data_prep.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    train_tokenizer(DOCS * 20, 300, show_progress=False).save(str(path))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from data_prep import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("prepared")
    words = "alpha beta gamma delta épsilon zeta thêta über naïve 12 345 €".split()
    docs = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(5 + i % 40)) for i in range(200)]
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    out = root / "data"
    prepare(PrepareOptions(out=str(out), inputs=[str(root / "corpus.txt")], vocab_size=300, val_fraction=0.3,
                           workers=1, start_method="fork", progress=False))
    return out, docs


# -- tokenizers ----------------------------------------------------------------------------------------------
def test_tiktoken_pickle_round_trip_and_token_bytes(pkl_dir):
    enc = tiny_encoding()
    tok = load_tokenizer(pkl_dir)  # the folder finds tokenizer.pkl
    assert isinstance(tok, TiktokenTokenizer) and tok.path == pkl_dir / "tokenizer.pkl"
    assert tok.vocab_size == enc.n_vocab and tok.bos_id == enc.n_vocab - 1
    for text in DOCS:
        ids = tok.encode(text)
        assert ids == enc.encode_ordinary(text) and tok.bos_id not in ids  # special strings are text
        assert tok.decode(ids) == text
        assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    expected = [0 if i == tok.bos_id else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    assert tok.token_bytes.dtype == torch.int64 and tok.token_bytes.tolist() == expected


def test_tiktoken_token_bytes_file_is_used(pkl_dir):
    enc = tiny_encoding()
    written = nanochat_token_bytes(enc)
    torch.save(written, pkl_dir / "token_bytes.pt")
    tok = load_tokenizer(pkl_dir / "tokenizer.pkl")
    assert tok.token_bytes.dtype == torch.int64 and torch.equal(tok.token_bytes, written.long())
    assert tok.token_bytes[tok.bos_id] == 0 and tok.token_bytes[0xC3] == 3  # nanochat counts a partial byte as U+FFFD


def test_hf_tokenizer_round_trip_and_token_bytes(hf_json):
    from tokenizers import Tokenizer as HF

    tok = load_tokenizer(hf_json)
    raw = HF.from_file(str(hf_json))
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id == raw.token_to_id("<|bos|>") == 0
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    specials = {i for i, a in raw.get_added_tokens_decoder().items() if a.special}
    assert specials and all(tok.token_bytes[i] == 0 for i in specials)
    for i in range(tok.vocab_size):
        if i in specials:
            continue
        text = raw.decode([i])
        if "\ufffd" not in text:  # whole characters: the decoded text's UTF-8 length
            assert tok.token_bytes[i] == len(text.encode("utf-8")), (i, text)
        else:  # part of a multi-byte character: 1..3 bytes, never the replacement character's 3 per symbol
            assert 1 <= tok.token_bytes[i] <= 3
    for text in DOCS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.bos_id not in ids
        assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_load_tokenizer_errors(tmp_path, hf_json):
    with pytest.raises(UserError) as err:
        load_tokenizer(tmp_path / "nope.json")
    assert "does not exist" in one_line(err) and "tokenizer.pkl" in one_line(err)
    with pytest.raises(UserError) as err:
        load_tokenizer(tmp_path)
    assert "holds no tokenizer.json or tokenizer.pkl" in one_line(err)
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(UserError) as err:
        load_tokenizer(tmp_path / "vocab.txt")
    assert "neither a .json nor a .pkl" in one_line(err)
    (tmp_path / "bad.json").write_text('{"model": ')
    with pytest.raises(UserError) as err:
        load_tokenizer(tmp_path / "bad.json")
    assert "not a valid tokenizers JSON file" in one_line(err)
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(UserError) as err:
        load_tokenizer(tmp_path / "empty.pkl")
    assert "not a readable pickle" in one_line(err) and "empty" in one_line(err)
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps(tiny_encoding())[:40])
    with pytest.raises(UserError) as err:
        load_tokenizer(tmp_path / "cut.pkl")
    assert "corrupt or truncated" in one_line(err)
    (tmp_path / "dict.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UserError) as err:
        load_tokenizer(tmp_path / "dict.pkl")
    assert "builtins.dict" in one_line(err) and "not a tiktoken Encoding" in one_line(err)


def test_token_bytes_file_errors(pkl_dir):
    torch.save(torch.ones(5, dtype=torch.int32), pkl_dir / "token_bytes.pt")
    tok = load_tokenizer(pkl_dir)
    with pytest.raises(UserError) as err:
        tok.token_bytes
    assert "5 entries" in one_line(err) and "token_bytes.pt" in one_line(err)
    (pkl_dir / "token_bytes.pt").write_bytes(b"garbage")
    with pytest.raises(UserError) as err:
        load_tokenizer(pkl_dir).token_bytes
    assert "cannot be read" in one_line(err)


# -- finding a checkpoint's tokenizer ---------------------------------------------------------------------------
def test_tokenizer_near_nanochat_layout(tmp_path, monkeypatch, pkl_dir):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "unset"))
    base = pkl_dir.parent  # BASE/tokenizer/tokenizer.pkl
    run = base / "base_checkpoints" / "d4"
    run.mkdir(parents=True)
    (run / "model_000010.pt").write_bytes(b"")
    for where in (run, run / "model_000010.pt"):
        tok = tokenizer_near(where)
        assert isinstance(tok, TiktokenTokenizer) and tok.path == pkl_dir / "tokenizer.pkl"


def test_tokenizer_near_nanochat_base_dir(tmp_path, monkeypatch, pkl_dir):
    run = tmp_path / "elsewhere" / "a" / "b" / "c"
    run.mkdir(parents=True)
    (run / "model_000010.pt").write_bytes(b"")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "empty"))
    assert tokenizer_near(run) is None
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(pkl_dir.parent))
    assert tokenizer_near(run).path == pkl_dir / "tokenizer.pkl"


def test_tokenizer_near_lightning_ckpt(tmp_path, monkeypatch, prepared):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "unset"))
    data, _ = prepared
    ckpt = tmp_path / "runs" / "x" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {"model.w": torch.zeros(2)}, "datamodule_hyper_parameters": {"data_dir": str(data)}}, ckpt)
    assert tokenizer_file_near(ckpt) == data / "tokenizer.json"
    assert isinstance(tokenizer_near(ckpt), HFTokenizer)
    torch.save({"state_dict": {}}, ckpt)  # no data_dir and nothing near: not found
    assert tokenizer_near(ckpt) is None
    assert tokenizer_near(tmp_path / "missing.ckpt") is None


# -- token streams --------------------------------------------------------------------------------------------
def direct(tok, docs) -> torch.Tensor:
    return torch.tensor([t for d in docs for t in [tok.bos_id, *tok.encode(d)]], dtype=torch.int64)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_token_stream_from_text_files(tmp_path, pkl_dir, kind):
    tok = load_tokenizer(pkl_dir)
    path = tmp_path / f"eval.{kind}"
    if kind == "txt":
        path.write_text("\n\n\n".join(DOCS) + "\n   \n", encoding="utf-8")
    elif kind == "jsonl":
        lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)]
        path.write_text("\n".join(lines[:2] + ["", json.dumps({"text": None}), json.dumps({"text": "  "})] + lines[2:]) + "\n")
    else:
        pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed: .parquet sources need it")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": DOCS[:3] + [None] + DOCS[3:], "n": list(range(6))}), path, row_group_size=2)
    expected = direct(tok, DOCS)
    stream = token_stream(path, tok, max_tokens=10_000, seq_len=16)  # more than there is: all of it
    assert stream.dtype == torch.int64 and torch.equal(stream, expected)
    stream = token_stream(path, tok, max_tokens=20, seq_len=8)  # ceil(20 / 8) * 8 + 1 = 25 tokens
    assert torch.equal(stream, expected[:25])


def test_token_stream_from_prepared_folder(prepared, tmp_path):
    from data_prep.corpus import doc_hash

    data, docs = prepared
    manifest = json.loads((data / "manifest.json").read_text())
    tok = load_tokenizer(data)
    val = [d for d in docs if doc_hash(d) < manifest["split_rule"]["threshold"]]
    expected = direct(tok, val)
    assert expected.numel() == manifest["splits"]["val"]["tokens"]
    stream = token_stream(data, tok, max_tokens=10**6, seq_len=32)
    assert torch.equal(stream, expected)
    assert torch.equal(token_stream(data, tok, max_tokens=100, seq_len=32), expected[:129])
    other = tmp_path / "tokenizer"  # a different vocabulary is refused
    other.mkdir()
    with open(other / "tokenizer.pkl", "wb") as f:
        pickle.dump(tiny_encoding(), f)
    with pytest.raises(UserError) as err:
        token_stream(data, load_tokenizer(other), 100, 32)
    assert "vocab_size 300" in one_line(err) and "give the tokenizer the data was prepared with" in one_line(err)


def test_token_stream_errors(tmp_path, pkl_dir):
    tok = load_tokenizer(pkl_dir)
    cases = {}
    cases["missing.txt"] = "does not exist"
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    cases["empty.txt"] = "holds no text"
    (tmp_path / "data.csv").write_text("a,b\n")
    cases["data.csv"] = "has suffix '.csv'"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    cases["latin1.txt"] = "is not UTF-8 text"
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    cases["bad.jsonl"] = "bad.jsonl:2 is not valid JSON"
    (tmp_path / "field.jsonl").write_text('{"body": "ok"}\n')
    cases["field.jsonl"] = "has no 'text' field (found: body)"
    (tmp_path / "folder").mkdir()
    cases["folder"] = "folder without manifest.json"
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    cases["broken.parquet"] = "pyarrow" if _no_pyarrow() else "not a readable parquet file"
    for name, words in cases.items():
        with pytest.raises(UserError) as err:
            token_stream(tmp_path / name, tok, 100, 8)
        assert words in one_line(err) and name in one_line(err), (name, one_line(err))
    with pytest.raises(UserError) as err:
        token_stream(tmp_path / "empty.txt", tok, 0, 8)
    assert "max_tokens 0" in one_line(err)


def test_token_stream_parquet_without_text_column(tmp_path, pkl_dir):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed: .parquet sources need it")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(UserError) as err:
        token_stream(tmp_path / "x.parquet", load_tokenizer(pkl_dir), 100, 8)
    assert "no 'text' column (found: content)" in one_line(err)


def _no_pyarrow() -> bool:
    return importlib.util.find_spec("pyarrow") is None


# -- windows and bits per byte -----------------------------------------------------------------------------------
def test_fixed_contexts_layout_and_counts():
    stream = torch.arange(30)
    windows = fixed_contexts(stream, 4, 1000)
    assert windows.shape == (7, 5)  # floor(29 / 4)
    for i, row in enumerate(windows):
        assert row.tolist() == list(range(4 * i, 4 * i + 5))
    targets = windows[:, 1:].flatten()
    assert targets.tolist() == list(range(1, 29))  # every token after the first, once
    assert torch.equal(windows[1:, 0], windows[:-1, -1])  # a window's last token is the next one's first
    assert fixed_contexts(stream, 4, 9).shape == (3, 5)  # ceil(9 / 4)
    assert fixed_contexts(stream, 4, 8).shape == (2, 5)
    assert fixed_contexts(torch.arange(5), 4, 100).shape == (1, 5)
    with pytest.raises(UserError) as err:
        fixed_contexts(torch.arange(4), 4, 100)
    assert "4 tokens, fewer than one window of seq_len + 1 = 5" in one_line(err)


def test_bits_per_byte_by_hand():
    token_bytes = torch.tensor([0, 1, 2, 3], dtype=torch.int32)  # id 0: a special token
    targets = torch.tensor([[1, 0, 3], [2, 2, -1]])
    nll = torch.tensor([[0.5, 9.0, 1.0], [2.0, 0.25, 7.0]])
    bpb, nbytes = bits_per_byte(nll, targets, token_bytes)
    assert nbytes == 1 + 3 + 2 + 2  # the special target (id 0) and the ignored one (-1) count nothing
    assert bpb == pytest.approx((0.5 + 1.0 + 2.0 + 0.25) / (math.log(2) * 8), rel=1e-12)
    assert bits_per_byte(torch.ones(2), torch.tensor([0, 0]), token_bytes) == (float("inf"), 0)


def test_bits_per_byte_matches_a_direct_sum():
    gen = torch.Generator().manual_seed(0)
    token_bytes = torch.randint(0, 6, (50,), generator=gen)
    targets = torch.randint(0, 50, (4, 33), generator=gen)
    nll = torch.rand(4, 33, generator=gen) * 5
    nats = sum(float(nll[b, t]) for b in range(4) for t in range(33) if token_bytes[targets[b, t]] > 0)
    total = sum(int(token_bytes[targets[b, t]]) for b in range(4) for t in range(33))
    bpb, nbytes = bits_per_byte(nll, targets, token_bytes)
    assert nbytes == total and bpb == pytest.approx(nats / (math.log(2) * total), rel=1e-9)
