"""snlp-prepare (readers, tokenizer, split, litdata chunks, manifest, errors) and TokenDataModule
(batches, exact mid-epoch resume incl. through Lightning checkpoints), on small real corpora."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from litdata import StreamingDataset, TokensLoader

from data_prep import PrepareError, PrepareOptions, load_tokenizer, prepare
from data_prep.corpus import Source, doc_hash, find_sources, iter_documents
from data_prep.prepare import Scan, finish_scan, main, scan_documents
from snlp_lightning.data import DataError, TokenDataModule

# litdata reads token windows with torch.frombuffer on a read-only mmap (it copies right after).
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable:UserWarning")

WORDS = (
    "the model layer block solver newton step chunk token stream window batch data train value error "
    "naïve café Ελληνικά 日本語 🙂 x=1; f(x) -> y, 42 3.14 'quoted' \"double\" tab\tend"
).split(" ")


def _doc(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Corpus:
    root: Path  # the input folder
    docs: list[str]  # every document the readers must produce, in any order
    out: Path  # the prepared folder
    manifest: dict


def write_corpus(root: Path, seed: int = 0) -> list[str]:
    """A folder with .txt (paragraphs), .jsonl (with blank / null / whitespace records), a nested
    .parquet with two row groups, and a README that must be ignored. Returns the documents."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    (root / "README.md").write_text("not an input\n")
    txt_docs = [_doc(rng, 30) + "\n" + _doc(rng, 20) for _ in range(40)]
    (root / "a.txt").write_text("\n\n".join(txt_docs) + "\n\n\n")
    json_docs = [_doc(rng, 50) for _ in range(60)]
    lines = [json.dumps({"id": i, "text": d}, ensure_ascii=False) for i, d in enumerate(json_docs)]
    lines[10:10] = ["", json.dumps({"text": None}), json.dumps({"text": "   \n"})]
    (root / "b.jsonl").write_text("\n".join(lines) + "\n")
    pq_docs = [_doc(rng, 40) for _ in range(70)]
    (root / "nested").mkdir()
    table = pa.table({"text": pq_docs + [""], "url": [f"u{i}" for i in range(71)]})
    pq.write_table(table, root / "nested" / "c.parquet", row_group_size=36)
    return txt_docs + json_docs + pq_docs


def tiny_options(root: Path, out: Path, **overrides) -> PrepareOptions:
    # fork: ~0.1 s worker start instead of ~4 s per split (the bundled test below covers spawn).
    base = dict(out=str(out), inputs=[str(root)], vocab_size=300, chunk_bytes="8KB", workers=2, progress=False,
                start_method="fork")
    return PrepareOptions(**{**base, **overrides})


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Corpus:
    base = tmp_path_factory.mktemp("tiny")
    docs = write_corpus(base / "in")
    manifest = prepare(tiny_options(base / "in", base / "out"))
    return Corpus(base / "in", docs, base / "out", manifest)


def stream(split_dir: Path) -> torch.Tensor:
    """Every stored token of a split, in storage order, read through litdata."""
    ds = StreamingDataset(str(split_dir), item_loader=TokensLoader(block_size=1))
    return torch.cat([ds[i] for i in range(len(ds))]).to(torch.int64)


def documents_of(tokens: torch.Tensor, bos_id: int, tok) -> list[str]:
    starts = (tokens == bos_id).nonzero().flatten().tolist() + [len(tokens)]
    return [tok.decode(tokens[a + 1 : b].tolist(), skip_special_tokens=False) for a, b in zip(starts, starts[1:])]


# -- the tokenizer --------------------------------------------------------------------------------------
def test_tokenizer_round_trips_and_keeps_bos_for_us(tiny):
    tok, bos_id = load_tokenizer(tiny.out / "tokenizer.json")
    assert bos_id == 0 and tiny.manifest["bos_id"] == 0
    assert tok.get_vocab_size() == tiny.manifest["vocab_size"] <= 300
    assert list(tiny.manifest["special_tokens"])[:5] == ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"]
    samples = [
        "plain words", "naïve café — Ελληνικά 日本語 🙂", "never seen: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃ \u00e9 vs e\u0301",
        "  leading and trailing  \n\t\r\n", "", "x" * 500, "a <|bos|> in the text <|user_start|>",
    ]
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert bos_id not in ids  # literal special-token strings in documents encode as plain text


