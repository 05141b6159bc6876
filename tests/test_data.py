"""The data pipeline: tokenizer, preprocessing, demo corpus, megatron-core datasets, CLI."""

from __future__ import annotations

import argparse
import json
import pickle
import threading
from collections import Counter
from pathlib import Path

import distributed
import numpy as np
import pytest
import torch
from common import tiny_dict

from megatron_dyt.config import config_from_dict
from megatron_dyt.data import (
    DataError,
    Tokenizer,
    build_datasets,
    ensure_demo_data,
    load_tokenizer,
    preprocess,
    resolve_data,
    train_tokenizer,
)
from megatron_dyt.data.cli import add_data_commands
from megatron_dyt.data.corpus import stdlib_documents

TRICKY = [
    "hello world",
    "  two leading spaces",
    "trailing spaces   ",
    "a\nb\n\nc\t\td    e",
    "\r\nwindows line end\r\n",
    "emoji 😀🚀 and CJK 中文字符 한국어",
    "combining e\u0301, ligature ﬁ, circled ①, fullwidth ＡＢＣ",  # NFKC would change these
    "a literal ▁ meta symbol, ▁▁ twice, and ▁ at the end▁",
    "\x00\x01 control characters \x7f",
    "zero\u200bwidth \ufeffbom \U0010ffff",
    " ",
    "\n",
    "",
    "12345678901234567890 digits",
]

DOCS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "def f(x):\n    return x * 2  # doubled\n",
    *TRICKY,
]


def _write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """Some real text (standard-library sources) as .jsonl and as .txt files."""
    root = tmp_path_factory.mktemp("text")
    docs = [text for _, text in stdlib_documents(budget_bytes=400_000)]
    _write_jsonl(root / "corpus.jsonl", docs)
    for i, text in enumerate(docs[:4]):
        (root / f"doc{i}.txt").write_text(text)
    return root


@pytest.fixture(scope="module")
def tokenizer(text_dir) -> Tokenizer:
    return load_tokenizer(train_tokenizer([text_dir / "corpus.jsonl"], text_dir / "tok", 512))


# ---- tokenizer --------------------------------------------------------------------------------


def test_round_trip_is_exact(tokenizer):
    for text in TRICKY:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text, text
        assert tokenizer.unk not in ids, text  # byte fallback covers everything
    assert (
        tokenizer.encode("hi")[0] != tokenizer.bos and tokenizer.encode("hi")[-1] != tokenizer.eos
    )
    assert (tokenizer.unk, tokenizer.bos, tokenizer.eos, tokenizer.eod, tokenizer.pad) == (
        0,
        1,
        2,
        2,
        -1,
    )
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert (
        clone.encode(TRICKY[5]) == tokenizer.encode(TRICKY[5]) and clone.sha256 == tokenizer.sha256
    )


def _pieces(tokenizer: Tokenizer) -> list[str]:
    return [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_from_txt_and_jsonl(text_dir, tmp_path, model_type):
    txt = sorted(text_dir.glob("doc*.txt"))
    out = tmp_path / "models"
    a = train_tokenizer(txt, out / "from-txt", 400, model_type)
    b = train_tokenizer([text_dir / "corpus.jsonl"], out / "from-jsonl", 400, model_type)
    again = train_tokenizer(txt, out / "again", 400, model_type)
    assert _pieces(load_tokenizer(a)) == _pieces(load_tokenizer(again))  # reproducible
    for model in (a, b):
        tok = load_tokenizer(model)
        assert tok.vocab_size == 400 and model.with_suffix(".vocab").is_file()
        assert all(tok.decode(tok.encode(t)) == t for t in TRICKY)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}.{s}" for n in ("from-txt", "from-jsonl", "again") for s in ("model", "vocab")
    )  # no temporary folders left


