"""Which AdamW group a parameter trains in, by canonical name and size: the weight-decay
policy, the DyT-scalar learning-rate multiplier, and alignment.

ZeRO and DeepSpeed's bf16 optimizer pack each group into one flat buffer with no padding between
tensors, so a tensor whose size is not a multiple of 8 elements (16 bytes of bf16: DyT's α, the
embedding scale) would shift every tensor after it off a 16-byte boundary, and GEMMs on
misaligned weights are slow (2.2× the step time on an H200, benchmarks/README.md). Such tensors
train in groups of their own, with the same hyper-parameters.

The optimizer builds its groups from this, and the checkpoint readers use it to find a tensor's
place in a saved optimizer's groups without building a model. `GROUPING` is saved in every
checkpoint; grouping 1 (before the alignment split) is still read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from megatron_dyt.config import Config

GROUPING = 2  # 1: (weight decay, lr multiplier); 2: and unaligned sizes apart
ALIGN_ELEMENTS = 8  # 16 bytes of a 2-byte dtype


def is_dyt_scalar(name: str) -> bool:
    """DyT/Derf α and s, and the embedding scale: the scalars the paper adds."""
    return name.endswith((".alpha", ".shift")) or name == "embedding.scale"


def is_trainable(name: str, cfg: Config) -> bool:
    """Whether the optimizer holds this parameter: with `learnable_alpha: false` the DyT/Derf α
    stay at α₀ and have no optimizer state."""
    return cfg.model.norm.learnable_alpha or not name.endswith(".alpha")


def shape_of(param: torch.Tensor) -> torch.Size:
    """A parameter's own shape, also while ZeRO-3 holds it partitioned (its `.shape` is then
    the empty placeholder's)."""
    return getattr(param, "ds_shape", param.shape)


def group_key(
    name: str, shape: Sequence[int], cfg: Config, grouping: int = GROUPING
) -> tuple[float, float, bool]:
    """(weight decay, lr multiplier, apart) of a parameter: which AdamW group it belongs to.
    Groups sort by this key; `apart` (a size that would break the packing's alignment) sorts
    after the aligned group of the same hyper-parameters.

    `all` decays every parameter, α, γ, β and the embedding scale included (the paper);
    `matrices` decays only 2-D weights (Megatron's habit).
    """
    t = cfg.train
    decay = t.weight_decay if (t.weight_decay_policy == "all" or len(shape) >= 2) else 0.0
    mult = t.dyt_lr_multiplier if is_dyt_scalar(name) else 1.0
    apart = grouping >= 2 and math.prod(shape) % ALIGN_ELEMENTS != 0
    return decay, mult, apart