# -- what was written -----------------------------------------------------------------------------------
def test_stream_holds_exactly_the_documents_bos_separated(tiny):
    tok, bos_id = load_tokenizer(tiny.out / "tokenizer.json")
    m = tiny.manifest
    threshold = m["split_rule"]["threshold"]
    assert m["documents"] == len(tiny.docs) == 170  # blank / null / whitespace-only records skipped
    decoded = {}
    for split in ("train", "val"):
        tokens = stream(tiny.out / split)
        info = m["splits"][split]
        assert len(tokens) == info["tokens"]  # manifest counts == what litdata can read
        assert int((tokens == bos_id).sum()) == info["documents"] > 0
        assert tokens[0] == bos_id and int(tokens.max()) < m["vocab_size"]
        decoded[split] = documents_of(tokens, bos_id, tok)
    expected_val = sorted(d for d in tiny.docs if doc_hash(d) < threshold)
    assert sorted(decoded["val"]) == expected_val
    assert sorted(decoded["train"] + decoded["val"]) == sorted(tiny.docs)
    assert m["splits"]["train"]["chunks"] > 2  # small chunk_bytes: several chunks to shuffle across


def test_manifest_records_sources_tokenizer_and_args(tiny):
    m = tiny.manifest
    assert json.loads((tiny.out / "manifest.json").read_text()) == m
    assert [Path(s["path"]).name for s in m["sources"]] == ["a.txt", "b.jsonl", "c.parquet"]
    for s in m["sources"]:
        assert s["sha256"] == hashlib.sha256(Path(s["path"]).read_bytes()).hexdigest()
    assert [s["documents"] for s in m["sources"]] == [40, 60, 70]
    assert m["tokenizer"]["sha256"] == hashlib.sha256((tiny.out / "tokenizer.json").read_bytes()).hexdigest()
    assert m["token_dtype"] == "uint16" and m["args"]["vocab_size"] == 300 and m["created_at"]
    assert sorted(p.name for p in tiny.out.iterdir()) == ["manifest.json", "tokenizer.json", "train", "val"]


