"""Construction helpers shared by the model's modules: what they are built for (`BuildSpec`),
megatron-core's layer config and the TP layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig

from megatron_dyt.config import Config, Recompute
from megatron_dyt.model.sharding import TPSplit, tp_split
from megatron_dyt.parallel import mark_sharded, tp_group


@dataclass(frozen=True)
class BuildSpec:
    """What the modules need besides `ModelConfig`: the layout they are split for and what they
    recompute in the backward. The model never reads the rest of a run's config."""

    tensor: int = 1
    pipeline: int = 1
    sequence_parallel: bool = False
    recompute: Recompute = "none"  # train.activation_checkpointing
    padded_vocab_size: int = 0  # rows of the embedding and head at this TP size

    @classmethod
    def of(cls, cfg: Config) -> BuildSpec:
        p = cfg.parallel
        return cls(
            tensor=p.tensor,
            pipeline=p.pipeline,
            sequence_parallel=p.sequence_parallel,
            recompute=cfg.train.activation_checkpointing,
            padded_vocab_size=cfg.padded_vocab_size,
        )


def megatron_config(spec: BuildSpec) -> ModelParallelConfig:
    # Weights are allocated on the current default device (meta, CPU or CUDA) in the default
    # dtype (the trainer builds under both: `training/engine.py`) and initialised by
    # `megatron_dyt.model.init`, not by megatron-core, so every layout starts from the same model.
    params_dtype = torch.get_default_dtype()
    return ModelParallelConfig(
        tensor_model_parallel_size=spec.tensor,
        pipeline_model_parallel_size=spec.pipeline,
        sequence_parallel=spec.sequence_parallel,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
    )


def _no_init(_: torch.Tensor) -> None:
    """megatron-core wants an init method; ours runs later (`model.init.init_weights`)."""


def _split(tensor: str, dim: int) -> TPSplit:
    """The table's split of `tensor`, which the layer type must agree with."""
    split = tp_split(tensor)
    if split is None or split.dim != dim:
        raise AssertionError(f"model/sharding.py has no dim-{dim} split for '{tensor}'")
    return split


def column_parallel(
    mcfg: ModelParallelConfig, in_features: int, out_features: int, tensor: str
) -> tensor_parallel.ColumnParallelLinear:
    """Output rows split over TP; `tensor` (canonical name) looks up its stride."""
    split = _split(tensor, dim=0)
    layer = tensor_parallel.ColumnParallelLinear(
        in_features,
        out_features,
        config=mcfg,
        init_method=_no_init,
        bias=False,
        gather_output=False,
        stride=split.stride,
        tp_group=tp_group(),
    )
    mark_sharded(layer.weight, dim=0, stride=split.stride)
    return layer


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's layer, handing its TP group to the linear function it calls.

    megatron-core 0.16 calls it with `tp_group=None`, and it then warns on every call ("tp_group
    is None, using default tp group") before looking the group up. A warning is a graph break
    under torch.compile (`fullgraph=True` fails on the block); with the group passed there is
    none. The function needs the group only for sequence parallelism or an all-reduce of the
    input gradient, which a row-parallel layer does neither of, so the numbers do not change.
    """

    def _forward_impl(self, input, weight, *args, **kwargs):
        kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


def row_parallel(
    mcfg: ModelParallelConfig, in_features: int, out_features: int, tensor: str
) -> tensor_parallel.RowParallelLinear:
    """Input columns split over TP (the input arrives split the same way)."""
    _split(tensor, dim=1)
    layer = RowParallelLinear(
        in_features,
        out_features,
        config=mcfg,
        init_method=_no_init,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=True,
        tp_group=tp_group(),
    )
    mark_sharded(layer.weight, dim=1)
    return layer


def vocab_parallel_embedding(
    mcfg: ModelParallelConfig, vocab: int, hidden: int
) -> tensor_parallel.VocabParallelEmbedding:
    layer = tensor_parallel.VocabParallelEmbedding(
        vocab,
        hidden,
        init_method=_no_init,
        reduce_scatter_embeddings=mcfg.sequence_parallel,
        config=mcfg,
        tp_group=tp_group(),
    )
    mark_sharded(layer.weight, dim=_split("embedding.word.weight", dim=0).dim)
    return layer
