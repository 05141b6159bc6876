"""Tokenizers behind one interface: sentencepiece `.model` files and Hugging Face `tokenizer.json`.

`load_tokenizer(path)` picks the kind by file (docs/design.md §5, "Tokenizers"): a `.model`
file is sentencepiece; a `.json` file (a `tokenizer.json`) or a folder holding `tokenizer.json`
is Hugging Face `tokenizers`; a folder holding only `tokenizer.model` is sentencepiece. Anything
else is one `DataError` saying what is accepted.

Both kinds give the same interface. `encode` maps text to ids without BOS/EOS, and treats a
special token's string in the text ("</s>" in a web page) as text, never as the control id, so
documents cannot inject end-of-document tokens. The special ids — `bos`, `eos` (also `eod`, the
end of document put between documents), `pad`, `unk`, each -1 when absent — come from the
tokenizer itself: sentencepiece records them in the model; for a tokenizer.json they are the
`bos_token`/`eos_token`/`pad_token`/`unk_token` of a `tokenizer_config.json` (or
`special_tokens_map.json`) beside it, as transformers reads them, and otherwise the tokenizer's
special tokens with a conventional name (`<s>`, `</s>`, `<|endoftext|>`, ...; the table below).

`save(folder)` writes a tokenizer's own bytes under the conventional names (`tokenizer.model`,
or `tokenizer.json` with its `tokenizer_config.json` / `special_tokens_map.json`), so
`load_tokenizer(folder)` gives back the same tokenizer; checkpoints store theirs this way.

`Tokenizer` is duck-typed to what megatron-core's `GPTDatasetConfig(tokenizer=...)` reads
(`vocab_size`, `eod`, `pad`, `unique_identifiers`) rather than subclassing its tokenizer class:
importing megatron-core costs ~10 s, and the CLI and the preprocessing workers need only the
tokenizer libraries.
"""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import sentencepiece as spm

from megatron_dyt.errors import DataError

# The names a tokenizer's files have in a tokenizer folder (Hugging Face's conventions).
SP_MODEL = "tokenizer.model"
HF_JSON = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
HF_SPECIAL_MAP = "special_tokens_map.json"
TOKENIZER_FILES = (HF_JSON, HF_CONFIG, HF_SPECIAL_MAP, SP_MODEL)

ACCEPTED = (
    "accepted: a sentencepiece .model file, a Hugging Face tokenizer.json file, or a folder"
    f" holding {HF_JSON} (with an optional {HF_CONFIG}) or {SP_MODEL}"
)

# sentencepiece replaces spaces by this meta symbol and decodes it back to a space.
_META = "\u2581"

# A tokenizer.json whose config names no role: its special tokens with these names take it.
CONVENTIONAL_SPECIALS: dict[str, tuple[str, ...]] = {
    "bos_token": ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[BOS]"),
    "eos_token": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]"),
    "pad_token": ("<pad>", "<|pad|>", "[PAD]"),
    "unk_token": ("<unk>", "[UNK]"),
}