def test_tokenizer_errors(text_dir, tmp_path):
    with pytest.raises(ValueError, match="nope.model' does not exist"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model' is not a sentencepiece model"):
        load_tokenizer(tmp_path / "bad.model")
    with pytest.raises(ValueError, match="too small for this corpus: it needs at least"):
        train_tokenizer([text_dir / "corpus.jsonl"], tmp_path / "t", 262)
    with pytest.raises(ValueError, match="choose 'bpe' or 'unigram'"):
        train_tokenizer([text_dir / "corpus.jsonl"], tmp_path / "t", 400, "wordpiece")
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.model"]


# ---- preprocess -------------------------------------------------------------------------------


def _read_back(prefix: Path) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))  # keep it alive while reading: its arrays view a mmap
    assert dataset.index.dtype == np.uint16
    return [np.array(dataset[i]) for i in range(len(dataset))]


def test_preprocess_round_trip(tokenizer, tmp_path):
    jsonl = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    txt = tmp_path / "whole.txt"
    txt.write_text("A text file is one document.\n\nEven with blank lines.\n")
    summary = preprocess([jsonl, txt], tokenizer, tmp_path / "out" / "ds", progress=False)
    expected = [d for d in DOCS if d] + [txt.read_text()]  # an empty document is left out
    sequences = _read_back(tmp_path / "out" / "ds")
    assert len(sequences) == summary.documents == len(expected)
    assert summary.tokens == sum(map(len, sequences))
    assert summary.skipped == DOCS.count("") == 1
    assert summary.files == 2 and summary.tokens_per_s > 0
    for seq, text in zip(sequences, expected, strict=True):
        assert seq[-1] == tokenizer.eod
        assert tokenizer.decode(seq[:-1].tolist()) == text


def test_preprocess_workers_give_identical_files(tokenizer, text_dir, tmp_path):
    inputs = [text_dir / "corpus.jsonl", *sorted(text_dir.glob("doc*.txt"))]
    one = preprocess(inputs, tokenizer, tmp_path / "one", workers=1, progress=False)
    two = preprocess(inputs, tokenizer, tmp_path / "two", workers=2, progress=False)
    assert (one.documents, one.tokens) == (two.documents, two.tokens)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


