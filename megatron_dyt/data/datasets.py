"""Training and validation datasets, built by megatron-core's `BlendedMegatronDatasetBuilder`.

What a sample is: `dataset[i]` (i a global sample index, 0 ≤ i < len(dataset)) is a dict of 1-D
tensors of length `model.seq_length`, cut from a window of seq_length + 1 tokens of the shuffled
document stream `doc EOD doc EOD …` (windows cross document boundaries):

* `tokens` (int64): the window without its last token,
* `labels` (int64): the window without its first token, i.e. `labels[t] == tokens[t + 1]`,
* `loss_mask` (float32): all ones (no EOD masking),
* `position_ids` (int64): 0 … seq_length-1 (not reset at EOD),
* `dataset_id` (only for a blend of several prefixes): which prefix the sample came from.

There is no attention mask (causal attention makes its own). The order is fixed by `train.seed`
alone: megatron shuffles documents and samples with `numpy.random.RandomState(seed)` and knows
nothing of data-parallel ranks (`GPTDatasetConfig.data_parallel_size` stays at 1; megatron-core
0.16 uses it only for hybrid context parallelism), so the trainer splits global sample indices
among ranks and any DP size sees the same stream. A dataset may hold more samples than asked for
(a single prefix is built in whole epochs).

The index files megatron writes are cached under `<data.cache_dir>/index-cache/<fingerprint>`,
where the fingerprint changes whenever a `.bin`/`.idx` file changes (megatron's own cache key
knows only the prefix string, so a rebuilt dataset would otherwise reuse stale indices).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from megatron_dyt.data.corpus import ensure_demo_data, file_lock
from megatron_dyt.data.tokenizer import ACCEPTED, Tokenizer, load_tokenizer
from megatron_dyt.errors import DataError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from megatron_dyt.config import Config

DEMO_SEED = 0  # the demo tokenizer does not depend on train.seed


def resolve_data(cfg: Config) -> tuple[Tokenizer, list[str], list[float] | None]:
    """The tokenizer, dataset prefixes and blend weights a config names, checked to exist.

    With `data.demo`, the embedded demo corpus is built (or reused) with `model.vocab_size`
    tokens. Inside a process group, global rank 0 builds it first while the others wait.
    """
    data = cfg.data
    if data.demo:
        demo = _demo_data(cfg)
        return load_tokenizer(demo.tokenizer_path), [str(demo.data_prefix)], None
    if not data.tokenizer:
        raise DataError(
            "data.tokenizer is not set: give the tokenizer the data was tokenized with"
            f" ({ACCEPTED}), or data.demo=true to use the built-in demo corpus"
        )
    try:
        tokenizer = load_tokenizer(data.tokenizer)
    except ValueError as exc:
        raise DataError(f"data.tokenizer: {exc}") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"data.tokenizer '{data.tokenizer}' has {tokenizer.vocab_size} tokens but"
            f" model.vocab_size={cfg.model.vocab_size}; set model.vocab_size >= "
            f"{tokenizer.vocab_size}"
        )
    if not data.paths:
        raise DataError(
            "data.paths is empty: list the dataset prefixes written by `megatron-dyt data"
            " preprocess --out PREFIX` (or set data.demo=true for the built-in demo corpus)"
        )
    for i, prefix in enumerate(data.paths):
        missing = [s for s in (".bin", ".idx") if not Path(prefix + s).is_file()]
        if missing:
            hint = (
                f"; give the prefix without '{Path(prefix).suffix}'"
                if Path(prefix).suffix in (".bin", ".idx")
                else ""
            )
            raise DataError(
                f"data.paths[{i}]={prefix!r}: {' and '.join(prefix + s for s in missing)}"
                f" not found{hint}"
            )
    return tokenizer, list(data.paths), data.weights


def _demo_data(cfg: Config):
    import torch.distributed as dist

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    try:
        with _rank_zero_first():
            return ensure_demo_data(
                Path(cfg.data.cache_dir), cfg.model.vocab_size, seed=DEMO_SEED, progress=rank0
            )
    except ValueError as exc:
        raise DataError(
            f"data.demo=true trains its tokenizer with model.vocab_size={cfg.model.vocab_size}"
            f" tokens: {exc}"
        ) from None


def _check_index_file(prefix: str) -> None:
    """A damaged `.idx` as one clear error naming the file, before megatron maps it (its
    reader fails on an assertion or a short buffer, and then again in `__del__`)."""
    path = Path(prefix + ".idx")
    with open(path, "rb") as fh:
        head = fh.read(34)  # magic (9), version (8), dtype code (1), sequences (8), documents (8)
    problem = None
    if len(head) < 34 or head[:9] != b"MMIDIDX\x00\x00":
        problem = "no indexed-dataset header"
    else:
        sequences, documents = struct.unpack("<QQ", head[18:34])
        needed = 34 + 12 * sequences + 8 * documents  # int32 lengths, int64 pointers and docs
        if path.stat().st_size < needed:
            problem = f"truncated: {path.stat().st_size} bytes, its header needs {needed}"
    if problem:
        raise DataError(
            f"data.paths: '{path}' is not a readable indexed dataset ({problem}); write it"
            " again with `megatron-dyt data preprocess`"
        )


def build_datasets(
    cfg: Config, tokenizer: Tokenizer | None, train_samples: int, valid_samples: int
) -> tuple[Dataset, Dataset | None]:
    """The train and validation datasets of at least the requested numbers of samples.

    The valid dataset is None when `data.split` gives validation no share. Without weights,
    several prefixes are blended in proportion to their token counts (megatron's own unweighted
    blend stops after one epoch of each, which can be fewer samples than asked for). Inside a
    process group every rank must call this: megatron-core builds on global rank 0 first, then
    on the others.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    resolved, prefixes, weights = resolve_data(cfg)
    tokenizer = tokenizer or resolved
    for prefix in prefixes:
        _check_index_file(prefix)
    lengths = [_checked_lengths(IndexedDataset(p), p) for p in prefixes]
    if weights is not None:  # megatron needs weights > 0: leave out zero-weight prefixes
        kept = [i for i, w in enumerate(weights) if w > 0]
        prefixes, weights, lengths = (
            [prefixes[i] for i in kept],
            [float(weights[i]) for i in kept],
            [lengths[i] for i in kept],
        )
    if len(prefixes) == 1:
        weights = None  # one dataset: no blend
    elif weights is None:
        weights = [float(n.sum()) for n in lengths]

    cache = _index_cache(Path(cfg.data.cache_dir), prefixes)
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        blend=(prefixes, weights),
        split=cfg.data.split,
        path_to_cache=str(cache),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    _check_splits(cfg, prefixes, lengths, config.split_matrix)
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config
    )
    train, valid, _ = _build(builder, cache, blended=len(prefixes) > 1)
    return train, valid


