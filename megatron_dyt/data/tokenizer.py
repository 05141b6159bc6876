"""SentencePiece tokenizers: train one LLaMA-style, and load one for preprocessing and training.

The trained models round-trip exactly (`decode(encode(s)) == s` for any text): no Unicode
normalisation, whitespace kept as is, no dummy prefix space, and byte fallback for characters the
vocabulary lacks. Special ids follow LLaMA: unk 0, bos 1, eos 2 (also the end-of-document token),
no pad.

`Tokenizer` is duck-typed to what megatron-core's `GPTDatasetConfig(tokenizer=...)` reads
(`vocab_size`, `eod`, `pad`, `unique_identifiers`) rather than subclassing its tokenizer class:
importing megatron-core costs ~10 s, and the CLI and the preprocessing workers only need
sentencepiece.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from megatron_dyt.data.preprocess import DataError, DocumentReader

# Lines longer than this are cut into pieces for training (sentencepiece skips longer sentences).
_TRAIN_CHUNK_CHARS = 4096
# Sentences sampled for training: enough for a good vocabulary, few enough to train in seconds.
DEFAULT_MAX_SENTENCES = 1_000_000
# sentencepiece replaces spaces by this meta symbol and decodes it back to a space.
_META = "\u2581"


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


class Tokenizer:
    """A sentencepiece model with the ids and methods the data pipeline and megatron-core use."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer model '{self.path}' does not exist")
        self._load(self.path.read_bytes())

    def _load(self, proto: bytes) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError, TypeError):
            raise DataError(
                f"tokenizer model '{self.path}' is not a sentencepiece model (unreadable or"
                " truncated; pass the .model file, not the .vocab)"
            ) from None
        if sp.vocab_size() == 0:
            raise DataError(f"tokenizer model '{self.path}' has an empty vocabulary")
        self._sp = sp
        self._proto = proto
        self.sha256 = hashlib.sha256(proto).hexdigest()
        # A literal U+2581 would decode as a space; encode it as its UTF-8 bytes instead.
        meta_bytes = [sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode()]
        self._meta_ids = meta_bytes if all(sp.is_byte(i) for i in meta_bytes) else None
        # megatron-core hashes this into its dataset cache names (it is serialised with the
        # dataset config); the model's content, not its path, identifies the tokenizer.
        self.unique_identifiers = {"class": "SentencePieceTokenizer", "sha256": self.sha256}

    def __getstate__(self) -> dict:
        # Datasets hold the tokenizer (through their config) and get pickled into data workers.
        return {"path": str(self.path), "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.path = Path(state["path"])
        self._load(state["proto"])

    def __repr__(self) -> str:
        return f"Tokenizer('{self.path}', vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def eod(self) -> int:
        """End of document: appended after every document; the same id as `eos`."""
        eos = self._sp.eos_id()
        if eos < 0:
            raise DataError(
                f"tokenizer model '{self.path}' has no end-of-sequence token (eos_id=-1), which"
                " training data needs between documents; train it with an eos piece (the"
                " default of `megatron-dyt data tokenizer`)"
            )
        return eos

    @property
    def pad(self) -> int:
        """-1 when the model has no pad token (the LLaMA convention)."""
        return self._sp.pad_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        if _META not in text or self._meta_ids is None:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(_META)):
            if i:
                ids.extend(self._meta_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token: int) -> str:
        return self._sp.id_to_piece(int(token))

    # megatron-core's tokenizer vocabulary
    tokenize = encode
    detokenize = decode
