"""The demo corpus: real text every machine has, with no download.

The documents are the source files of the running Python's standard library (tests, IDLE, lib2to3,
codec tables and installed packages left out), one file per document, taken in sorted path order
until ~6 MB. `ensure_demo_data` writes them to `<cache_dir>/demo/corpus.jsonl`, trains a BPE
tokenizer on them and tokenizes them into an indexed dataset. A manifest records what was built,
so later calls (and other processes) reuse it; a file lock lets one process build while others
wait.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_dyt.data.preprocess import preprocess
from megatron_dyt.data.tokenizer import SentencePieceTokenizer
from megatron_dyt.data.tokenizer_training import train_tokenizer
from megatron_dyt.errors import DataError

DEMO_BUDGET_BYTES = 6_000_000
# Bump when the corpus recipe changes, so existing caches are rebuilt.
_CORPUS_FORMAT = 1
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "encodings",  # codec tables: mostly \x escapes
        "ensurepip",
    }
)


@dataclass(frozen=True)
class DemoData:
    tokenizer_path: Path
    data_prefix: Path  # indexed dataset prefix: <data_prefix>.bin / .idx
    documents: int
    tokens: int
    corpus_bytes: int
    built: bool  # False when this call reused the cache
    seconds: float  # time this call took


def stdlib_documents(budget_bytes: int = DEMO_BUDGET_BYTES) -> list[tuple[str, str]]:
    """(relative path, source text) of standard-library modules, sorted by path, within budget."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(
            f"the demo corpus needs the Python standard library sources, but '{root}' is not a"
            " folder; use data.paths with your own preprocessed data instead"
        )
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        paths += [Path(folder, f).relative_to(root) for f in files if f.endswith(".py")]
    documents, used = [], 0
    for rel in sorted(paths, key=lambda p: p.as_posix()):
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        size = len(text.encode("utf-8"))
        if used + size > budget_bytes:
            break
        if text.strip():
            documents.append((rel.as_posix(), text))
            used += size
    if not documents:
        raise DataError(f"no Python sources found under '{root}' for the demo corpus")
    return documents


def ensure_demo_data(
    cache_dir: Path | str, vocab_size: int, seed: int = 0, progress: bool = True
) -> DemoData:
    """Build (first call) or reuse the demo corpus, its tokenizer and its indexed dataset.

    Safe to call from several processes at once: one builds under `<cache_dir>/demo/.lock`, the
    others wait and then reuse its output.
    """
    start = time.perf_counter()
    demo = Path(cache_dir) / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    tokenizer_path = demo / f"tokenizer-{vocab_size}.model"
    prefix = demo / f"demo-{vocab_size}_text_document"
    with file_lock(demo / ".lock"):
        manifest = _read_manifest(demo / "manifest.json")
        corpus = manifest.get("corpus")
        if not _corpus_is_current(corpus, demo / "corpus.jsonl"):
            corpus = _write_corpus(demo / "corpus.jsonl")
            manifest = {"corpus": corpus, "datasets": {}}
        entry = manifest["datasets"].get(str(vocab_size))
        built = not _dataset_is_current(entry, seed, tokenizer_path, prefix)
        if built:
            corpus_path = demo / "corpus.jsonl"
            train_tokenizer([corpus_path], demo / f"tokenizer-{vocab_size}", vocab_size, seed=seed)
            summary = preprocess(
                [corpus_path], SentencePieceTokenizer(tokenizer_path), prefix, progress=progress
            )
            entry = {
                "seed": seed,
                "documents": summary.documents,
                "tokens": summary.tokens,
                "tokenizer_sha256": _sha256(tokenizer_path),
                "bin_bytes": Path(f"{prefix}.bin").stat().st_size,
                "idx_bytes": Path(f"{prefix}.idx").stat().st_size,
            }
            manifest["datasets"][str(vocab_size)] = entry
            _write_json(demo / "manifest.json", manifest)
    seconds = time.perf_counter() - start
    if built and progress:
        print(
            f"demo corpus: {corpus['documents']} standard-library files"
            f" ({corpus['bytes'] / 1e6:.1f} MB) → {entry['tokens']:,} tokens with a"
            f" {vocab_size}-token BPE tokenizer, built in {seconds:.1f} s under {demo}",
            file=sys.stderr,
        )
    return DemoData(
        tokenizer_path=tokenizer_path,
        data_prefix=prefix,
        documents=entry["documents"],
        tokens=entry["tokens"],
        corpus_bytes=corpus["bytes"],
        built=built,
        seconds=seconds,
    )


def _python_id() -> str:
    return f"{platform.python_implementation()} {platform.python_version()}"


def _corpus_is_current(corpus: dict | None, path: Path) -> bool:
    return (
        corpus is not None
        and corpus.get("format") == _CORPUS_FORMAT
        and corpus.get("python") == _python_id()
        and corpus.get("budget_bytes") == DEMO_BUDGET_BYTES
        and path.is_file()
        and _sha256(path) == corpus.get("sha256")
    )


def _dataset_is_current(entry: dict | None, seed: int, tokenizer: Path, prefix: Path) -> bool:
    if entry is None or entry.get("seed") != seed:
        return False
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    return (
        tokenizer.is_file()
        and bin_path.is_file()
        and idx_path.is_file()
        and bin_path.stat().st_size == entry.get("bin_bytes")
        and idx_path.stat().st_size == entry.get("idx_bytes")
        and _sha256(tokenizer) == entry.get("tokenizer_sha256")
    )


def _write_corpus(path: Path) -> dict:
    documents = stdlib_documents()
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for source, text in documents:
            out.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return {
        "format": _CORPUS_FORMAT,
        "python": _python_id(),
        "budget_bytes": DEMO_BUDGET_BYTES,
        "documents": len(documents),
        "bytes": sum(len(text.encode("utf-8")) for _, text in documents),
        "sha256": _sha256(path),
    }


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) and "datasets" in manifest else {}


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path`, held for the block (waits for other holders)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