def _checked_lengths(dataset, prefix: str) -> np.ndarray:
    """The sequence lengths of an opened indexed dataset, once its `.bin` is known to hold
    every token its index points at (a truncated `.bin` fails deep in a read otherwise, naming
    no file)."""
    index = dataset.index
    # Copies taken while `dataset` is alive: the arrays view a mmap its __del__ closes, and
    # touching them afterwards crashes the process.
    lengths = np.array(index.sequence_lengths)
    if len(lengths):
        pointers = np.array(index.sequence_pointers)
        needed = int(pointers[-1]) + int(lengths[-1]) * index.dtype_size
        path = Path(prefix + ".bin")
        size = path.stat().st_size
        if size < needed:
            raise DataError(
                f"data.paths: '{path}' is truncated ({size} bytes; its index '{prefix}.idx'"
                f" points at {needed}); write it again with `megatron-dyt data preprocess`"
            )
    return lengths


def _check_splits(cfg: Config, prefixes: list[str], lengths: list, split_matrix: list) -> None:
    """Every split in use must get tokens from every prefix (megatron loops forever otherwise)."""
    for prefix, sizes in zip(prefixes, lengths, strict=True):
        n = len(sizes)
        for name, bounds in zip(("train", "valid", "test"), split_matrix, strict=True):
            if bounds is None:
                continue
            beg, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
            if int(sizes[beg:end].sum()) == 0:
                raise DataError(
                    f"data.split={cfg.data.split!r} leaves the {name} split of '{prefix}' ({n}"
                    f" documents) without documents; add data or change data.split"
                )


def _index_cache(cache_dir: Path, prefixes: list[str]) -> Path:
    """`<cache_dir>/index-cache/<fingerprint of the data files>`."""
    stats = []
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            st = os.stat(prefix + suffix)
            stats.append([os.path.abspath(prefix + suffix), st.st_size, st.st_mtime_ns])
    key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]
    path = cache_dir / "index-cache" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build(builder, cache: Path, blended: bool) -> list:
    """Run megatron's builder safely alongside other processes sharing the cache.

    megatron writes its index files in place (not atomically). Within a process group it builds
    on rank 0 behind a barrier; a file lock, taken by rank 0 (or the single process) only, also
    keeps separate jobs from writing the same files at once.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_rank() != 0:
            return builder.build()
        with file_lock(cache / ".lock"):
            return builder.build()
    with file_lock(cache / ".lock"), _private_process_group(blended):
        return builder.build()


@contextlib.contextmanager
def _private_process_group(needed: bool) -> Iterator[None]:
    """A one-process gloo group for the duration of the block.

    megatron-core's BlendedDataset calls `torch.distributed.get_rank()` on a cache miss even when
    no process group exists; a private group makes blends work in a single process too.
    """
    import torch.distributed as dist

    if not needed or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _rank_zero_first() -> Iterator[None]:
    """Global rank 0 runs the block first; the other ranks run it after rank 0 is done."""
    import torch.distributed as dist

    initialized = dist.is_initialized()
    first = initialized and dist.get_rank() == 0
    if initialized and not first:
        dist.barrier()
    try:
        yield
    finally:
        if first:
            dist.barrier()
