"""`megatron-dyt data …`: train a tokenizer, tokenize a corpus, build the demo corpus.

Errors are raised as `DataError` / `ValueError` with a message for the user; the main CLI prints
them without a traceback and exits with status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_dyt.arguments import positive_int
from megatron_dyt.errors import UsageError

DEFAULT_CACHE_DIR = ".cache/megatron-dyt"  # the default of data.cache_dir


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `data` with its subcommands; each sets `func(args) -> exit code`."""
    data = subparsers.add_parser(
        "data",
        help="train a tokenizer, tokenize a corpus, build the demo corpus",
        description="Prepare training data: tokenizers (sentencepiece or byte-level BPE) and"
        " megatron-core indexed datasets (<prefix>.bin/.idx). Inputs are .jsonl, also .jsonl.gz and"
        " .jsonl.zst (one JSON object per line, text under --text-key), .txt/.md (the whole file is"
        " one document), .parquet and folders saved by Hugging Face datasets (one document per"
        " row of --text-key).",
    )
    sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    tok = sub.add_parser(
        "tokenizer",
        help="train a tokenizer: sentencepiece (LLaMA-style) or byte-level BPE (tokenizer.json)",
        description="Train a tokenizer that round-trips text exactly: --kind sentencepiece (the"
        " default) writes PREFIX.model (byte fallback; unk 0, bos 1, eos 2, no pad); --kind bpe"
        " writes the folder PREFIX/ with tokenizer.json and tokenizer_config.json (byte-level;"
        " bos <s> 0, eos </s> 1, pad <pad> 2, no unk).",
    )
    tok.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help=".jsonl/.txt files")
    tok.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="PREFIX",
        help="sentencepiece: writes PREFIX.model and PREFIX.vocab; bpe: the folder PREFIX/",
    )
    tok.add_argument("--vocab-size", required=True, type=positive_int, metavar="N")
    tok.add_argument(
        "--kind",
        choices=("sentencepiece", "bpe"),
        default="sentencepiece",
        help="sentencepiece (default) or bpe (byte-level, Hugging Face tokenizers)",
    )
    tok.add_argument(
        "--model-type",
        choices=("bpe", "unigram"),
        help="sentencepiece's algorithm (default bpe); only with --kind sentencepiece",
    )
    tok.add_argument("--text-key", default="text", help="JSONL key holding the text")
    tok.add_argument("--skip-bad", action="store_true", help="skip bad lines/files, count them")
    tok.set_defaults(func=cmd_tokenizer)

    pre = sub.add_parser(
        "preprocess",
        help="tokenize a corpus into an indexed dataset (PREFIX.bin/.idx)",
        description="Tokenize every document, append the end-of-document token, and write"
        " megatron-core's indexed dataset; use PREFIX in data.paths.",
    )
    pre.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help=".jsonl/.txt files")
    pre.add_argument(
        "--tokenizer",
        required=True,
        type=Path,
        metavar="TOKENIZER",
        help="sentencepiece .model, tokenizer.json, or a folder holding either",
    )
    pre.add_argument("--out", required=True, type=Path, metavar="PREFIX")
    pre.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer processes")
    pre.add_argument("--text-key", default="text", help="JSONL key holding the text")
    pre.add_argument("--skip-bad", action="store_true", help="skip bad lines/files, count them")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.set_defaults(func=cmd_preprocess)

    demo = sub.add_parser(
        "demo",
        help="build (or reuse) the demo corpus from the Python standard library",
        description="Write the demo corpus, train its tokenizer and tokenize it (cached).",
    )
    demo.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(DEFAULT_CACHE_DIR),
        help=f"default: {DEFAULT_CACHE_DIR} (data.cache_dir)",
    )
    demo.add_argument(
        "--vocab-size",
        type=positive_int,
        default=4096,
        metavar="N",
        help="tokenizer size; data.demo=true builds the one of model.vocab_size (4096 in"
        " configs/tiny-*.yaml, so the default is what they train on)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from megatron_dyt.data.tokenizer import load_tokenizer
    from megatron_dyt.data.tokenizer_training import train_bpe_tokenizer, train_tokenizer

    common = dict(text_key=args.text_key, skip_bad=args.skip_bad)
    if args.kind == "bpe":
        if args.model_type is not None:
            raise UsageError(
                f"--model-type {args.model_type} is a sentencepiece option; --kind bpe trains a"
                " byte-level BPE (drop --model-type, or use --kind sentencepiece)"
            )
        path = train_bpe_tokenizer(args.inputs, args.out, args.vocab_size, **common)
        wrote = f"{path} and {path.with_name('tokenizer_config.json')}: byte-level BPE"
    else:
        model_type = args.model_type or "bpe"
        path = train_tokenizer(
            args.inputs, args.out, args.vocab_size, model_type=model_type, **common
        )
        wrote = f"{path} and {path.with_suffix('.vocab')}: sentencepiece {model_type}"
    tokenizer = load_tokenizer(path)
    ids = ", ".join(
        f"{name} {value}" if value >= 0 else f"no {name}"
        for name, value in (
            ("unk", tokenizer.unk),
            ("bos", tokenizer.bos),
            ("eos/eod", tokenizer.eod),
            ("pad", tokenizer.pad),
        )
    )
    print(f"wrote {wrote}, vocab size {tokenizer.vocab_size} ({ids})")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from megatron_dyt.data.preprocess import preprocess
    from megatron_dyt.data.tokenizer import load_tokenizer

    if args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be at least 1")
    summary = preprocess(
        args.inputs,
        load_tokenizer(args.tokenizer),
        args.out,
        text_key=args.text_key,
        workers=args.workers,
        skip_bad=args.skip_bad,
        progress=not args.no_progress,
    )
    print(
        f"wrote {args.out}.bin and {args.out}.idx from {summary.files} file(s):"
        f" {summary.documents:,} documents, {summary.tokens:,} tokens (EOD included),"
        f" {summary.skipped:,} skipped, {summary.tokens_per_s:,.0f} tokens/s"
        f" ({summary.seconds:.1f} s)"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from megatron_dyt.data.corpus import ensure_demo_data

    demo = ensure_demo_data(args.cache_dir, args.vocab_size, progress=not args.no_progress)
    state = f"built in {demo.seconds:.1f} s" if demo.built else "reused from the cache"
    print(
        f"demo corpus ({state}): {demo.documents:,} documents"
        f" ({demo.corpus_bytes / 1e6:.1f} MB), {demo.tokens:,} tokens"
    )
    print(f"  tokenizer:    {demo.tokenizer_path}")
    print(f"  data prefix:  {demo.data_prefix}")
    print("  train on it with data.demo=true (or data.tokenizer / data.paths set to these)")
    return 0