BAD_CASES = {
    "not-utf8": ("bad.txt", b"fine first line\n\xff\xfe broken", r"bad\.txt line 2: not UTF-8"),
    "bad-json": (
        "bad.jsonl",
        b'{"text": "ok"}\n{"text": "cut\n',
        r"bad\.jsonl line 2: not valid JSON",
    ),
    "missing-key": (
        "bad.jsonl",
        b'{"text": "ok"}\n\n{"id": 3, "body": "x"}\n',
        r'bad\.jsonl line 3: no "text" key \(keys: id, body\); use --text-key to choose the key,'
        r" or --skip-bad to skip such lines",
    ),
    "not-a-string": ("bad.jsonl", b'{"text": ["a"]}\n', r'line 1: "text" is a JSON array'),
    "not-an-object": ("bad.jsonl", b'{"text": "ok"}\n[1, 2]\n', r"line 2: a JSON array"),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_reported_and_leaves_no_trace(tokenizer, tmp_path, case):
    name, content, message = BAD_CASES[case]
    good = _write_jsonl(tmp_path / "good.jsonl", ["first", "second"])
    bad = tmp_path / name
    bad.write_bytes(content)
    prefix = tmp_path / "ds"
    preprocess([good], tokenizer, prefix, progress=False)
    before = {s: Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx")}
    with pytest.raises(DataError, match=message):
        preprocess([good, bad], tokenizer, prefix, progress=False)
    assert {s: Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx")} == before
    assert not list(tmp_path.glob("*.tmp"))

    summary = preprocess(
        [good, bad], tokenizer, tmp_path / "skipped", progress=False, skip_bad=True
    )
    assert summary.skipped == 1
    assert summary.documents == 2 + content.count(b'"ok"')


def test_missing_input_is_an_error_even_when_skipping(tokenizer, tmp_path):
    with pytest.raises(DataError, match="nope.jsonl' does not exist"):
        preprocess([tmp_path / "nope.jsonl"], tokenizer, tmp_path / "ds", skip_bad=True)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        preprocess([tmp_path / "data.csv"], tokenizer, tmp_path / "ds")
    empty = _write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="no documents"):
        preprocess([empty], tokenizer, tmp_path / "ds", progress=False)
    assert not list(tmp_path.glob("ds*"))


def test_output_that_is_a_folder_is_refused_before_tokenizing(tokenizer, tmp_path):
    (tmp_path / "ds.bin").mkdir()
    good = _write_jsonl(tmp_path / "good.jsonl", ["first"])
    with pytest.raises(DataError, match=r"output '.*ds\.bin' is a folder; choose another --out"):
        preprocess([good], tokenizer, tmp_path / "ds", progress=False)


def test_tokenizer_without_eos_cannot_make_training_data(text_dir, tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(text_dir / "doc0.txt"),
        model_prefix=str(tmp_path / "noeos"),
        vocab_size=300,
        eos_id=-1,
        minloglevel=2,
    )
    no_eos = load_tokenizer(tmp_path / "noeos.model")  # loads: evaluation needs no EOD
    good = _write_jsonl(tmp_path / "good.jsonl", ["first"])
    with pytest.raises(ValueError, match=r"noeos\.model' has no end-of-sequence token"):
        preprocess([good], no_eos, tmp_path / "ds", progress=False)
    assert not list(tmp_path.glob("ds*"))


@pytest.mark.parametrize("damage", ["empty", "truncated", "not-an-index"])
def test_damaged_index_file_is_one_clear_error(tokenizer, tmp_path, damage):
    jsonl = _write_jsonl(tmp_path / "d.jsonl", [f"document {i} " * 40 for i in range(20)])
    preprocess([jsonl], tokenizer, tmp_path / "ds", progress=False)
    idx = tmp_path / "ds.idx"
    data = idx.read_bytes()
    idx.write_bytes(
        {"empty": b"", "truncated": data[:60], "not-an-index": b"x" * len(data)}[damage]
    )
    cfg = _cfg(tmp_path, tokenizer=str(tokenizer.path), paths=[str(tmp_path / "ds")])
    problem = "truncated: 60 bytes" if damage == "truncated" else "no indexed-dataset header"
    with pytest.raises(
        ValueError, match=rf"ds\.idx' is not a readable indexed dataset \({problem}"
    ):
        build_datasets(cfg, tokenizer, 10, 1)


def test_truncated_bin_file_is_one_clear_error(tokenizer, tmp_path):
    """A `.bin` cut short (a disk full, an interrupted copy) is found when the dataset opens,
    naming the file and both sizes, not deep in a read."""
    jsonl = _write_jsonl(tmp_path / "d.jsonl", [f"document {i} " * 40 for i in range(20)])
    preprocess([jsonl], tokenizer, tmp_path / "ds", progress=False)
    bin_file = tmp_path / "ds.bin"
    size = bin_file.stat().st_size
    bin_file.write_bytes(bin_file.read_bytes()[: size // 2])
    cfg = _cfg(tmp_path, tokenizer=str(tokenizer.path), paths=[str(tmp_path / "ds")])
    with pytest.raises(
        ValueError,
        match=rf"ds\.bin' is truncated \({size // 2} bytes; its index .* points at {size}\)",
    ):
        build_datasets(cfg, tokenizer, 10, 1)


# ---- corpus formats ---------------------------------------------------------------------------


def _write_format(root: Path, kind: str, docs: list[str]) -> Path:
    """The same documents as `kind`: jsonl(.gz/.zst), parquet, or a saved HF dataset."""
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs))
    if kind == "jsonl.gz":
        import gzip

        path = root / "docs.jsonl.gz"
        path.write_bytes(gzip.compress(lines.encode()))
    elif kind == "jsonl.zst":
        import zstandard

        path = root / "docs.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = root / "docs.parquet"
        table = pa.table({"id": list(range(len(docs))), "text": docs})
        pq.write_table(table, path, row_group_size=7)  # several row groups
    elif kind in ("hf-dataset", "hf-datasetdict"):
        from datasets import Dataset, DatasetDict

        path = root / kind
        data = Dataset.from_dict({"id": list(range(len(docs))), "text": docs})
        (DatasetDict({"train": data}) if kind == "hf-datasetdict" else data).save_to_disk(path)
    else:
        path = root / "docs.jsonl"
        path.write_text(lines)
    return path


@pytest.mark.parametrize(
    "kind", ["jsonl.gz", "jsonl.zst", "parquet", "hf-dataset", "hf-datasetdict"]
)
def test_every_corpus_format_gives_the_bytes_of_plain_jsonl(tokenizer, text_dir, tmp_path, kind):
    """Compressed JSONL, parquet and datasets saved to disk are read document for document as
    the plain JSONL: the same .bin/.idx bytes, and the documents decode back exactly."""
    docs = [text for _, text in stdlib_documents(budget_bytes=60_000)][:40]
    docs += ["", "  leading and trailing  ", "tabs\tand\nnewlines\n", "é 中文 🙂"]
    plain = preprocess([_write_format(tmp_path, "jsonl", docs)], tokenizer, tmp_path / "plain",
                       progress=False)  # fmt: skip
    source = _write_format(tmp_path, kind, docs)
    got = preprocess([source], tokenizer, tmp_path / "got", workers=2, progress=False)
    assert (got.documents, got.tokens) == (plain.documents, plain.tokens)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"got{suffix}").read_bytes() == (
            tmp_path / f"plain{suffix}"
        ).read_bytes()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(str(tmp_path / "got"))
    kept = [d for d in docs if tokenizer.encode(d)]  # an empty document has no tokens
    for i, doc in enumerate(kept):
        ids = data[i].tolist()
        assert ids[-1] == tokenizer.eod and tokenizer.decode(ids[:-1]) == doc


@pytest.mark.parametrize(
    "case,message",
    [
        ("no-column", "has no column 'text' (its columns: id, body); choose one with --text-key"),
        ("cut-gz", "is not a readable jsonl.gz file"),
        ("cut-zst", "is not a readable jsonl.zst file"),
        ("no-train", "is a DatasetDict without a 'train' split (its splits: validation)"),
        ("null-row", "row 2: 'text' is null, not a string"),
        ("folder", "unsupported folder (use .jsonl/.ndjson"),
    ],
)
def test_damaged_corpus_inputs_name_the_file(tokenizer, tmp_path, case, message):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset, DatasetDict

    lines = "".join(json.dumps({"text": f"document {i} " * 50}) + "\n" for i in range(50))
    if case == "no-column":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"id": [1], "body": ["x"]}), path)
    elif case == "cut-gz":
        path = tmp_path / "d.jsonl.gz"
        path.write_bytes(gzip.compress(lines.encode())[:-20])
    elif case == "cut-zst":
        path = tmp_path / "d.jsonl.zst"
        data = zstandard.ZstdCompressor().compress(lines.encode())
        path.write_bytes(data[: len(data) // 2])
    elif case == "no-train":
        path = tmp_path / "dd"
        DatasetDict({"validation": Dataset.from_dict({"text": ["x"]})}).save_to_disk(path)
    elif case == "null-row":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"text": ["a", None, "b"]}), path)
    else:
        path = tmp_path / "plain-folder"
        path.mkdir()
    with pytest.raises(DataError) as exc:
        preprocess([path], tokenizer, tmp_path / "out", progress=False)
    assert str(path) in str(exc.value) and message in str(exc.value)
    assert not list(tmp_path.glob("out*"))


