"""Training tokenizers: a LLaMA-style sentencepiece model, or a byte-level BPE (tokenizer.json).

Both round-trip exactly (`decode(encode(s)) == s` for any text) and give the same vocabulary for
the same inputs and seed. sentencepiece: no Unicode normalisation, whitespace kept as is, no
dummy prefix space, byte fallback for characters the vocabulary lacks, digits split; special ids
unk 0, bos 1, eos 2 (also the end-of-document token), no pad. Byte-level BPE (Hugging Face
`tokenizers`): every byte is a token, so there is no unk; no normaliser; GPT-2's pre-tokenizer
without a prefix space, digits split; special ids bos `<s>` 0, eos `</s>` 1 (end of document),
pad `<pad>` 2, then the 256 byte tokens and the merges.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from megatron_dyt.data.preprocess import DataError, DocumentReader
from megatron_dyt.data.tokenizer import HF_CONFIG, HF_JSON, HF_SPECIAL_MAP

# Lines longer than this are cut into pieces for training (sentencepiece skips longer sentences).
_TRAIN_CHUNK_CHARS = 4096
# Sentences sampled for training: enough for a good vocabulary, few enough to train in seconds.
DEFAULT_MAX_SENTENCES = 1_000_000
# The byte-level BPE's special tokens, in id order: BOS, EOS (end of document), pad.
BPE_SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


def train_tokenizer(
    inputs: Sequence[Path | str],
    out_prefix: Path | str,
    vocab_size: int,
    model_type: str = "bpe",
    text_key: str = "text",
    *,
    skip_bad: bool = False,
    max_sentences: int = DEFAULT_MAX_SENTENCES,
    seed: int = 0,
) -> Path:
    """Train a LLaMA-style sentencepiece model on the inputs; returns `<out_prefix>.model`.

    Inputs are read like `preprocess` reads them (.jsonl: one document per line under `text_key`;
    .txt/.md: the whole file is one document). sentencepiece learns from lines, so every document
    is split into its non-blank lines; at most `max_sentences` lines, chosen at random with
    `seed`, are used. The sampling is done here rather than by sentencepiece because its own
    sampling is not reproducible; the same inputs and seed give the same vocabulary (the model
    file also records the temporary path it was trained under). Both files are written to a
    temporary folder and renamed into place.
    """
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model_type={model_type!r}: choose 'bpe' or 'unigram'")
    out_prefix = Path(out_prefix)
    reader = DocumentReader(inputs, text_key=text_key, skip_bad=skip_bad)
    sentences = _sample(_training_lines(reader), max_sentences, seed)
    if not sentences:
        raise DataError(f"no text to train a tokenizer on in {', '.join(map(str, inputs))}")
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{out_prefix.name}.", suffix=".tmp", dir=out_prefix.parent)
    )
    try:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_prefix=str(tmp / "m"),
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=True,
                split_digits=True,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                character_coverage=0.9995,
                input_sentence_size=0,  # sampled above, reproducibly
                max_sentence_length=4 * _TRAIN_CHUNK_CHARS,
                num_threads=2,  # fixed: the learned vocabulary depends on the thread count
                minloglevel=2,
            )
        except RuntimeError as exc:
            raise DataError(_explain_training_error(str(exc), vocab_size)) from None
        os.replace(tmp / "m.vocab", f"{out_prefix}.vocab")
        os.replace(tmp / "m.model", f"{out_prefix}.model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Path(f"{out_prefix}.model")


def _training_lines(documents: Iterable[str]) -> Iterable[str]:
    for text in documents:
        for line in text.split("\n"):
            if line.strip():
                for i in range(0, len(line), _TRAIN_CHUNK_CHARS):
                    yield line[i : i + _TRAIN_CHUNK_CHARS]


def _sample(lines: Iterable[str], limit: int, seed: int) -> list[str]:
    """A uniform random sample of at most `limit` lines (reservoir sampling), in input order."""
    rng = random.Random(seed)
    kept: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        if i < limit:
            kept.append((i, line))
        else:
            j = rng.randrange(i + 1)
            if j < limit:
                kept[j] = (i, line)
    kept.sort()
    return [line for _, line in kept]


def _explain_training_error(message: str, vocab_size: int) -> str:
    message = message.strip().splitlines()[-1] if message.strip() else message
    small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if small:
        need = int(small.group(2))
        return (
            f"vocab_size={vocab_size} is too small for this corpus: it needs at least {need}"
            f" (256 byte tokens, 3 special tokens and {need - 259} frequent characters)"
        )
    large = re.search(
        r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message
    )
    if large:
        return (
            f"vocab_size={vocab_size} is too large for this little text: it supports at most"
            f" {large.group(1)} tokens (use more text or a smaller vocab_size)"
        )
    return f"sentencepiece could not train a {vocab_size}-token tokenizer: {message}"


def train_bpe_tokenizer(
    inputs: Sequence[Path | str],
    out_dir: Path | str,
    vocab_size: int,
    text_key: str = "text",
    *,
    skip_bad: bool = False,
    max_sentences: int = DEFAULT_MAX_SENTENCES,
    seed: int = 0,
) -> Path:
    """Train a byte-level BPE with `tokenizers`; returns `<out_dir>/tokenizer.json`.

    `out_dir` gets tokenizer.json and a tokenizer_config.json naming the special tokens, the
    folder `transformers.AutoTokenizer` loads. Documents are read like `preprocess` reads them
    and cut into pieces of at most 4096 characters (newlines and indentation stay inside, so
    whitespace runs are learned); at most `max_sentences` pieces, chosen at random with `seed`,
    are used. The files are written to a temporary folder and renamed into place, tokenizer.json
    last.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(BPE_SPECIAL_TOKENS)
    if vocab_size <= minimum:
        raise DataError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs more than"
            f" {minimum} (256 byte tokens and {len(BPE_SPECIAL_TOKENS)} special tokens)"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out '{out_dir}' is a file; the BPE tokenizer is written as a folder")
    reader = DocumentReader(inputs, text_key=text_key, skip_bad=skip_bad)
    pieces = _sample(_training_pieces(reader), max_sentences, seed)
    if not pieces:
        raise DataError(f"no text to train a tokenizer on in {', '.join(map(str, inputs))}")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(pieces, trainer, length=len(pieces))
    if backend.get_vocab_size() < vocab_size:
        raise DataError(
            f"vocab_size={vocab_size} is too large for this little text: byte-level BPE found"
            f" only {backend.get_vocab_size()} tokens (use more text or a smaller vocab_size)"
        )
    bos, eos, pad = BPE_SPECIAL_TOKENS
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        backend.save(str(tmp / HF_JSON))
        (tmp / HF_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
        out_dir.mkdir(exist_ok=True)
        (out_dir / HF_SPECIAL_MAP).unlink(missing_ok=True)  # would rename the roles
        os.replace(tmp / HF_CONFIG, out_dir / HF_CONFIG)
        os.replace(tmp / HF_JSON, out_dir / HF_JSON)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / HF_JSON


def _training_pieces(documents: Iterable[str]) -> Iterable[str]:
    for text in documents:
        for i in range(0, len(text), _TRAIN_CHUNK_CHARS):
            yield text[i : i + _TRAIN_CHUNK_CHARS]
