"""Tokenize a corpus into megatron-core's indexed-dataset files `<prefix>.bin` / `<prefix>.idx`.

Inputs, by file suffix:

* `.jsonl` / `.ndjson`: one JSON object per line with the document text under `text_key`; blank
  lines are ignored.
* `.txt` / `.text` / `.md`: the whole file is one document, byte for byte (newlines included).

Every document becomes one sequence followed by the end-of-document token, so the pretraining
stream is `doc₁ EOD doc₂ EOD …`. Bad input stops the run with a `DataError` naming the file and
line, unless `skip_bad` counts and skips it. The output appears only when everything succeeded:
it is written to `<prefix>.bin.tmp` / `.idx.tmp` and renamed at the very end.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from megatron_dyt.errors import DataError

if TYPE_CHECKING:
    from megatron_dyt.data.tokenizer import Tokenizer

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")
# Documents handed to the worker pool at a time: bounds memory on corpora of any size.
_WINDOW_DOCS = 2048
_WINDOW_CHARS = 32 * 1024 * 1024


@dataclass
class PreprocessSummary:
    documents: int
    tokens: int  # EOD tokens included
    skipped: int  # bad lines/files skipped with skip_bad, and documents with no tokens
    seconds: float
    tokens_per_s: float
    files: int
    prefix: Path | None = None


class DocumentReader:
    """Iterates over the text of every document in the input files, in order.

    Missing or unsupported files are reported before anything is read. Bad lines (and text files
    that are not UTF-8) raise `DataError`, or with `skip_bad` are counted in `skipped`.
    """

    def __init__(
        self, inputs: Sequence[Path | str], text_key: str = "text", skip_bad: bool = False
    ) -> None:
        self.paths = [Path(p) for p in inputs]
        self.text_key = text_key
        self.skip_bad = skip_bad
        self.skipped = 0
        self.bytes_read = 0
        if not self.paths:
            raise DataError("no input files given")
        for path in self.paths:
            if not path.exists():
                raise DataError(f"input file '{path}' does not exist")
            if not path.is_file():
                raise DataError(f"input '{path}' is not a file")
            if path.suffix.lower() not in JSONL_SUFFIXES + TEXT_SUFFIXES:
                raise DataError(
                    f"input '{path}': unsupported file type '{path.suffix}' (use .jsonl with one"
                    " JSON object per line, or .txt/.md where the whole file is one document)"
                )

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    def __iter__(self) -> Iterator[str]:
        for path in self.paths:
            if path.suffix.lower() in JSONL_SUFFIXES:
                yield from self._read_jsonl(path)
            else:
                yield from self._read_text(path)

    def _bad(self, where: str, problem: str, fix: str, unit: str = "lines") -> None:
        if not self.skip_bad:
            raise DataError(f"{where}: {problem}; {fix}, or --skip-bad to skip such {unit}")
        self.skipped += 1

    def _read_text(self, path: Path) -> Iterator[str]:
        data = path.read_bytes()
        self.bytes_read += len(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            problem = f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
            self._bad(f"{path} line {line}", problem, "convert the file to UTF-8", unit="files")
            return
        yield text

    def _read_jsonl(self, path: Path) -> Iterator[str]:
        with path.open("rb") as stream:
            for number, raw in enumerate(stream, start=1):
                self.bytes_read += len(raw)
                try:
                    text = _parse_line(raw, self.text_key)
                except _BadLine as bad:
                    self._bad(f"{path} line {number}", bad.problem, bad.fix)
                    continue
                if text is not None:
                    yield text


class _BadLine(Exception):
    def __init__(self, problem: str, fix: str = "fix the line") -> None:
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def _parse_line(raw: bytes, key: str) -> str | None:
    """The document text of one JSONL line; None for a blank line; `_BadLine` if unusable."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadLine(
            f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
            "convert the file to UTF-8",
        ) from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _BadLine(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _BadLine(f"a JSON {_json_type(record)}, not an object")
    if key not in record:
        keys = ", ".join(list(record)[:12]) + (", …" if len(record) > 12 else "")
        raise _BadLine(
            f'no "{key}" key (keys: {keys or "none"})', "use --text-key to choose the key"
        )
    text = record[key]
    if not isinstance(text, str):
        raise _BadLine(
            f'"{key}" is a JSON {_json_type(text)}, not a string',
            "use --text-key to choose the key",
        )
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _BadLine(
                f'"{key}" holds an unpaired surrogate (\\u{ord(text[exc.start]):04x}), which is'
                " not valid Unicode text"
            ) from None
    return text


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def preprocess(
    inputs: Sequence[Path | str],
    tokenizer: Tokenizer,
    out_prefix: Path | str,
    *,
    text_key: str = "text",
    workers: int = 1,
    skip_bad: bool = False,
    append_eod: bool = True,
    progress: bool = True,
) -> PreprocessSummary:
    """Tokenize the inputs into `<out_prefix>.bin/.idx`, one sequence per document (+ EOD).

    Token ids are stored as uint16 when the vocabulary fits (megatron's `DType.optimal_dtype`),
    else int32. `workers > 1` tokenizes in a process pool; the output is byte-identical to
    `workers=1`. Nothing is written at `out_prefix` unless the whole run succeeds.
    """
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    start = time.perf_counter()
    out_prefix = Path(out_prefix)
    if out_prefix.suffix in (".bin", ".idx"):
        raise DataError(f"output prefix '{out_prefix}' ends in {out_prefix.suffix}; drop it")
    for suffix in (".bin", ".idx"):
        if Path(f"{out_prefix}{suffix}").is_dir():
            raise DataError(f"output '{out_prefix}{suffix}' is a folder; choose another --out")
    reader = DocumentReader(inputs, text_key=text_key, skip_bad=skip_bad)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = Path(f"{out_prefix}.bin.tmp"), Path(f"{out_prefix}.idx.tmp")
    documents = tokens = empty = 0
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=DType.optimal_dtype(tokenizer.vocab_size))
    try:
        with _progress_bar(reader.total_bytes, progress) as bar:
            encoder = _Encoder(tokenizer, append_eod)
            for ids in _encode_all(reader, encoder, workers):
                bar.update(reader.bytes_read - bar.n)
                if not len(ids):
                    empty += 1
                    continue
                builder.add_item(torch.from_numpy(ids))
                builder.end_document()
                documents += 1
                tokens += len(ids)
            bar.update(reader.bytes_read - bar.n)
        if documents == 0:
            raise DataError(
                f"no documents in {', '.join(map(str, reader.paths))}"
                + (f" ({reader.skipped} bad lines/files skipped)" if reader.skipped else "")
            )
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, f"{out_prefix}.bin")
        os.replace(tmp_idx, f"{out_prefix}.idx")
    except BaseException:
        builder.data_file.close()
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - start
    return PreprocessSummary(
        documents=documents,
        tokens=tokens,
        skipped=reader.skipped + empty,
        seconds=seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        files=len(reader.paths),
        prefix=out_prefix,
    )


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="tokenizing",
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
    )