# ---- demo corpus ------------------------------------------------------------------------------

DEMO_VOCAB = 512


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> Path:
    """The demo corpus, built by two threads at once: one builds, the other waits and reuses."""
    cache = tmp_path_factory.mktemp("cache")
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(ensure_demo_data(cache, DEMO_VOCAB, progress=False))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.built for r in results) == [False, True]
    assert results[0].tokens == results[1].tokens
    return cache


def test_demo_corpus_is_built_once_and_reused(demo_cache):
    files = [
        demo_cache / "demo" / name
        for name in (
            "corpus.jsonl",
            f"tokenizer-{DEMO_VOCAB}.model",
            f"demo-{DEMO_VOCAB}_text_document.bin",
            f"demo-{DEMO_VOCAB}_text_document.idx",
        )
    ]
    mtimes = [f.stat().st_mtime_ns for f in files]
    demo = ensure_demo_data(demo_cache, DEMO_VOCAB, progress=False)
    assert not demo.built and demo.seconds < 1
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert 3e6 <= demo.corpus_bytes <= 8e6 and demo.documents > 100 and demo.tokens > 1e6
    assert load_tokenizer(demo.tokenizer_path).vocab_size == DEMO_VOCAB
    manifest = json.loads((demo_cache / "demo" / "manifest.json").read_text())
    assert manifest["datasets"][str(DEMO_VOCAB)]["tokens"] == demo.tokens


