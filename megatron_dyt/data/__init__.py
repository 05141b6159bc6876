"""Data pipeline: tokenizers (sentencepiece and Hugging Face tokenizer.json), corpus
preprocessing into megatron-core indexed datasets, the embedded demo corpus, and the GPT training datasets megatron-core builds on them.

Importing this package is cheap (no torch or megatron-core); those load when first needed.
"""

from megatron_dyt.data.corpus import DemoData, ensure_demo_data
from megatron_dyt.data.datasets import build_datasets, resolve_data
from megatron_dyt.data.preprocess import DataError, DocumentReader, PreprocessSummary, preprocess
from megatron_dyt.data.tokenizer import Tokenizer, load_tokenizer
from megatron_dyt.data.tokenizer_training import train_bpe_tokenizer, train_tokenizer

__all__ = [
    "DataError",
    "DemoData",
    "DocumentReader",
    "PreprocessSummary",
    "Tokenizer",
    "build_datasets",
    "ensure_demo_data",
    "load_tokenizer",
    "preprocess",
    "resolve_data",
    "train_bpe_tokenizer",
    "train_tokenizer",
]