def test_prepare_is_deterministic_and_overwrite_replaces(tiny, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(tiny.out, out)  # an earlier output: the only kind --overwrite replaces
    (out / "tokenizer.json").write_text("{}")  # its contents are replaced, not kept
    again = prepare(tiny_options(tiny.root, out, overwrite=True))
    assert (out / "tokenizer.json").read_text() != "{}"
    for key in ("vocab_size", "documents", "split_rule"):
        assert again[key] == tiny.manifest[key]
    assert again["splits"] == tiny.manifest["splits"]  # token / document counts and chunk-layout fingerprints
    assert again["tokenizer"]["sha256"] == tiny.manifest["tokenizer"]["sha256"]
    first = [next(iter(TokenDataModule(str(d), seq_len=16, batch_size=4).train_dataloader())) for d in (tiny.out, out)]
    assert torch.equal(first[0][0], first[1][0]) and torch.equal(first[0][1], first[1][1])


def test_reused_tokenizer_gives_the_same_stream(tiny, tmp_path):
    m = prepare(tiny_options(tiny.root, tmp_path / "reuse", tokenizer=str(tiny.out / "tokenizer.json"), vocab_size=7, workers=1))
    assert m["tokenizer"]["trained"] is False and m["vocab_size"] == tiny.manifest["vocab_size"]
    for split in ("train", "val"):  # another worker count: other chunk boundaries, same tokens
        assert m["splits"][split]["tokens"] == tiny.manifest["splits"][split]["tokens"]
        assert torch.equal(stream(tmp_path / "reuse" / split), stream(tiny.out / split))


def test_shards_read_back_the_same_documents(tmp_path):
    docs = write_corpus(tmp_path / "in", seed=1)
    opts = tiny_options(tmp_path / "in", tmp_path / "out")
    sources = find_sources(opts.inputs)
    scan = Scan(threshold=0, documents=[0] * len(sources))

    class NoBar:
        def update(self, n):
            pass

    finish_scan(scan_documents(sources, opts, scan, NoBar(), shard_bytes=1000), scan)  # many shards per file
    assert len(scan.shards) > 10
    read = [d for sh in scan.shards for d in iter_documents(sources[sh.source], "text", "blank-line", sh.start, sh.stop)]
    assert read == [d for src in sources for d in iter_documents(src, "text", "blank-line")]
    assert sorted(read) == sorted(docs)


@pytest.mark.parametrize(
    "mode, expected",
    [("blank-line", ["a b\nc", "d", "e"]), ("line", ["a b", "c", "d", "e"]), ("file", ["a b\nc\n\n\nd\n \ne\n"])],
)
def test_txt_split_modes(tmp_path, mode, expected):
    path = tmp_path / "t.txt"
    path.write_text("a b\nc\n\n\nd\n \ne\n")
    src = Source(str(path), "txt", path.stat().st_size)
    assert list(iter_documents(src, "text", mode)) == expected


# -- bad input: one line, nothing left behind ----------------------------------------------------------
def _bad_inputs(tmp_path: Path) -> dict[str, tuple[PrepareOptions, str]]:
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "one doc"}\n{"text": "another doc"}\n')
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "nofield.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    pq.write_table(pa.table({"content": ["x", "y"]}), tmp_path / "nocol.parquet")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "one.jsonl").write_text('{"text": "only one"}\n')
    out = str(tmp_path / "out")
    o = lambda inputs, **kw: PrepareOptions(out=out, inputs=[str(tmp_path / i) for i in inputs], progress=False, **kw)  # noqa: E731
    return {
        "missing": (o(["nope.jsonl"]), "nope.jsonl does not exist"),
        "empty file": (o(["empty.txt"]), "empty.txt is empty"),
        "blank file": (o(["blank.txt", "good.jsonl"]), "blank.txt contains no documents"),
        "empty folder": (o(["emptydir"]), "emptydir has no .txt, .jsonl, .parquet files"),
        "jsonl field": (o(["nofield.jsonl"]), "nofield.jsonl:2 has no 'text' field (found: body)"),
        "parquet column": (o(["good.jsonl", "nocol.parquet"]), "nocol.parquet has no 'text' column (columns: content)"),
        "extension": (o(["data.csv"]), "unsupported file type '.csv' (supported: .txt, .jsonl, .parquet)"),
        "vocab": (o(["good.jsonl"], vocab_size=200), "--vocab-size 200 is below the byte alphabet: it must be at least 265"),
        "no input": (o([]), "no input"),
        "one document": (o(["one.jsonl"]), "the input has 1 document(s); need at least 2"),
    }


@pytest.mark.parametrize("case", ["missing", "empty file", "blank file", "empty folder", "jsonl field", "parquet column",
                                  "extension", "vocab", "no input", "one document"])
