"""Weight initialisation and full (layout-free) state dicts.

LLaMA practice: normal(0, std) for the embedding, QKV, gate/up and head; the attention and MLP
output projections get std/√(2·layers) when `model.init.scaled_output_init` is on; norms and the
embedding scale take their values from their own `reset_parameters`.

With `model.init.layout_invariant` a weight matrix is defined as slabs of `SLAB` rows (or, for a
row-parallel weight, columns) along its TP-split dimension, each drawn from a generator seeded by
the run seed, the tensor's canonical name and the slab's index. A rank draws only the slabs its
TP slice (`model/sharding.py`) covers, straight into its parameter: the same model at any TP/PP
layout without any rank ever holding a full tensor (a 70B model's head is 1 GiB in fp32).
Vocab-sized tensors draw only the real vocabulary rows; padding rows are zero.

Under ZeRO-3 the parameters are partitioned as they are built (`deepspeed.zero.Init`);
`init_weights` gathers one module's parameters at a time, fills them on the group's first rank
and lets DeepSpeed broadcast and re-partition them.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from megatron_dyt.config import ModelConfig
from megatron_dyt.errors import WeightsError
from megatron_dyt.model.llama import EmbeddingStage
from megatron_dyt.model.sharding import (
    full_shape,
    gather_full,
    is_vocab_tensor,
    shard_ranges,
    split_shard,
    tp_split,
)
from megatron_dyt.norms import Derf, DyT, LayerNorm, RMSNorm
from megatron_dyt.parallel import tp_rank, tp_size

_NORMS = (RMSNorm, LayerNorm, DyT, Derf)
_SCALED_OUTPUTS = ("attention.proj.weight", "mlp.down.weight")


def canonical_parameters(root: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(canonical name, parameter) for a `LlamaModel`, a `PipelineModule` or a single stage."""
    for module in root.modules():
        prefix = getattr(module, "canonical_prefix", None)
        if prefix is not None:
            for name, param in module.named_parameters():
                yield prefix + name, param


def _seed_for(seed: int, name: str, rank: int = 0) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + rank) % (2**63 - 1)


def _std(name: str, m: ModelConfig) -> float:
    std = m.init.std
    if m.init.scaled_output_init and name.endswith(_SCALED_OUTPUTS):
        std /= math.sqrt(2 * m.num_layers)
    return std


@torch.no_grad()
def init_weights(root: nn.Module, m: ModelConfig, seed: int) -> None:
    """Initialise every parameter below `root` in place (also after `to_empty` from meta, and
    ZeRO-3-partitioned ones), from the run's seed (`train.seed`)."""
    rank, size = tp_rank(), tp_size()
    for prefix, unit in _units(root):
        with _writable(unit):
            for module in unit.modules():
                if isinstance(module, (*_NORMS, EmbeddingStage)):
                    module.reset_parameters()
            for local, param in unit.named_parameters():
                if param.dim() < 2:  # norms and scalars: done by reset_parameters above
                    continue
                name, std = prefix + local, _std(prefix + local, m)
                if m.init.layout_invariant:
                    _draw_shard(param, name, std, seed, m.vocab_size, rank, size)
                else:
                    gen = torch.Generator(device=param.device)
                    param.normal_(0.0, std, generator=gen.manual_seed(_seed_for(seed, name, rank)))


def _units(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(canonical prefix, module) of the embedding, each block and the output stage."""
    for module in root.modules():
        prefix = getattr(module, "canonical_prefix", None)
        if prefix is not None:
            yield prefix, module


@contextmanager
def _writable(unit: nn.Module) -> Iterator[None]:
    """A unit's parameters whole for writing: ZeRO-3 ones are gathered, and on leaving, the
    data-parallel group's first rank's values are broadcast and partitioned again (every rank
    draws the same values, so which rank does not matter)."""
    partitioned = [p for p in unit.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        yield


SLAB = 128  # rows (columns) per seeded slab: part of what a seed means, do not change lightly


def _draw_shard(
    param: torch.Tensor, name: str, std: float, seed: int, vocab: int, rank: int, size: int
) -> None:
    """Fill this rank's TP slice of weight matrix `name` with its slabs' normal(0, std) values."""
    if param.dim() != 2:
        raise AssertionError(f"'{name}' is {param.dim()}-D; the slab init draws matrices only")
    split = tp_split(name)
    dim = split.dim if split is not None else 0
    length = full_shape(name, param.shape, size)[dim]
    real = vocab if is_vocab_tensor(name) else length  # rows past the vocabulary stay zero
    ranges = shard_ranges(length, split, rank, size) if split is not None else [(0, length)]
    width = param.shape[1 - dim]
    offset = 0
    for start, stop in ranges:
        local = param.narrow(dim, offset, stop - start)
        offset += stop - start
        if stop > real:
            local.narrow(dim, max(real, start) - start, stop - max(real, start)).zero_()
        for slab in range(start // SLAB, math.ceil(min(stop, real) / SLAB)):
            first, last = slab * SLAB, min((slab + 1) * SLAB, real)
            gen = torch.Generator().manual_seed(_seed_for(seed, f"{name}#{slab}"))
            values = torch.empty(last - first, width).normal_(0.0, std, generator=gen)
            lo, hi = max(first, start), min(last, stop)
            if lo >= hi:
                continue
            piece = values[lo - first : hi - first]
            local.narrow(dim, lo - start, hi - lo).copy_(piece if dim == 0 else piece.t())


@torch.no_grad()
def load_full_state_dict(
    root: nn.Module, full: Mapping[str, torch.Tensor], strict: bool = True
) -> None:
    """Copy full (TP=1) tensors into this rank's parameters, slicing TP-sharded ones;
    ZeRO-3-partitioned parameters are gathered one unit at a time, as `init_weights` does
    (every rank holds the same `full`)."""
    rank, size = tp_rank(), tp_size()
    for prefix, unit in _units(root):
        with _writable(unit):
            for local, param in unit.named_parameters():
                name = prefix + local
                if name not in full:
                    if strict:
                        raise WeightsError(f"tensor '{name}' is missing from the state dict")
                    continue
                tensor = full[name]
                expected = full_shape(name, param.shape, size)
                if list(tensor.shape) != expected:
                    raise WeightsError(
                        f"tensor '{name}' has shape {list(tensor.shape)}, the model expects"
                        f" {expected}"
                    )
                split = tp_split(name)
                if split is not None:
                    tensor = split_shard(tensor, split, rank, size)
                param.copy_(tensor)


@torch.no_grad()
def load_local_state_dict(root: nn.Module, local: Mapping[str, torch.Tensor]) -> None:
    """Copy this rank's own shards (saved at the same TP/PP layout) into its parameters."""
    for name, param in canonical_parameters(root):
        if name not in local:
            raise WeightsError(f"tensor '{name}' is missing from the state dict")
        if local[name].shape != param.shape:
            raise WeightsError(
                f"tensor '{name}' has shape {list(local[name].shape)} in this rank's shard, the"
                f" model expects {list(param.shape)}"
            )
        param.copy_(local[name])


@torch.no_grad()
def full_state_dict(root: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """This stage's parameters (or their gradients) as full tensors, gathered over TP."""
    out = {}
    for name, param in canonical_parameters(root):
        tensor = param.grad if grads else param.data
        if tensor is None:
            continue
        out[name] = gather_full(tensor, name).to("cpu", copy=True)
    return out