# ---- datasets ---------------------------------------------------------------------------------


def _cfg(cache: Path, seed: int = 7, seq: int = 32, **data):
    tree = tiny_dict(vocab_size=DEMO_VOCAB, seq_length=seq)
    tree["train"]["seed"] = seed
    tree["data"] = {"cache_dir": str(cache), "split": "90,10,0", **data}
    return config_from_dict(tree)


def test_demo_datasets_give_shifted_windows(demo_cache):
    cfg = _cfg(demo_cache, demo=True)
    tokenizer, prefixes, weights = resolve_data(cfg)
    train, valid = build_datasets(cfg, tokenizer, 500, 20)
    assert len(train) >= 500 and len(valid) >= 20 and weights is None and len(prefixes) == 1
    for i in (0, 1, len(train) - 1):
        sample = train[i]
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert sample["tokens"].shape == (32,) and sample["tokens"].dtype == torch.int64
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
        assert torch.equal(sample["position_ids"], torch.arange(32))
        assert bool((sample["loss_mask"] == 1).all())
    assert torch.equal(pickle.loads(pickle.dumps(train))[3]["tokens"], train[3]["tokens"])
    _, no_valid = build_datasets(_cfg(demo_cache, demo=True, split="100,0,0"), None, 10, 0)
    assert no_valid is None


def _first_tokens(dataset, n: int = 8) -> list[list[int]]:
    return [dataset[i]["tokens"][:6].tolist() for i in range(n)]


def test_sample_order_depends_on_the_seed_only(demo_cache, tmp_path):
    demo = ensure_demo_data(demo_cache, DEMO_VOCAB, progress=False)
    data = {"tokenizer": str(demo.tokenizer_path), "paths": [str(demo.data_prefix)]}
    a, _ = build_datasets(_cfg(tmp_path / "a", **data), None, 300, 10)
    b, _ = build_datasets(_cfg(tmp_path / "b", **data), None, 300, 10)  # its own index cache
    c, _ = build_datasets(_cfg(tmp_path / "a", seed=8, **data), None, 300, 10)
    assert _first_tokens(a) == _first_tokens(b)
    assert _first_tokens(a) != _first_tokens(c)


def _two_datasets(tokenizer, root: Path) -> list[str]:
    prefixes = []
    for name, word in (("small", "alpha"), ("big", "omega")):
        texts = [f"{word} document {i}: " + f"{word} " * (20 + i % 7) for i in range(60)]
        jsonl = _write_jsonl(root / f"{name}.jsonl", texts)
        preprocess([jsonl], tokenizer, root / name, progress=False)
        prefixes.append(str(root / name))
    return prefixes


def test_blends_follow_weights(tokenizer, tmp_path):
    prefixes = _two_datasets(tokenizer, tmp_path)
    data = {"tokenizer": str(tokenizer.path), "paths": prefixes}
    train, _ = build_datasets(_cfg(tmp_path, weights=[1.0, 3.0], **data), tokenizer, 400, 8)
    samples = [train[i] for i in range(len(train))]
    counts = Counter(int(s["dataset_id"]) for s in samples)
    assert len(train) >= 400 and abs(counts[1] / len(train) - 0.75) < 0.02
    for sample in samples[:20]:
        word = ("alpha", "omega")[int(sample["dataset_id"])]
        assert word in tokenizer.decode(sample["tokens"].tolist())

    only_second, _ = build_datasets(_cfg(tmp_path, weights=[0.0, 1.0], **data), tokenizer, 50, 4)
    assert "omega" in tokenizer.decode(only_second[0]["tokens"].tolist())  # weight 0: left out
    unweighted, _ = build_datasets(_cfg(tmp_path, **data), tokenizer, 400, 8)
    assert len(unweighted) >= 400  # by token count, as many epochs as needed