def test_bad_input_is_one_clear_error_and_leaves_nothing(tmp_path, case):
    opts, message = _bad_inputs(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(PrepareError) as err:
        prepare(opts)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp folder left beside OUT


def test_existing_output_is_kept_without_overwrite(tmp_path):
    (tmp_path / "good.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(PrepareError, match="already exists and is not empty"):
        prepare(PrepareOptions(out=str(tmp_path / "out"), inputs=[str(tmp_path / "good.jsonl")], progress=False))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == f"snlp-prepare: error: input {tmp_path / 'missing.txt'} does not exist"
    assert not (tmp_path / "out").exists()


# -- the bundled corpus ---------------------------------------------------------------------------------
def test_bundled_corpus_end_to_end(tmp_path):
    out = tmp_path / "bundled"
    main(["--bundled", "--out", str(out), "--vocab-size", "512", "--quiet"])
    m = json.loads((out / "manifest.json").read_text())
    (source,) = m["sources"]
    assert source["path"] == "<bundled>" and source["documents"] == m["documents"] > 3000
    assert source["bytes_utf8"] > 1_500_000  # pydoc topics alone are ~0.5 MB
    assert m["vocab_size"] == 512 and m["splits"]["val"]["documents"] >= 1
    assert not any(p.name.startswith(".") for p in out.iterdir())  # the temporary corpus file is gone
    dm = TokenDataModule(str(out), seq_len=32, batch_size=4)
    dm.setup("fit")
    inputs, targets = next(iter(dm.train_dataloader()))
    assert inputs.shape == (4, 32) and int(targets.max()) < 512
    tok, _ = load_tokenizer(out / "tokenizer.json")
    val_text = tok.decode(stream(out / "val").tolist())
    assert val_text.count(" the ") > 100  # English prose, not noise


# -- TokenDataModule ------------------------------------------------------------------------------------
def test_batches_are_shifted_int64_windows(tiny, tmp_path):
    cache = tmp_path / "cache"
    dm = TokenDataModule(str(tiny.out), seq_len=16, batch_size=4, shuffle=False, cache_dir=str(cache))
    dm.setup("fit")
    assert (dm.vocab_size, dm.bos_id) == (tiny.manifest["vocab_size"], 0)
    loader = dm.train_dataloader()
    index = json.loads((tiny.out / "train" / "index.json").read_text())
    windows = sum(c["dim"] // 17 for c in index["chunks"])  # the tail of each chunk is never read
    assert len(loader) == windows // 4
    batches = list(loader)
    assert len(batches) == len(loader)
    first_tokens = stream(tiny.out / "train")[:17]
    for i, (inputs, targets) in enumerate(batches):
        assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        if i == 0:  # unshuffled: the first window is the start of the stored stream
            assert torch.equal(torch.cat([inputs[0], targets[0, -1:]]), first_tokens)
    val_inputs, _ = next(iter(dm.val_dataloader()))
    assert val_inputs.shape == (4, 16)
    assert not cache.exists() or not any(cache.rglob("*.bin"))  # a local data_dir is read in place, never copied


def test_shuffle_follows_the_seed(tiny):
    def first(seed):
        return next(iter(TokenDataModule(str(tiny.out), seq_len=16, batch_size=4, seed=seed).train_dataloader()))[0]

    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))


def _loader(tiny, num_workers, state=None):
    dm = TokenDataModule(str(tiny.out), seq_len=64, batch_size=8, num_workers=num_workers, seed=7)
    dm.setup("fit")
    if state is not None:
        dm.load_state_dict(state)
    return dm, dm.train_dataloader()


def _take(loader, n: int) -> list[torch.Tensor]:
    """The inputs of n batches, continuing into further epochs like a training loop does."""
    out: list[torch.Tensor] = []
    while len(out) < n:
        batches = iter(loader)
        for inputs, _ in batches:
            out.append(inputs)
            if len(out) == n:
                break
        # Close the epoch generator now: left to the cyclic GC, torch's worker shutdown can miss
        # its stop signal and wait 5 s per worker (seen under pytest).
        batches.close()
    return out


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_resume_mid_epoch_continues_exactly(tiny, num_workers):
    _, loader = _loader(tiny, num_workers)
    per_epoch = len(loader)
    assert per_epoch > 6
    reference = _take(loader, 2 * per_epoch)  # two uninterrupted epochs
    dm, loader = _loader(tiny, num_workers)
    _take(loader, 1)
    other = dm.state_dict()["train_loader"]
    for n, m in [(3, 4), (per_epoch - 2, 5)]:  # mid-epoch, and across the epoch boundary
        dm, loader = _loader(tiny, num_workers)
        taken = _take(loader, n)
        state = dm.state_dict()
        _, resumed = _loader(tiny, num_workers, state=json.loads(json.dumps(state)))  # as a checkpoint stores it
        resumed.load_state_dict(other)  # a later load (Lightning's own restore) must not move the restored loader
        got = _take(resumed, m)
        assert all(torch.equal(a, b) for a, b in zip(taken, reference[:n]))
        assert all(torch.equal(a, b) for a, b in zip(got, reference[n : n + m]))


def test_resume_twice_in_a_row(tiny):
    _, loader = _loader(tiny, 2)
    reference = _take(loader, 12)
    dm, loader = _loader(tiny, 2)
    _take(loader, 3)
    dm2, loader2 = _loader(tiny, 2, state=dm.state_dict())
    _take(loader2, 4)
    dm3, loader3 = _loader(tiny, 2, state=dm2.state_dict())
    got = _take(loader3, 5)
    assert all(torch.equal(a, b) for a, b in zip(got, reference[7:12]))


def test_changed_seed_restarts_the_stream_with_a_warning(tiny):
    dm, loader = _loader(tiny, 0)
    _take(loader, 3)
    other = TokenDataModule(str(tiny.out), seq_len=64, batch_size=8, seed=8)
    other.load_state_dict(dm.state_dict())
    with pytest.warns(UserWarning, match="seed 7 -> 8"):
        fresh = other.train_dataloader()
    expected = next(iter(TokenDataModule(str(tiny.out), seq_len=64, batch_size=8, seed=8).train_dataloader()))[0]
    assert torch.equal(next(iter(fresh))[0], expected)


def test_resume_follows_moved_data_and_ignores_other_data(tiny, tmp_path):
    _, loader = _loader(tiny, 0)
    reference = _take(loader, 6)
    dm, loader = _loader(tiny, 0)
    _take(loader, 2)
    state = dm.state_dict()
    moved = tmp_path / "moved"
    shutil.copytree(tiny.out, moved)  # same chunks elsewhere: the position still applies
    dm_moved = TokenDataModule(str(moved), seq_len=64, batch_size=8, seed=7)
    dm_moved.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_take(dm_moved.train_dataloader(), 4), reference[2:]))

    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["splits"]["train"]["fingerprint"] = "other data"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    dm_other = TokenDataModule(str(moved), seq_len=64, batch_size=8, seed=7)
    dm_other.load_state_dict(state)
    with pytest.warns(UserWarning, match="over different data"):
        fresh = dm_other.train_dataloader()
    assert torch.equal(_take(fresh, 1)[0], reference[0])


