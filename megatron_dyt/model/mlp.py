"""SwiGLU feed-forward: fused gate+up column-parallel, down row-parallel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from megatron_dyt.config import ModelConfig
from megatron_dyt.model.layers import column_parallel, row_parallel


class SwiGLU(nn.Module):
    def __init__(self, m: ModelConfig, mcfg: ModelParallelConfig):
        super().__init__()
        h, f = m.hidden_size, m.ffn_hidden_size
        # The full weight is [gate; up]; each TP rank holds [gate_r; up_r] (model/sharding.py).
        self.gate_up = column_parallel(mcfg, h, 2 * f, "mlp.gate_up.weight")
        self.down = row_parallel(mcfg, f, h, "mlp.down.weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up(x)
        gate, up = gate_up.chunk(2, dim=-1)
        out, _ = self.down(F.silu(gate) * up)
        return out
