"""Weight initialisation and full (layout-free) state dicts.

LLaMA practice: normal(0, std) for the embedding, QKV, gate/up and head; the attention and MLP
output projections get std/√(2·layers) when `model.init.scaled_output_init` is on; norms and the
embedding scale take their values from their own `reset_parameters`.

With `model.init.layout_invariant` each full tensor is drawn from a generator seeded by the run
seed and the tensor's canonical name, then this rank keeps its TP slice (`model/sharding.py`):
the same model at any TP/PP layout. Vocab-sized tensors draw only the real vocabulary rows;
padding rows are zero.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from megatron_dyt.config import ModelConfig
from megatron_dyt.errors import WeightsError
from megatron_dyt.model.llama import EmbeddingStage
from megatron_dyt.model.sharding import (
    full_shape,
    gather_full,
    is_vocab_tensor,
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
    """Initialise every parameter below `root` in place (also after `to_empty` from meta), from
    the run's seed (`train.seed`)."""
    for module in root.modules():
        if isinstance(module, (*_NORMS, EmbeddingStage)):
            module.reset_parameters()
    rank, size = tp_rank(), tp_size()
    for name, param in canonical_parameters(root):
        if param.dim() < 2:  # norms and scalars: done by reset_parameters above
            continue
        std = _std(name, m)
        if m.init.layout_invariant:
            shape = full_shape(name, param.shape, size)
            rows = shape[0]
            if is_vocab_tensor(name):
                shape[0] = m.vocab_size
            gen = torch.Generator().manual_seed(_seed_for(seed, name))
            full = torch.empty(shape).normal_(0.0, std, generator=gen)
            if rows > shape[0]:
                full = torch.cat([full, full.new_zeros(rows - shape[0], *shape[1:])])
            split = tp_split(name)
            param.copy_(full if split is None else split_shard(full, split, rank, size))
        else:
            gen = torch.Generator(device=param.device).manual_seed(_seed_for(seed, name, rank))
            param.normal_(0.0, std, generator=gen)


@torch.no_grad()
def load_full_state_dict(
    root: nn.Module, full: Mapping[str, torch.Tensor], strict: bool = True
) -> None:
    """Copy full (TP=1) tensors into this rank's parameters, slicing TP-sharded ones."""
    rank, size = tp_rank(), tp_size()
    for name, param in canonical_parameters(root):
        if name not in full:
            if strict:
                raise WeightsError(f"tensor '{name}' is missing from the state dict")
            continue
        tensor = full[name]
        expected = full_shape(name, param.shape, size)
        if list(tensor.shape) != expected:
            raise WeightsError(
                f"tensor '{name}' has shape {list(tensor.shape)}, the model expects {expected}"
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
