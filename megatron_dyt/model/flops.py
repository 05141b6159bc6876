"""What MFU divides: the model FLOPs of a trained token, and a GPU model's dense bf16 peak.

Shared by the training log (tokens/s → TFLOP/s per GPU → MFU) and `info`'s time estimate, so
both count the same way (docs/design.md §11).
"""

from __future__ import annotations

from megatron_dyt.config import Config

# Dense bf16 peak per GPU in TFLOP/s, for MFU; `train.peak_tflops` overrides.
PEAK_TFLOPS = {
    "H100": 989.4,
    "H200": 989.4,
    "H800": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
}


def gpu_model(device_name: str) -> str | None:
    """The `PEAK_TFLOPS` key a CUDA device name contains, e.g. "NVIDIA H200" → "H200"."""
    return next((k for k in PEAK_TFLOPS if k in device_name), None)


def flops_per_token(cfg: Config, parameters: int) -> float:
    """Model FLOPs per trained token: 6 per matmul weight, plus 12·L·h·s for attention scores
    and their weighted sum (no causal discount, no recomputation, as MFU is usually quoted)."""
    m = cfg.model
    matmul_params = parameters - cfg.padded_vocab_size * m.hidden_size  # the lookup table is free
    return 6 * matmul_params + 12 * m.num_layers * m.hidden_size * m.seq_length