class _Encoder:
    """Text → int32 token array (+ EOD); one per process."""

    def __init__(self, tokenizer: Tokenizer, append_eod: bool) -> None:
        self.tokenizer = tokenizer
        self.eod = [tokenizer.eod] if append_eod else []

    def __call__(self, text: str) -> np.ndarray:
        ids = self.tokenizer.encode(text)  # no tokens: an empty document, skipped (no lone EOD)
        return np.asarray(ids + self.eod if ids else ids, dtype=np.int32)


_worker_encoder: _Encoder | None = None


def _init_worker(encoder: _Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(text: str) -> np.ndarray:
    assert _worker_encoder is not None
    return _worker_encoder(text)


def _encode_all(documents: Iterable[str], encoder: _Encoder, workers: int) -> Iterator[np.ndarray]:
    """Token arrays in document order, from this process or a pool of `workers` processes."""
    if workers <= 1:
        yield from map(encoder, documents)
        return
    # fork where there is one: spawn re-runs the caller's __main__ (and fails for `python -`);
    # the workers only run sentencepiece, so threads the parent may have (torch) do not matter.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(encoder,)) as pool:
        for window in _windows(documents):
            chunksize = max(1, len(window) // (4 * workers))
            yield from pool.imap(_encode_in_worker, window, chunksize)


def _windows(documents: Iterable[str]) -> Iterator[list[str]]:
    window: list[str] = []
    chars = 0
    for text in documents:
        window.append(text)
        chars += len(text)
        if len(window) >= _WINDOW_DOCS or chars >= _WINDOW_CHARS:
            yield window
            window, chars = [], 0
    if window:
        yield window
