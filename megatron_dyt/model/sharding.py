"""Where every tensor of the model lives at a TP/PP layout: the one table of sharding facts.

A parameter has one canonical name at every layout (`layers.7.mlp.down.weight`). This module
says, by that name, how tensor parallelism splits it and which pipeline stage holds it. The TP
layers, the initialisation, the checkpoint readers and writers, resharding and evaluation all
ask here; nothing else spells these facts out.

TP splits follow megatron-core's layout: a column-parallel weight (`out × in`) is split along
dim 0, a row-parallel one along dim 1. With stride s the full tensor is s blocks along the split
dim ([gate; up] for the fused SwiGLU input), and each rank holds its piece of every block. The
fused QKV weight is ordered per key/value group (q heads of the group, k, v), so a plain split
along dim 0 gives each rank whole groups. Vocabulary-sized tensors have the padded vocabulary as
rows (`Config.padded_vocab_size`, which depends on the TP size); rows beyond the real vocabulary
match no token and are zero at initialisation. Everything not in the table is replicated over TP.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_dyt.config import Config
from megatron_dyt.parallel import tp_group


@dataclass(frozen=True)
class TPSplit:
    """How a tensor is cut over the tensor-parallel ranks."""

    dim: int  # 0: column-parallel (output rows), 1: row-parallel (input columns)
    stride: int = 1  # blocks along `dim` that are each split separately
    vocab: bool = False  # rows are the padded vocabulary


# Canonical name (without the `layers.N.` prefix) → its split. Replicated tensors are absent.
TP_SPLITS: dict[str, TPSplit] = {
    "embedding.word.weight": TPSplit(dim=0, vocab=True),
    "attention.qkv.weight": TPSplit(dim=0),
    "attention.proj.weight": TPSplit(dim=1),
    "mlp.gate_up.weight": TPSplit(dim=0, stride=2),
    "mlp.down.weight": TPSplit(dim=1),
    "output.head.weight": TPSplit(dim=0, vocab=True),
}
VOCAB_TENSORS: tuple[str, ...] = tuple(n for n, s in TP_SPLITS.items() if s.vocab)


def local_name(name: str) -> str:
    """A canonical name without its block prefix: `layers.7.mlp.down.weight` → `mlp.down.weight`."""
    if name.startswith("layers."):
        return name.split(".", 2)[2]
    return name


def tp_split(name: str) -> TPSplit | None:
    """How canonical tensor `name` is split over TP ranks; None if every rank holds all of it."""
    return TP_SPLITS.get(local_name(name))


def is_vocab_tensor(name: str) -> bool:
    return name in VOCAB_TENSORS


def fit_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Cut or zero-pad the padding rows of a vocab-sized tensor (TP changes the padding)."""
    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] > rows:
        return tensor[:rows]
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


class FittedVocab(Mapping[str, torch.Tensor]):
    """`full` (canonical names) with its vocabulary tensors cut or zero-padded to `rows` rows
    when they are asked for: nothing is read until then, so a lazy `full` stays lazy."""

    def __init__(self, full: Mapping[str, torch.Tensor], rows: int):
        self.full, self.rows = full, rows

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.full[name]
        return fit_rows(tensor, self.rows) if is_vocab_tensor(name) else tensor

    def __contains__(self, name: object) -> bool:
        return name in self.full

    def __iter__(self) -> Iterator[str]:
        return iter(self.full)

    def __len__(self) -> int:
        return len(self.full)


def split_shard(full: torch.Tensor, split: TPSplit, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s slice of a full tensor: each of the `stride` blocks along `dim` is cut into
    `size` pieces and the rank takes piece `rank` of every block."""
    dim, stride = split.dim, split.stride
    if full.shape[dim] % (stride * size):
        raise ValueError(
            f"dimension {dim} of size {full.shape[dim]} cannot be split into {stride} × {size} parts"
        )
    pieces = torch.chunk(full, stride * size, dim=dim)
    return torch.cat(pieces[rank::size], dim=dim)


def shard_ranges(length: int, split: TPSplit, rank: int, size: int) -> list[tuple[int, int]]:
    """The [start, stop) ranges along `split.dim` of a full tensor of that `length` which make up
    rank `rank`'s slice, in the order `split_shard` concatenates them."""
    if length % (split.stride * size):
        raise ValueError(
            f"dimension {split.dim} of size {length} cannot be split into"
            f" {split.stride} × {size} parts"
        )
    block = length // split.stride
    piece = block // size
    return [(b * block + rank * piece, b * block + (rank + 1) * piece) for b in range(split.stride)]


def merge_shards(shards: list[torch.Tensor], split: TPSplit) -> torch.Tensor:
    """Inverse of `split_shard`: the full tensor from every rank's slice, in rank order."""
    per_rank = [torch.chunk(s, split.stride, dim=split.dim) for s in shards]
    blocks = range(split.stride)
    return torch.cat([per_rank[r][b] for b in blocks for r in range(len(shards))], dim=split.dim)


def gather_full(tensor: torch.Tensor, name: str, group=None) -> torch.Tensor:
    """All-gather this rank's shard of canonical tensor `name` (a weight or its gradient) into
    the full tensor; replicated tensors come back as they are."""
    split = tp_split(name)
    if split is None:
        return tensor
    group = group if group is not None else tp_group()
    size = dist.get_world_size(group)
    if size == 1:
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    return merge_shards(shards, split)


def full_shape(name: str, local_shape: torch.Size | list[int], tp: int) -> list[int]:
    """The full shape of canonical tensor `name` whose shard at TP size `tp` has `local_shape`."""
    shape = list(local_shape)
    split = tp_split(name)
    if split is not None:
        shape[split.dim] *= tp
    return shape


# ---- pipeline stages ---------------------------------------------------------------------------
# The model is a list of pipeline layers: 0 the embedding, 1..L the blocks, L+1 the output stage
# (final norm and head). Stage p of P holds blocks [p·L/P, (p+1)·L/P), the first stage also the
# embedding and the last the output stage (the config requires P to divide L).


def stage_layers(cfg: Config, stage: int) -> list[int]:
    """Pipeline layer indices held by pipeline stage `stage`."""
    layers, pp = cfg.model.num_layers, cfg.parallel.pipeline
    if not 0 <= stage < pp:
        raise ValueError(f"stage {stage} does not exist with parallel.pipeline={pp}")
    per = layers // pp
    out = list(range(1 + stage * per, 1 + (stage + 1) * per))
    if stage == 0:
        out.insert(0, 0)
    if stage == pp - 1:
        out.append(layers + 1)
    return out


def layer_prefix(index: int, num_layers: int) -> str:
    """Canonical name prefix of pipeline layer `index`."""
    if index == 0:
        return "embedding."
    if index == num_layers + 1:
        return "output."
    return f"layers.{index - 1}."
