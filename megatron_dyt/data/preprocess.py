"""Tokenize a corpus into megatron-core's indexed-dataset files `<prefix>.bin` / `<prefix>.idx`.

Inputs, by file suffix:

* `.jsonl` / `.ndjson`, also compressed as `.jsonl.gz` / `.jsonl.zst` (GPT-NeoX's and the
  Pile's format): one JSON object per line with the document text under `text_key`; blank lines
  are ignored.
* `.txt` / `.text` / `.md`: the whole file is one document, byte for byte (newlines included).
* `.parquet`: one document per row, the string column `text_key`.
* a folder written by Hugging Face `datasets`' `save_to_disk` (a `Dataset`, or a `DatasetDict`
  whose `train` split is read): one document per row of `text_key`, read from disk, never the
  network.

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
COMPRESSED = (".gz", ".zst")
TEXT_SUFFIXES = (".txt", ".text", ".md")
PARQUET_SUFFIXES = (".parquet",)
ACCEPTED_INPUTS = (
    ".jsonl/.ndjson (also .gz or .zst compressed) with one JSON object per line, .txt/.md where"
    " the whole file is one document, .parquet, or a folder saved by Hugging Face datasets'"
    " save_to_disk"
)
_PARQUET_BATCH = 1024


def input_kind(path: Path) -> str | None:
    """`jsonl`, `jsonl.gz`, `jsonl.zst`, `text`, `parquet` or `hf-dataset` (a folder written by
    `save_to_disk`); None for anything else."""
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf-dataset"
        return None
    suffixes = [x.lower() for x in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSED:
        if len(suffixes) == 2 and suffixes[0] in JSONL_SUFFIXES:
            return "jsonl" + suffixes[-1]
        return None
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return None


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
        self.kinds = []
        for path in self.paths:
            if not path.exists():
                raise DataError(f"input file '{path}' does not exist")
            kind = input_kind(path)
            if kind is None:
                what = "folder" if path.is_dir() else f"file type '{''.join(path.suffixes[-2:])}'"
                raise DataError(f"input '{path}': unsupported {what} (use {ACCEPTED_INPUTS})")
            self.kinds.append(kind)

    @staticmethod
    def _size(path: Path) -> int:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size

    @property
    def total_bytes(self) -> int:
        return sum(self._size(p) for p in self.paths)

    def __iter__(self) -> Iterator[str]:
        for path, kind in zip(self.paths, self.kinds, strict=True):
            if kind.startswith("jsonl"):
                yield from self._read_jsonl(path, kind)
            elif kind == "text":
                yield from self._read_text(path)
            elif kind == "parquet":
                yield from self._read_parquet(path)
            else:
                yield from self._read_hf_dataset(path)

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

    def _read_jsonl(self, path: Path, kind: str) -> Iterator[str]:
        """Lines of a plain, gzip or zstandard file; progress counts the bytes on disk."""
        with path.open("rb") as raw_file:
            stream = _decompressed(raw_file, kind)
            start = self.bytes_read
            try:
                for number, raw in enumerate(stream, start=1):
                    self.bytes_read = start + raw_file.tell()  # on-disk (compressed) bytes
                    try:
                        text = _parse_line(raw, self.text_key)
                    except _BadLine as bad:
                        self._bad(f"{path} line {number}", bad.problem, bad.fix)
                        continue
                    if text is not None:
                        yield text
            except (OSError, EOFError, ValueError) as exc:  # a damaged or cut-off archive
                if isinstance(exc, DataError):
                    raise
                raise DataError(
                    f"input '{path}' is not a readable {kind} file ({exc}); it is damaged or"
                    " cut short"
                ) from None
            self.bytes_read = start + self._size(path)

    def _rows(self, path: Path, texts: Iterable[object], size: int, rows: int) -> Iterator[str]:
        """The documents of a table's text column; a non-string cell is a bad row."""
        start = self.bytes_read
        for number, text in enumerate(texts, start=1):
            if rows:
                self.bytes_read = start + size * number // rows
            if text is None or not isinstance(text, str):
                problem = f"{self.text_key!r} is {_json_type(text)}, not a string"
                self._bad(f"{path} row {number}", problem, "fix the row", unit="rows")
                continue
            yield text
        self.bytes_read = start + size

    def _read_parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises its own ArrowInvalid for a damaged file
            raise DataError(f"input '{path}' is not a readable parquet file ({exc})") from None
        columns = table.schema_arrow.names
        if self.text_key not in columns:
            raise DataError(
                f"input '{path}' has no column {self.text_key!r} (its columns:"
                f" {', '.join(columns)}); choose one with --text-key"
            )

        def texts() -> Iterator[object]:
            for batch in table.iter_batches(batch_size=_PARQUET_BATCH, columns=[self.text_key]):
                yield from batch.column(0).to_pylist()

        yield from self._rows(path, texts(), self._size(path), table.metadata.num_rows)

    def _read_hf_dataset(self, path: Path) -> Iterator[str]:
        from datasets import DatasetDict, load_from_disk

        try:
            data = load_from_disk(str(path))
        except Exception as exc:  # datasets raises several types for a damaged folder
            raise DataError(f"input '{path}' is not a readable saved dataset ({exc})") from None
        if isinstance(data, DatasetDict):
            if "train" not in data:
                raise DataError(
                    f"input '{path}' is a DatasetDict without a 'train' split (its splits:"
                    f" {', '.join(data)}); save the split to read with save_to_disk"
                )
            data = data["train"]
        if self.text_key not in data.column_names:
            raise DataError(
                f"input '{path}' has no column {self.text_key!r} (its columns:"
                f" {', '.join(data.column_names)}); choose one with --text-key"
            )

        def texts() -> Iterator[object]:
            for batch in data.select_columns([self.text_key]).iter(batch_size=_PARQUET_BATCH):
                yield from batch[self.text_key]

        yield from self._rows(path, texts(), self._size(path), len(data))


def _decompressed(raw_file, kind: str):
    """A line iterator over `raw_file`'s bytes, decompressed as its kind says."""
    if kind == "jsonl.gz":
        import gzip

        return gzip.GzipFile(fileobj=raw_file)
    if kind == "jsonl.zst":
        return _zstd_lines(raw_file)
    return raw_file


def _zstd_lines(raw_file, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a zstandard file of one or more frames; a file that ends inside a frame
    raises (zstandard's stream reader would just stop, dropping the documents lost)."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    frame, pending, ended = decompressor.decompressobj(), b"", True
    while data := raw_file.read(chunk):
        while data:
            out = frame.decompress(data)
            ended = frame.eof
            data = frame.unused_data if ended else b""
            if ended:
                frame = decompressor.decompressobj()
            pending += out
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line + b"\n"
    if not ended:
        raise EOFError("the file ends inside a zstandard frame")
    if pending:
        yield pending


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