def load_tokenizer(path: Path | str) -> Tokenizer:
    """The tokenizer at `path`: a `.model` file, a tokenizer.json, or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        if (path / HF_JSON).is_file():
            return HFTokenizer(path / HF_JSON)
        if (path / SP_MODEL).is_file():
            return SentencePieceTokenizer(path / SP_MODEL)
        raise DataError(
            f"tokenizer folder '{path}' holds neither {HF_JSON} nor {SP_MODEL}; {ACCEPTED}"
        )
    if not path.exists():
        raise DataError(f"tokenizer '{path}' does not exist; {ACCEPTED}")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.name in (HF_CONFIG, HF_SPECIAL_MAP):
        raise DataError(
            f"'{path}' holds a tokenizer's settings, not the tokenizer; give the {HF_JSON}"
            " beside it or their folder"
        )
    if path.suffix == ".json":
        return HFTokenizer(path)
    hint = (
        " (sentencepiece's listing: give the .model beside it)" if path.suffix == ".vocab" else ""
    )
    raise DataError(f"tokenizer '{path}' is not a tokenizer file{hint}; {ACCEPTED}")


class Tokenizer(abc.ABC):
    """What the data pipeline, megatron-core, evaluation and the exports use of a tokenizer.

    Special ids are -1 when the tokenizer has no such token. `sha256` identifies the content
    (not the path); pickling carries the bytes, so data workers need no access to the file.
    """

    kind: ClassVar[str]  # "sentencepiece" or "huggingface"
    path: Path  # the file it was loaded from
    sha256: str
    _NO_EOS_HINT: ClassVar[str]

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """One more than the largest id: the rows an embedding needs."""

    @property
    @abc.abstractmethod
    def bos(self) -> int: ...

    @property
    @abc.abstractmethod
    def eos(self) -> int: ...

    @property
    @abc.abstractmethod
    def pad(self) -> int:
        """-1 when the tokenizer has no pad token (the LLaMA convention)."""

    @property
    @abc.abstractmethod
    def unk(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS; special-token strings in `text` are text."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abc.abstractmethod
    def id_to_piece(self, token: int) -> str:
        """The vocabulary entry of `token` (a special token's string for special ids)."""

    @abc.abstractmethod
    def files(self) -> dict[str, bytes]:
        """The tokenizer's files by their conventional name (`TOKENIZER_FILES`)."""

    @property
    def eod(self) -> int:
        """End of document: appended after every document; the same id as `eos`."""
        if self.eos < 0:
            raise DataError(
                f"tokenizer '{self.path}' has no end-of-sequence token, which training data"
                f" needs between documents; {self._NO_EOS_HINT}"
            )
        return self.eos

    @property
    def unique_identifiers(self) -> dict[str, str]:
        # megatron-core hashes this into its dataset cache names (it is serialised with the
        # dataset config); the content, not the path, identifies the tokenizer.
        return {"class": type(self).__name__, "sha256": self.sha256}

    def special_token(self, token: int) -> str | None:
        """The string of special id `token`, or None for -1."""
        return self.id_to_piece(token) if token >= 0 else None

    def save(self, folder: Path | str) -> None:
        """Write the tokenizer's files into `folder`; `load_tokenizer(folder)` loads it again."""
        for name, blob in self.files().items():
            (Path(folder) / name).write_bytes(blob)

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.path}', vocab_size={self.vocab_size})"

    # megatron-core's tokenizer vocabulary
    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.decode(ids)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; ids and pieces as the model records them."""

    kind = "sentencepiece"
    _NO_EOS_HINT = (
        "train it with an eos piece (the default of `megatron-dyt data tokenizer`) or use a"
        " tokenizer that has one"
    )

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

    def __getstate__(self) -> dict:
        # Datasets hold the tokenizer (through their config) and get pickled into data workers.
        return {"path": str(self.path), "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.path = Path(state["path"])
        self._load(state["proto"])

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
    def pad(self) -> int:
        return self._sp.pad_id()

    def encode(self, text: str) -> list[int]:
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

    def files(self) -> dict[str, bytes]:
        return {SP_MODEL: self._proto}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json, with the settings files beside it.

    Truncation and padding recorded in the file are switched off: documents are encoded whole.
    """

    kind = "huggingface"
    _NO_EOS_HINT = (
        f'name one as eos_token in a {HF_CONFIG} beside it (e.g. {{"eos_token": "</s>"}})'
    )

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer '{self.path}' does not exist")
        blobs = {HF_JSON: self.path.read_bytes()}
        for name in (HF_CONFIG, HF_SPECIAL_MAP):
            if (self.path.parent / name).is_file():
                blobs[name] = (self.path.parent / name).read_bytes()
        self._load(blobs)

    def _load(self, blobs: dict[str, bytes]) -> None:
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_str(blobs[HF_JSON].decode("utf-8"))
        except Exception as exc:  # the Rust library raises plain Exception subclasses
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"tokenizer '{self.path}' is not a Hugging Face tokenizer.json ({reason})"
            ) from None
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = True  # "</s>" in a document is text
        vocab = backend.get_vocab(with_added_tokens=True)
        if not vocab:
            raise DataError(f"tokenizer '{self.path}' has an empty vocabulary")
        self._backend = backend
        self._blobs = dict(blobs)
        self._vocab_size = max(vocab.values()) + 1
        digest = hashlib.sha256()
        for name in sorted(blobs):
            digest.update(f"{name}:{len(blobs[name])}:".encode())
            digest.update(blobs[name])
        self.sha256 = digest.hexdigest()
        settings = [(name, self._settings(name)) for name in (HF_CONFIG, HF_SPECIAL_MAP)]
        specials = {
            token.content for token in backend.get_added_tokens_decoder().values() if token.special
        }
        model_unk = getattr(backend.model, "unk_token", None)
        self._ids = {
            role: self._role_id(role, settings, specials, model_unk)
            for role in CONVENTIONAL_SPECIALS
        }

    def _settings(self, name: str) -> dict[str, Any]:
        if name not in self._blobs:
            return {}
        where = self.path.parent / name
        try:
            value = json.loads(self._blobs[name])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"'{where}' is not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise DataError(f"'{where}' must hold a JSON object, not {type(value).__name__}")
        return value

    def _role_id(
        self,
        role: str,
        settings: list[tuple[str, Mapping[str, Any]]],
        specials: set[str],
        model_unk: str | None,
    ) -> int:
        """The id of `role` ('eos_token', ...): named by a settings file, else by convention."""
        for name, values in settings:
            if role not in values:
                continue
            token = values[role]
            if isinstance(token, dict):  # an AddedToken written out by transformers
                token = token.get("content")
            if token is None:
                return -1
            where = self.path.parent / name
            if not isinstance(token, str):
                raise DataError(f"'{where}': {role}={token!r} must be a token string or null")
            token_id = self._backend.token_to_id(token)
            if token_id is None:
                raise DataError(
                    f"'{where}': {role}={token!r} is not in the vocabulary of '{self.path}'"
                )
            return token_id
        candidates = CONVENTIONAL_SPECIALS[role]
        if role == "unk_token" and model_unk is not None:  # the model's own fallback token first
            candidates, specials = (model_unk, *candidates), {*specials, model_unk}
        for token in candidates:
            token_id = self._backend.token_to_id(token) if token in specials else None
            if token_id is not None:
                return token_id
        return -1

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "blobs": self._blobs}

    def __setstate__(self, state: dict) -> None:
        self.path = Path(state["path"])
        self._load(state["blobs"])

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos(self) -> int:
        return self._ids["bos_token"]

    @property
    def eos(self) -> int:
        return self._ids["eos_token"]

    @property
    def pad(self) -> int:
        return self._ids["pad_token"]

    @property
    def unk(self) -> int:
        return self._ids["unk_token"]

    @property
    def settings(self) -> dict[str, Any]:
        """The tokenizer_config.json beside it ({} when there is none)."""
        return self._settings(HF_CONFIG)

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, token: int) -> str:
        return self._backend.id_to_token(int(token)) or ""

    def files(self) -> dict[str, bytes]:
        return dict(self._blobs)