class Recorder(L.LightningModule):
    """Records every training batch; reads estimated_stepping_batches in configure_optimizers like
    SNLPModule does. With max_epochs (not max_steps) that makes Lightning build the train loader
    before it restores the loop state, and Lightning then never restores the loader (issue #20550)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 4)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        self.seen.append(inputs.clone())
        return (self.emb(inputs) * self.emb(targets)).mean()

    def configure_optimizers(self):
        assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tiny, root: Path, limit: dict, ckpt_path=None) -> Recorder:
    dm = TokenDataModule(str(tiny.out), seq_len=16, batch_size=4, seed=3)
    model = Recorder(tiny.manifest["vocab_size"])
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root, **limit,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1)],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


@pytest.mark.filterwarnings("ignore:The dirpath has changed", "ignore:You passed in a `val_dataloader`")
@pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__`", "ignore:`isinstance\\(treespec, LeafSpec\\)`")
@pytest.mark.parametrize(
    "limit", [dict(max_epochs=1, limit_train_batches=8), dict(max_steps=8)], ids=["max_epochs", "max_steps"]
)
def test_lightning_fit_resumes_the_data_stream_exactly(tiny, tmp_path, limit):
    """max_epochs: only TokenDataModule restores the loader; max_steps: Lightning restores it as
    well and the second (identical) load must be ignored."""
    full = _fit(tiny, tmp_path / "a", limit)
    assert len(full.seen) == 8 and len({int(x.sum()) for x in full.seen}) == 8
    resumed = _fit(tiny, tmp_path / "b", limit, ckpt_path=tmp_path / "a" / "ckpt" / "step=3.ckpt")
    assert len(resumed.seen) == 5
    assert all(torch.equal(a, b) for a, b in zip(resumed.seen, full.seen[3:]))


# -- missing data ---------------------------------------------------------------------------------------
def test_missing_data_is_one_clear_error(tiny, tmp_path):
    with pytest.raises(DataError) as err:
        TokenDataModule(str(tmp_path / "nowhere"), seq_len=16, batch_size=4).setup("fit")
    assert f"data_dir {tmp_path / 'nowhere'} does not exist" in str(err.value)
    assert f"snlp-prepare --bundled --out {tmp_path / 'nowhere'}" in str(err.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest.json is missing"):
        _ = TokenDataModule(str(tmp_path / "empty"), seq_len=16, batch_size=4).vocab_size

    partial = tmp_path / "partial"
    shutil.copytree(tiny.out, partial)
    shutil.rmtree(partial / "val")
    with pytest.raises(DataError, match=r"split 'val' is missing .*val/index.json does not exist"):
        TokenDataModule(str(partial), seq_len=16, batch_size=4).setup("fit")

    with pytest.raises(DataError, match=r"the train split .* holds fewer windows of seq_len \+ 1 = 17 tokens than one batch \(100000\)"):
        TokenDataModule(str(tiny.out), seq_len=16, batch_size=100_000).train_dataloader()