def test_resolve_data_names_the_key(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="data.tokenizer is not set"):
        resolve_data(_cfg(tmp_path))
    with pytest.raises(ValueError, match="data.tokenizer: tokenizer .* does not exist"):
        resolve_data(_cfg(tmp_path, tokenizer=str(tmp_path / "x.model")))
    with pytest.raises(ValueError, match="data.paths is empty"):
        resolve_data(_cfg(tmp_path, tokenizer=str(tokenizer.path)))
    prefix = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"data.paths\[0\]=.*missing.bin and .*missing.idx"):
        resolve_data(_cfg(tmp_path, tokenizer=str(tokenizer.path), paths=[prefix]))
    small = config_from_dict(
        {**tiny_dict(vocab_size=256), "data": {"tokenizer": str(tokenizer.path)}}
    )
    with pytest.raises(ValueError, match="has 512 tokens but model.vocab_size=256"):
        resolve_data(small)


def test_split_without_documents_is_an_error(tokenizer, tmp_path):
    jsonl = _write_jsonl(tmp_path / "three.jsonl", ["one doc " * 50, "two docs " * 50, "three"])
    preprocess([jsonl], tokenizer, tmp_path / "three", progress=False)
    cfg = _cfg(tmp_path, tokenizer=str(tokenizer.path), paths=[str(tmp_path / "three")])
    with pytest.raises(ValueError, match="leaves the valid split of .* without documents"):
        build_datasets(cfg, tokenizer, 10, 1)  # megatron-core would loop forever here


def _build_on_ranks(*cfgs) -> list[list[list[int]]]:
    from megatron_dyt import parallel

    parallel.init_distributed("gloo")
    samples = []
    for cfg in cfgs:
        train, valid = build_datasets(cfg, None, 200, 10)
        samples.append(_first_tokens(train) + _first_tokens(valid, 2))
    torch.distributed.barrier()
    return samples


@pytest.mark.distributed
def test_two_ranks_build_the_same_samples_as_one_process(tokenizer, demo_cache, tmp_path):
    prefixes = _two_datasets(tokenizer, tmp_path)
    data = {"tokenizer": str(tokenizer.path), "paths": prefixes}
    blend, demo = _cfg(tmp_path / "dist", **data), _cfg(demo_cache, demo=True)
    ranks = distributed.run(_build_on_ranks, 2, blend, demo, tmp_path=tmp_path)
    train, valid = build_datasets(_cfg(tmp_path / "single", **data), None, 200, 10)
    assert ranks[0][0] == ranks[1][0] == _first_tokens(train) + _first_tokens(valid, 2)
    assert ranks[0][1] == ranks[1][1]


# ---- CLI --------------------------------------------------------------------------------------


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="megatron-dyt")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(text_dir, demo_cache, tmp_path, capsys):
    corpus = str(text_dir / "corpus.jsonl")
    assert (
        _cli("data", "tokenizer", corpus, "--out", str(tmp_path / "tok"), "--vocab-size", "400")
        == 0
    )
    assert "vocab size 400" in capsys.readouterr().out
    model = str(tmp_path / "tok.model")
    argv = ["data", "preprocess", corpus, "--tokenizer", model, "--out", str(tmp_path / "ds")]
    assert _cli(*argv, "--workers", "2", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "documents" in out and "tokens/s" in out and (tmp_path / "ds.idx").is_file()
    argv = ["data", "demo", "--cache-dir", str(demo_cache), "--vocab-size", str(DEMO_VOCAB)]
    assert _cli(*argv) == 0
    assert "reused from the cache" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        _cli("data")
    assert exit_info.value.code == 2
    with pytest.raises(DataError, match="does not exist"):
        _cli("data", "preprocess", str(tmp_path / "x.jsonl"), "--tokenizer", model, "--out", "o")
