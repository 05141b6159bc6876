"""A LLaMA whose norms are DyT or Derf, with a learned embedding scale (exported by megatron-dyt).

Self-contained: needs only `torch` and `transformers` (4.45+ or 5.x). The model is the stock
`LlamaForCausalLM` with its norm modules and its embedding swapped in place, so attention, RoPE,
the KV cache and generation are transformers' own. The norms compute in fp32 whatever the
activation dtype, as the training code does, so exported logits match the trained model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel

from .configuration_megatron_dyt import MegatronDytLlamaConfig

_SQUASH = {
    "tanh": torch.tanh,
    "hardtanh": F.hardtanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class DynamicTanh(nn.Module):
    """DyT: γ·f(α·x)+β with one learned scalar α (f = tanh unless the config says otherwise)."""

    def __init__(self, hidden_size: int, alpha0: float, beta: bool, squash: str = "tanh"):
        super().__init__()
        if squash not in _SQUASH:
            raise ValueError(f"dyt_squash={squash!r}; allowed: {', '.join(_SQUASH)}")
        self.alpha0 = float(alpha0)
        self.squash = squash
        self.alpha = nn.Parameter(torch.full((1,), self.alpha0))
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if beta else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = _compute_dtype(x)
        y = _SQUASH[self.squash](self.alpha.to(ct) * x.to(ct)) * self.weight.to(ct)
        if self.bias is not None:
            y = y + self.bias.to(ct)
        return y.to(x.dtype)


class DynamicErf(nn.Module):
    """Derf: γ·erf(α·x+s)+β with learned scalars α and s."""

    def __init__(self, hidden_size: int, alpha0: float, shift0: float, beta: bool):
        super().__init__()
        self.alpha0, self.shift0 = float(alpha0), float(shift0)
        self.alpha = nn.Parameter(torch.full((1,), self.alpha0))
        self.shift = nn.Parameter(torch.full((1,), self.shift0))
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if beta else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = _compute_dtype(x)
        y = torch.erf(self.alpha.to(ct) * x.to(ct) + self.shift.to(ct)) * self.weight.to(ct)
        if self.bias is not None:
            y = y + self.bias.to(ct)
        return y.to(x.dtype)


class PlainRMSNorm(nn.Module):
    """RMSNorm with the statistics and the γ product in fp32 (the training code's order)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = _compute_dtype(x)
        xf = x.to(ct)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(ct)).to(x.dtype)


class PlainLayerNorm(nn.Module):
    """LayerNorm with γ and β, computed in fp32."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = _compute_dtype(x)
        y = F.layer_norm(x.to(ct), x.shape[-1:], self.weight.to(ct), self.bias.to(ct), self.eps)
        return y.to(x.dtype)


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times one learned scalar (initialised to √d when training from scratch)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.scale = nn.Parameter(torch.full((1,), float(embedding_dim) ** 0.5))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(input_ids)
        return x * self.scale.to(x.dtype)


_NORMS = (DynamicTanh, DynamicErf, PlainRMSNorm, PlainLayerNorm)


def _build_norm(config: MegatronDytLlamaConfig, alpha0: float) -> nn.Module:
    h, kind = config.hidden_size, config.norm_type
    if kind == "dyt":
        return DynamicTanh(h, alpha0, config.norm_beta, config.dyt_squash)
    if kind == "derf":
        return DynamicErf(h, alpha0, config.derf_shift, config.norm_beta)
    if kind == "rmsnorm":
        return PlainRMSNorm(h, config.rms_norm_eps)
    if kind == "layernorm":
        return PlainLayerNorm(h, config.rms_norm_eps)
    raise ValueError(f"norm_type={kind!r}; allowed: dyt, derf, rmsnorm, layernorm")


def _swap_modules(model: LlamaModel, config: MegatronDytLlamaConfig) -> None:
    """Replace the stock norms (and the embedding, if scaled) of a freshly built `LlamaModel`."""
    for layer in model.layers:
        layer.input_layernorm = _build_norm(config, config.norm_alpha_attn)
        layer.post_attention_layernorm = _build_norm(config, config.norm_alpha_mlp)
    model.norm = _build_norm(config, config.norm_alpha_final)
    if config.embedding_scale:
        old = model.embed_tokens
        model.embed_tokens = ScaledEmbedding(old.num_embeddings, old.embedding_dim, old.padding_idx)


def _fill(param: nn.Parameter | None, value: float) -> None:
    # transformers marks the parameters it loaded; those keep their values.
    if param is not None and not getattr(param, "_is_hf_initialized", False):
        with torch.no_grad():
            param.fill_(value)


def _init_extra(module: nn.Module) -> None:
    """Initial values of the modules stock LLaMA does not have (only for weights not loaded)."""
    if isinstance(module, _NORMS):
        _fill(getattr(module, "alpha", None), getattr(module, "alpha0", 1.0))
        _fill(getattr(module, "shift", None), getattr(module, "shift0", 0.0))
        _fill(module.weight, 1.0)
        _fill(getattr(module, "bias", None), 0.0)
    elif isinstance(module, ScaledEmbedding):
        _fill(module.scale, float(module.embedding_dim) ** 0.5)


class MegatronDytLlamaModel(LlamaModel):
    config_class = MegatronDytLlamaConfig

    def __init__(self, config: MegatronDytLlamaConfig):
        super().__init__(config)
        _swap_modules(self, config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        _init_extra(module)


class MegatronDytLlamaForCausalLM(LlamaForCausalLM):
    config_class = MegatronDytLlamaConfig

    def __init__(self, config: MegatronDytLlamaConfig):
        super().__init__(config)
        _swap_modules(self.model, config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        _init_extra(module)


__all__ = ["MegatronDytLlamaForCausalLM", "MegatronDytLlamaModel"]
