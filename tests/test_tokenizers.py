"""Both tokenizer kinds behind one interface: exact round trips, the loader's choice by file, the
special ids read from the tokenizer itself, and a tokenizer.json carried through preprocessing,
training, the checkpoint, eval, resharding, the Hugging Face export (transformers agrees on
every id) and the import."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import distributed
import numpy as np
import pytest
from common import train_dict, train_worker

from megatron_dyt import checkpoint as ckpt
from megatron_dyt.cli import main
from megatron_dyt.data import (
    DataError,
    load_tokenizer,
    preprocess,
    train_bpe_tokenizer,
    train_tokenizer,
)
from megatron_dyt.data.corpus import stdlib_documents
from megatron_dyt.data.tokenizer import HFTokenizer, SentencePieceTokenizer

TRICKY = [
    "hello world",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple   inner    spaces",
    "a\nb\n\nc\t\td    e\n",
    "\r\nwindows line end\r\n",
    "\t\ttabs\tand\t\ttabs\t",
    "emoji 😀🚀👩‍👩‍👧 and CJK 中文字符 日本語 한국어",
    "combining e\u0301 a\u0308\u0301, ligature ﬁ, circled ①, fullwidth ＡＢＣ",  # NFKC changes these
    "a literal ▁ meta symbol, ▁▁ twice, and ▁ at the end▁",
    "\x00\x01 control characters \x7f",
    "zero\u200bwidth \ufeffbom \U0010ffff",
    "special strings are text: <s> </s> <pad> <unk> <|endoftext|>",
    " ",
    "\n",
    "",
    "12345678901234567890 digits",
]
VOCAB = 512  # the model size of `common.train_dict`


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    docs = [text for _, text in stdlib_documents(budget_bytes=300_000)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return root


@pytest.fixture(scope="module")
def bpe(text_dir) -> Path:
    """A byte-level BPE folder: tokenizer.json + tokenizer_config.json."""
    return train_bpe_tokenizer([text_dir / "corpus.jsonl"], text_dir / "bpe", VOCAB).parent


@pytest.fixture(scope="module")
def sp(text_dir) -> Path:
    return train_tokenizer([text_dir / "corpus.jsonl"], text_dir / "sp", 400)


# ---- round trips and ids ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_round_trip_is_exact(kind, sp, bpe):
    tok = load_tokenizer(sp if kind == "sentencepiece" else bpe)
    for text in TRICKY:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, text
        assert tok.unk not in ids, text  # bytes cover everything
    specials = tok.encode("x</s>y<s>z<pad>")
    assert not {tok.bos, tok.eos, tok.pad} & set(specials)  # special strings stay text
    clone = pickle.loads(pickle.dumps(tok))
    assert type(clone) is type(tok) and clone.sha256 == tok.sha256
    assert [clone.encode(t) for t in TRICKY] == [tok.encode(t) for t in TRICKY]
    assert clone.unique_identifiers == tok.unique_identifiers


def test_special_ids_of_each_trained_kind(sp, bpe):
    spm_tok, hf_tok = load_tokenizer(sp), load_tokenizer(bpe)
    ids = (spm_tok.unk, spm_tok.bos, spm_tok.eos, spm_tok.eod, spm_tok.pad)
    assert ids == (0, 1, 2, 2, -1)
    assert (hf_tok.bos, hf_tok.eos, hf_tok.eod, hf_tok.pad, hf_tok.unk) == (0, 1, 1, 2, -1)
    assert [hf_tok.id_to_piece(i) for i in range(3)] == ["<s>", "</s>", "<pad>"]
    assert hf_tok.vocab_size == VOCAB


def test_bpe_training_is_reproducible_and_checked(text_dir, bpe, tmp_path):
    corpus = [text_dir / "corpus.jsonl"]
    again = train_bpe_tokenizer(corpus, tmp_path / "again", VOCAB)
    assert again.read_bytes() == (bpe / "tokenizer.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary folder left
    with pytest.raises(DataError, match=r"vocab_size=259 is too small .* more than 259"):
        train_bpe_tokenizer(corpus, tmp_path / "small", 259)
    with pytest.raises(DataError, match="vocab_size=90000 is too large for this little text"):
        train_bpe_tokenizer(corpus, tmp_path / "large", 90000)
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="is a file; the BPE tokenizer is written as a folder"):
        train_bpe_tokenizer(corpus, tmp_path / "file", VOCAB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "file"]


# ---- the loader ---------------------------------------------------------------------------


def test_the_loader_picks_the_kind_by_file(sp, bpe, tmp_path):
    assert isinstance(load_tokenizer(sp), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(bpe / "tokenizer.json"), HFTokenizer)
    assert isinstance(load_tokenizer(bpe), HFTokenizer)
    only_sp = tmp_path / "only-sp"
    only_sp.mkdir()
    shutil.copy(sp, only_sp / "tokenizer.model")
    assert isinstance(load_tokenizer(only_sp), SentencePieceTokenizer)
    both = tmp_path / "both"
    shutil.copytree(bpe, both)
    shutil.copy(sp, both / "tokenizer.model")
    assert isinstance(load_tokenizer(both), HFTokenizer)  # tokenizer.json wins, as in transformers

    accepted = "accepted: a sentencepiece .model file, a Hugging Face tokenizer.json file"
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError, match=f"holds neither tokenizer.json nor tokenizer.model; {accepted}"
    ):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(DataError, match=f"nope' does not exist; {accepted}"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(DataError, match="holds a tokenizer's settings, not the tokenizer"):
        load_tokenizer(bpe / "tokenizer_config.json")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=f"notes.txt' is not a tokenizer file; {accepted}"):
        load_tokenizer(tmp_path / "notes.txt")
    with pytest.raises(DataError, match=r"sentencepiece's listing: give the \.model beside it"):
        load_tokenizer(sp.with_suffix(".vocab"))
    (tmp_path / "bad.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(DataError, match="bad.json' is not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_an_exported_sentencepiece_tokenizer_loads_back_with_its_ids(sp, tmp_path):
    """An export of a sentencepiece checkpoint holds tokenizer.model and the tokenizer.json
    transformers converts from it; loading the folder (as `convert from-hf` does) takes the
    tokenizer.json, which gives the same ids and special ids — except for a literal U+2581,
    which the converted tokenizer reads as a space."""
    from megatron_dyt.convert.to_hf import write_tokenizer

    ours = load_tokenizer(sp)
    write_tokenizer(ours, tmp_path, max_length=64)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, HFTokenizer) and back.vocab_size == ours.vocab_size
    assert (back.bos, back.eos, back.pad, back.unk) == (ours.bos, ours.eos, ours.pad, ours.unk)
    for text in TRICKY:
        if "\u2581" not in text:
            assert back.encode(text) == ours.encode(text), text
    (tmp_path / "tokenizer_config.json").unlink()  # the roles by their conventional names
    bare = load_tokenizer(tmp_path)
    assert (bare.bos, bare.eos, bare.pad, bare.unk) == (ours.bos, ours.eos, ours.pad, ours.unk)


def _folder(bpe: Path, root: Path, config: dict | None = None, special_map: dict | None = None):
    root.mkdir()
    shutil.copy(bpe / "tokenizer.json", root / "tokenizer.json")
    if config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (root / "special_tokens_map.json").write_text(json.dumps(special_map))
    return root


def test_special_ids_come_from_the_settings_files(bpe, text_dir, tmp_path):
    def ids(folder: Path) -> tuple[int, int, int, int]:
        tok = load_tokenizer(folder)
        return tok.bos, tok.eos, tok.pad, tok.unk

    assert ids(_folder(bpe, tmp_path / "bare")) == (0, 1, 2, -1)  # conventional names
    renamed = {"eos_token": "<pad>", "pad_token": None, "bos_token": {"content": "</s>"}}
    assert ids(_folder(bpe, tmp_path / "config", renamed)) == (1, 2, -1, -1)
    assert ids(_folder(bpe, tmp_path / "map", special_map={"eos_token": "<s>"})) == (0, 0, 2, -1)
    both = _folder(bpe, tmp_path / "both", {"eos_token": "</s>"}, {"eos_token": "<s>"})
    assert ids(both) == (0, 1, 2, -1)  # tokenizer_config.json first
    assert load_tokenizer(both).sha256 != load_tokenizer(tmp_path / "bare").sha256

    _folder(bpe, tmp_path / "unknown", {"eos_token": "<|eot_id|>"})
    with pytest.raises(DataError, match=r"eos_token='<\|eot_id\|>' is not in the vocabulary"):
        load_tokenizer(tmp_path / "unknown")
    _folder(bpe, tmp_path / "number", {"eos_token": 1})
    with pytest.raises(DataError, match="eos_token=1 must be a token string or null"):
        load_tokenizer(tmp_path / "number")
    bad = _folder(bpe, tmp_path / "badjson")
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer_config.json' is not valid JSON"):
        load_tokenizer(bad)

    no_eos = load_tokenizer(_folder(bpe, tmp_path / "noeos", {"eos_token": None}))
    assert no_eos.eos == -1  # loads: evaluation needs no end of document
    with pytest.raises(DataError, match="has no end-of-sequence token.*eos_token in a tokenizer_c"):
        preprocess([text_dir / "corpus.jsonl"], no_eos, tmp_path / "ds", progress=False)
    assert not list(tmp_path.glob("ds*"))


def test_truncation_and_padding_in_a_tokenizer_json_are_ignored(bpe, tmp_path):
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_file(str(bpe / "tokenizer.json"))
    backend.enable_truncation(4)
    backend.enable_padding(length=64, pad_id=2, pad_token="<pad>")
    (tmp_path / "t").mkdir()
    backend.save(str(tmp_path / "t" / "tokenizer.json"))
    text = TRICKY[7]
    assert load_tokenizer(tmp_path / "t").encode(text) == load_tokenizer(bpe).encode(text)


def test_preprocess_workers_give_identical_files(bpe, text_dir, tmp_path):
    """The tokenizer.json reaches forked workers whole (after training in this process)."""
    tok, inputs = load_tokenizer(bpe), [text_dir / "corpus.jsonl"]
    one = preprocess(inputs, tok, tmp_path / "one", workers=1, progress=False)
    two = preprocess(inputs, tok, tmp_path / "two", workers=2, progress=False)
    assert (one.documents, one.tokens) == (two.documents, two.tokens)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


def test_a_checkpoint_folder_stores_either_kind(sp, bpe, tmp_path):
    for source, names in [
        (sp, ["tokenizer.model"]),
        (bpe, ["tokenizer.json", "tokenizer_config.json"]),
    ]:
        folder = tmp_path / Path(source).stem
        folder.mkdir()
        assert not ckpt.has_tokenizer(folder)
        with pytest.raises(ckpt.CheckpointError, match="holds no tokenizer"):
            ckpt.read_tokenizer(folder)
        tok = load_tokenizer(source)
        tok.save(folder)
        assert sorted(p.name for p in folder.iterdir()) == names
        again = ckpt.read_tokenizer(folder)
        assert type(again) is type(tok) and again.sha256 == tok.sha256
    (tmp_path / "bpe" / "tokenizer.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="bpe': tokenizer .* is not a Hugging Face"):
        ckpt.read_tokenizer(tmp_path / "bpe")


# ---- command line -------------------------------------------------------------------------


def _read_back(prefix: Path) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [np.array(dataset[i]) for i in range(len(dataset))]


def test_cli_trains_and_uses_a_bpe_tokenizer(text_dir, tmp_path, capsys):
    corpus = str(text_dir / "corpus.jsonl")
    out = tmp_path / "tok"
    argv = ["data", "tokenizer", corpus, "--kind", "bpe", "--out", str(out), "--vocab-size", "400"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "byte-level BPE, vocab size 400 (no unk, bos 0, eos/eod 1, pad 2)" in printed
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TRICKY))
    preprocess_argv = ["data", "preprocess", str(docs), "--tokenizer", str(out / "tokenizer.json")]
    assert main([*preprocess_argv, "--out", str(tmp_path / "ds"), "--no-progress"]) == 0
    tok = load_tokenizer(out)
    sequences = _read_back(tmp_path / "ds")
    assert len(sequences) == len([t for t in TRICKY if t])
    for seq, text in zip(sequences, [t for t in TRICKY if t], strict=True):
        assert seq[-1] == tok.eod and tok.decode(seq[:-1].tolist()) == text

    capsys.readouterr()
    code = main([*argv, "--model-type", "unigram"])
    err = capsys.readouterr().err
    assert code == 2 and "--model-type unigram is a sentencepiece option" in err
    assert "Traceback" not in err
    code = main(["data", "preprocess", str(docs), "--tokenizer", str(docs), "--out", "o"])
    err = capsys.readouterr().err
    assert code == 2 and "docs.jsonl' is not a tokenizer file; accepted:" in err


# ---- training, checkpoint, eval, export, import ---------------------------------------------


def _eval(path: str, out: str) -> dict:
    from megatron_dyt.eval.run import evaluate_checkpoint

    return evaluate_checkpoint(path, ["pycloze"], batch_size=4, limit=2, out_dir=out).summary


@pytest.mark.slow
def test_a_tokenizer_json_trains_exports_and_imports(bpe, text_dir, tmp_path):
    from transformers import AutoTokenizer

    from megatron_dyt.convert.from_hf import import_from_hf
    from megatron_dyt.convert.reshard import reshard_checkpoint
    from megatron_dyt.convert.to_hf import export_to_hf

    tok = load_tokenizer(bpe)
    prefix = tmp_path / "data" / "corpus_text_document"
    preprocess([text_dir / "corpus.jsonl"], tok, prefix, progress=False)
    corpus = {"tokenizer": str(bpe), "prefix": str(prefix), "cache": str(tmp_path / "cache")}
    cfg = train_dict(corpus, train_steps=2)
    cfg["model"]["norm"]["backend"] = "torch"
    run = tmp_path / "run"
    result = distributed.run(train_worker, 1, cfg, str(run), tmp_path=tmp_path)[0]
    folder = Path(result["checkpoint"])
    assert result["step"] == 2 and len(result["losses"]) == 2
    stored = sorted(p.name for p in folder.glob("tokenizer*"))
    assert stored == ["tokenizer.json", "tokenizer_config.json"]
    assert ckpt.read_tokenizer(folder).sha256 == tok.sha256

    summary = distributed.run(_eval, 1, str(run), str(tmp_path / "eval"), tmp_path=tmp_path)[0]
    assert summary["rows"][0]["task"] == "pycloze"  # eval read the checkpoint's tokenizer.json
    resharded = reshard_checkpoint(run, tmp_path / "rs", tensor=1, progress=False)
    assert ckpt.read_tokenizer(resharded).sha256 == tok.sha256

    export = export_to_hf(run, tmp_path / "hf", progress=False)
    assert not (export / "tokenizer.model").exists()
    hf = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos, tok.eos, tok.pad)
    for text in [t for t in TRICKY if "<" not in t]:  # transformers parses special strings
        assert hf(text).input_ids == tok.encode(text), text
        assert hf.decode(tok.encode(text)) == text
    config = json.loads((export / "config.json").read_text())
    generation = json.loads((export / "generation_config.json").read_text())
    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    assert {k: config[k] for k in ids} == ids and generation == ids

    # An HF folder whose tokenizer is a tokenizer.json alone (no tokenizer.model, no config).
    (export / "tokenizer_config.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own export: no notices
        imported = import_from_hf(export, tmp_path / "imported", progress=False)
    again = ckpt.read_tokenizer(imported)
    assert isinstance(again, HFTokenizer) and not (imported / "tokenizer.model").exists()
    assert (again.bos, again.eos, again.pad) == (tok.bos, tok.eos, tok.pad)
    assert [again.encode(t) for t in TRICKY] == [tok.encode(t) for t in TRICKY]
