"""LLaMA with megatron-core tensor parallelism and a pluggable norm at every site."""

from megatron_dyt.model.init import (
    canonical_parameters,
    full_state_dict,
    init_weights,
    load_full_state_dict,
    load_local_state_dict,
)
from megatron_dyt.model.kv_cache import KVCache, LayerCache
from megatron_dyt.model.llama import (
    EmbeddingStage,
    LlamaModel,
    OutputStage,
    TransformerBlock,
    forward_cached,
    layer_specs,
    lm_loss,
    norm_names,
    pipeline_module,
    stage_module,
)
from megatron_dyt.model.sharding import stage_layers, tp_split

__all__ = [
    "EmbeddingStage",
    "KVCache",
    "LayerCache",
    "LlamaModel",
    "OutputStage",
    "TransformerBlock",
    "canonical_parameters",
    "forward_cached",
    "full_state_dict",
    "init_weights",
    "layer_specs",
    "lm_loss",
    "load_full_state_dict",
    "load_local_state_dict",
    "norm_names",
    "pipeline_module",
    "stage_layers",
    "stage_module",
    "tp_split",
]
