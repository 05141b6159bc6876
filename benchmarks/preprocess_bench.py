"""`data preprocess` against the bare tokenizer: the overhead of our pipeline (reading, JSON,
the worker pool, writing the indexed dataset), measured in one run.

    python benchmarks/preprocess_bench.py [--workers 2] [--repeat 3] [--json OUT.json]

Both sides tokenize the same documents with the same tokenizer in the same number of processes:
the baseline is `multiprocessing.Pool(workers).map(tokenizer.encode, documents)` over documents
already in memory, with no reading, no JSON, no writing; ours is `preprocess(...)` from a
`.jsonl` file (and from `.jsonl.zst`) to `<prefix>.bin/.idx`. Each is timed `--repeat` times,
alternating, and the medians compared. The corpus is the standard-library sources the demo corpus
uses, repeated to `--megabytes`; the tokenizer is a sentencepiece model trained on it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

_tokenizer = None


def _init(path: str) -> None:
    global _tokenizer
    from megatron_dyt.data import load_tokenizer

    _tokenizer = load_tokenizer(path)


def _encode(text: str) -> int:
    return len(_tokenizer.encode(text)) + 1  # + EOD, as preprocess counts


def bare(documents: list[str], tokenizer: str, workers: int) -> tuple[float, int]:
    """Seconds and tokens of the tokenizer alone over `documents`, in `workers` processes."""
    context = multiprocessing.get_context("fork")
    start = time.perf_counter()
    with context.Pool(workers, initializer=_init, initargs=(tokenizer,)) as pool:
        tokens = sum(
            pool.map(_encode, documents, chunksize=max(1, len(documents) // (8 * workers)))
        )
    return time.perf_counter() - start, tokens


def run(megabytes: float, workers: int, repeat: int) -> dict:
    import zstandard

    from megatron_dyt.data import load_tokenizer, preprocess, train_tokenizer
    from megatron_dyt.data.corpus import stdlib_documents

    work = Path(tempfile.mkdtemp(prefix="preprocess-bench-"))
    base = [text for _, text in stdlib_documents(budget_bytes=4_000_000)]
    documents, size = [], 0
    while size < megabytes * 1e6:
        for text in base:
            documents.append(text)
            size += len(text.encode())
    lines = "".join(json.dumps({"text": t}) + "\n" for t in documents)
    (work / "corpus.jsonl").write_text(lines)
    (work / "corpus.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    model = train_tokenizer([work / "corpus.jsonl"], work / "tok", 32000)
    tokenizer = load_tokenizer(model)
    # warm-up: imports (torch, megatron-core's writer) and page cache, not timed
    (work / "small.jsonl").write_text("".join(lines.splitlines(keepends=True)[:20]))
    preprocess([work / "small.jsonl"], tokenizer, work / "small", workers=workers, progress=False)
    times: dict[str, list[float]] = {"bare": [], "jsonl": [], "jsonl.zst": []}
    tokens = {}
    for _ in range(repeat):
        seconds, tokens["bare"] = bare(documents, str(model), workers)
        times["bare"].append(seconds)
        for kind in ("jsonl", "jsonl.zst"):
            start = time.perf_counter()
            summary = preprocess(
                [work / f"corpus.{kind}"], tokenizer, work / "out", workers=workers, progress=False
            )
            times[kind].append(time.perf_counter() - start)
            tokens[kind] = summary.tokens
    assert tokens["bare"] == tokens["jsonl"] == tokens["jsonl.zst"], tokens
    median = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        {
            "what": k,
            "seconds": median[k],
            "tokens_per_s": tokens[k] / median[k],
            "overhead_vs_bare": median[k] / median["bare"] - 1,
        }
        for k in times
    ]
    return {
        "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} CPU(s)",
        "python": platform.python_version(),
        "workers": workers,
        "repeat": repeat,
        "documents": len(documents),
        "megabytes": size / 1e6,
        "tokens": tokens["bare"],
        "tokenizer": "sentencepiece BPE, 32000 tokens, trained on the same text",
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--megabytes", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run(args.megabytes, args.workers, args.repeat)
    print(
        f"{result['documents']:,} documents, {result['megabytes']:.1f} MB, {result['tokens']:,}"
        f" tokens, {args.workers} processes ({result['machine']})"
    )
    print(f"{'what':<22}{'seconds':>9}{'tokens/s':>12}{'vs bare':>10}")
    for row in result["rows"]:
        name = "tokenizer alone" if row["what"] == "bare" else f"preprocess .{row['what']}"
        print(
            f"{name:<22}{row['seconds']:>9.2f}{row['tokens_per_s']:>12,.0f}"
            f"{row['overhead_vs_bare']:>+9.1%}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
