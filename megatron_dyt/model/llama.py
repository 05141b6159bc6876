"""The LLaMA model as a list of stage layers: embedding → blocks → final norm + head.

The blocks take the model's own config and a `BuildSpec` (the layout they are split for, what
they recompute); the assembly functions at the bottom take a run's `Config` and derive the spec.

The same modules make the unsplit `LlamaModel` and a DeepSpeed `PipelineModule`; each carries a
`canonical_prefix`, so a parameter has one name (`layers.7.mlp.down.weight`) at every TP/PP layout.
Activations are sequence-first, [s, b, h], as megatron-core's sequence parallelism needs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core import tensor_parallel
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_dyt.config import Config, ModelConfig
from megatron_dyt.errors import UsageError
from megatron_dyt.model.attention import Attention
from megatron_dyt.model.kv_cache import KVCache, LayerCache
from megatron_dyt.model.layers import (
    BuildSpec,
    column_parallel,
    megatron_config,
    vocab_parallel_embedding,
)
from megatron_dyt.model.mlp import SwiGLU
from megatron_dyt.model.sharding import stage_layers
from megatron_dyt.norms import build_norm
from megatron_dyt.parallel import mark_replicated


def _check_device(spec: BuildSpec) -> None:
    if spec.sequence_parallel and not torch.cuda.is_available():
        raise UsageError(
            "parallel.sequence_parallel=true needs CUDA: megatron-core's sequence-parallel ops"
            " do not run on CPU; set parallel.sequence_parallel=false"
        )


class EmbeddingStage(nn.Module):
    """Token embeddings (vocab-parallel), times a learnable scalar initialised to √d if enabled."""

    canonical_prefix = "embedding."

    def __init__(self, m: ModelConfig, spec: BuildSpec):
        super().__init__()
        _check_device(spec)
        self.hidden_size = m.hidden_size
        self.sequence_parallel = spec.sequence_parallel
        self.word = vocab_parallel_embedding(
            megatron_config(spec), spec.padded_vocab_size, m.hidden_size
        )
        self.scale = nn.Parameter(torch.empty(1)) if m.embedding_scale else None
        self.reset_parameters()
        mark_replicated(self, spec.sequence_parallel)

    def reset_parameters(self) -> None:
        if self.scale is not None:
            with torch.no_grad():
                self.scale.fill_(math.sqrt(self.hidden_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens [b, s] -> [s, b, h]; with sequence parallelism megatron transposes and
        # reduce-scatters to this rank's [s/tp, b, h] slice itself.
        x = self.word(tokens if self.sequence_parallel else tokens.t().contiguous())
        if self.scale is not None:
            x = x * self.scale.to(x.dtype)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm_attn(x)), then h + mlp(norm_mlp(h))."""

    def __init__(self, m: ModelConfig, spec: BuildSpec, layer_number: int):
        super().__init__()
        _check_device(spec)
        self.layer_number = layer_number
        self.canonical_prefix = f"layers.{layer_number}."
        self.recompute_block = spec.recompute == "full"
        mcfg = megatron_config(spec)
        self.attention_norm = build_norm("attention", m.hidden_size, m.norm)
        self.attention = Attention(m, mcfg, recompute_core=spec.recompute == "selective")
        self.mlp_norm = build_norm("mlp", m.hidden_size, m.norm)
        self.mlp = SwiGLU(m, mcfg)
        mark_replicated(self, spec.sequence_parallel)

    def _forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        # h = x + attn(...) and mlp_norm(h) in one call: the triton backend fuses the residual
        # add into the norm (one read and write of the hidden state fewer); same numbers.
        h, y = self.mlp_norm.forward_residual(x, self.attention(self.attention_norm(x), cache))
        return h + self.mlp(y)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """`cache`: this block's KV cache when decoding (`model/kv_cache.py`); None in training."""
        if cache is not None:
            return self._forward(x, cache)
        if self.recompute_block and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class OutputStage(nn.Module):
    """Final norm and the untied output head; returns vocab-parallel logits [s, b, v/tp]."""

    canonical_prefix = "output."

    def __init__(self, m: ModelConfig, spec: BuildSpec):
        super().__init__()
        _check_device(spec)
        self.norm = build_norm("final", m.hidden_size, m.norm)
        self.head = column_parallel(
            megatron_config(spec), m.hidden_size, spec.padded_vocab_size, "output.head.weight"
        )
        mark_replicated(self, spec.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.head(self.norm(x))
        return logits


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy from vocab-parallel logits [s, b, v/tp] and labels [b, s]."""
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous())
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.t().to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp_min(1)


def norm_names(m: ModelConfig) -> list[str]:
    """The canonical name of every norm of the whole model, in model order: the attributes of
    `TransformerBlock` and `OutputStage` under their prefixes. The same list on every rank at any
    layout (a pipeline stage holds some of them), so ranks can index the norms alike."""
    blocks = [
        f"layers.{i}.{a}" for i in range(m.num_layers) for a in ("attention_norm", "mlp_norm")
    ]
    return [*blocks, "output.norm"]


def layer_specs(cfg: Config) -> list[tuple[type[nn.Module], tuple[Any, ...]]]:
    """The model as (class, args) pairs, one per pipeline layer (`model/sharding.py`), ready to
    wrap in DeepSpeed `LayerSpec`s."""
    m, spec = cfg.model, BuildSpec.of(cfg)
    return [
        (EmbeddingStage, (m, spec)),
        *[(TransformerBlock, (m, spec, i)) for i in range(m.num_layers)],
        (OutputStage, (m, spec)),
    ]


def stage_module(cfg: Config, stage: int) -> nn.Module:
    """The layers of pipeline stage `stage` as a plain module (evaluation, conversion)."""
    specs = layer_specs(cfg)
    return nn.Sequential(*(specs[i][0](*specs[i][1]) for i in stage_layers(cfg, stage)))


def pipeline_module(cfg: Config, topology: Any, **kwargs: Any) -> nn.Module:
    """A DeepSpeed `PipelineModule` of the stage layers, split as `stage_layers` says.

    megatron-core's `parallel_state` must already be initialised: the TP layers are built inside
    this constructor and would otherwise come out unsharded.
    """
    from deepspeed.pipe import LayerSpec, PipelineModule

    module = PipelineModule(
        layers=[LayerSpec(cls, *args) for cls, args in layer_specs(cfg)],
        loss_fn=lm_loss,
        topology=topology,
        partition_method="type:TransformerBlock",
        checkpointable_layers=["TransformerBlock"],
        **kwargs,
    )
    # DeepSpeed balances the blocks itself; the checkpoint readers rely on the same split.
    parts = [stage_layers(cfg, s) for s in range(cfg.parallel.pipeline)]
    bounds = module.parts
    if [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)] != parts:
        raise AssertionError(f"DeepSpeed split the layers {module.parts}, not as {parts}")
    return module


def stage_children(module: nn.Module) -> list[nn.Module]:
    """The stage layers of a `LlamaModel` or of a `stage_module`, in order."""
    if isinstance(module, LlamaModel):
        return [module.embedding, *module.layers, module.output]
    return list(module)


def forward_cached(module: nn.Module, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run a `LlamaModel` or a pipeline stage (`stage_module`) on new positions with the KV
    cache: token ids [b, s] on the first stage, activations [s, b, h] elsewhere; the last stage
    returns vocab-parallel logits [s, b, v/tp]."""
    for layer in stage_children(module):
        if isinstance(layer, TransformerBlock):
            x = layer(x, cache.layer(layer.layer_number))
        else:
            x = layer(x)
    return x


class LlamaModel(nn.Module):
    """The unsplit model (pipeline parallel 1): same modules, run in order."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        m, spec = cfg.model, BuildSpec.of(cfg)
        self.embedding = EmbeddingStage(m, spec)
        self.layers = nn.ModuleList(TransformerBlock(m, spec, i) for i in range(m.num_layers))
        self.output = OutputStage(m, spec)

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x)
        logits = self.output(x)
        return logits if labels is None else lm_loss(logits, labels, loss_mask)
