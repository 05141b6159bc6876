"""Rotary position embeddings, in the rotate-half convention (the Hugging Face LLaMA layout)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron_dyt.config import RopeScalingConfig


def rope_inv_freq(
    head_dim: int,
    theta: float,
    device: torch.device,
    scaling: RopeScalingConfig | None = None,
) -> torch.Tensor:
    """The head_dim / 2 inverse frequencies θ^(-2i/d), fp32, rescaled as `scaling` says.

    llama3 rescaling (docs/design.md §12), by wavelength λ = 2π / f with L = the original context
    length: λ > L / low_freq_factor → f / factor; λ < L / high_freq_factor → f; between them
    (1 - s)·f / factor + s·f with s = (L / λ - low_freq_factor) / (high - low_freq_factor), which
    is continuous at both edges. Every operation is fp32 in transformers' order, so the tables
    equal `LlamaRotaryEmbedding`'s bit for bit on the same device.
    """
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None or scaling.type == "none":
        return inv_freq
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    context, factor = scaling.original_max_position_embeddings, scaling.factor
    wavelength = 2 * math.pi / inv_freq
    long_waves = wavelength > context / low
    short_waves = wavelength < context / high
    blend = (context / wavelength - low) / (high - low)
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    out = torch.where(long_waves, inv_freq / factor, inv_freq)
    return torch.where(long_waves | short_waves, out, blended)


def rope_cos_sin(
    seq_len: int,
    head_dim: int,
    theta: float,
    device: torch.device,
    scaling: RopeScalingConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [seq, 1, 1, head_dim] for sequence-first activations."""
    inv_freq = rope_inv_freq(head_dim, theta, device, scaling)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [seq, batch, heads, head_dim] activations; math in fp32."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)
