"""Grouped-query self-attention with RoPE: fused QKV column-parallel, output row-parallel."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_dyt.config import ModelConfig
from megatron_dyt.errors import UsageError
from megatron_dyt.model.kv_cache import LayerCache
from megatron_dyt.model.layers import column_parallel, row_parallel
from megatron_dyt.model.rope import apply_rope, rope_cos_sin

HAVE_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [s, b, heads, d] -> [b, heads, s, d]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1]
    )
    return out.permute(2, 0, 1, 3)


def _sdpa_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """New queries [s, b, heads, d] against every cached key [t, b, kv_heads, d] (t ≥ s): query i
    sits at position t − s + i and sees keys 0 … t − s + i."""
    s, t = q.shape[0], k.shape[0]
    mask = None if s == 1 else torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
    q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]
    )
    return out.permute(2, 0, 1, 3)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    # [s, b, heads, d] -> [b, s, heads, d]; flash-attn handles GQA itself.
    out = flash_attn_func(*(t.transpose(0, 1) for t in (q, k, v)), causal=True)
    return out.transpose(0, 1)


class Attention(nn.Module):
    """Causal self-attention over sequence-first activations [s, b, h].

    The fused QKV weight is laid out per key/value group, [q heads of the group; k; v], so a
    plain split along the output dimension hands each TP rank whole groups.
    """

    def __init__(self, m: ModelConfig, mcfg: ModelParallelConfig, recompute_core: bool = False):
        super().__init__()
        tp = mcfg.tensor_model_parallel_size
        self.head_dim = m.head_dim
        self.heads = m.num_heads // tp
        self.kv_heads = m.kv_heads // tp
        self.q_per_kv = m.num_heads // m.kv_heads
        self.rope_theta = m.rope_theta
        self.rope_scaling = m.rope_scaling
        self.recompute_core = recompute_core
        self.backend = self._pick_backend(m.attention_backend)
        qkv_rows = (m.num_heads + 2 * m.kv_heads) * m.head_dim
        self.qkv = column_parallel(mcfg, m.hidden_size, qkv_rows, "attention.qkv.weight")
        self.proj = row_parallel(
            mcfg, m.num_heads * m.head_dim, m.hidden_size, "attention.proj.weight"
        )
        self._rope_cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _pick_backend(choice: str) -> str:
        if choice == "flash" and not HAVE_FLASH_ATTN:
            raise UsageError(
                "model.attention_backend='flash' but flash-attn is not installed; install the"
                " '.[flash]' extra or use 'auto' / 'sdpa'"
            )
        return choice

    def _rope(self, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            # Inside a compiled block the tables are part of the graph (the compiler computes
            # them once per call, fused): no module state changes, no cache to guard on.
            return rope_cos_sin(seq, self.head_dim, self.rope_theta, device, self.rope_scaling)
        cache = self._rope_cache
        if cache is None or cache[0] != seq or cache[1] != device:
            cos, sin = rope_cos_sin(seq, self.head_dim, self.rope_theta, device, self.rope_scaling)
            self._rope_cache = cache = (seq, device, cos, sin)
        return cache[2], cache[3]

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        use_flash = self.backend == "flash" or (
            self.backend == "auto"
            and HAVE_FLASH_ATTN
            and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)
        )
        out = _flash(q, k, v) if use_flash else _sdpa(q, k, v)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def cached_core(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache
    ) -> torch.Tensor:
        """Attention of the new positions over the cache after appending their k, v. The
        prefill (an empty cache) runs the training core, so its logits are the full forward's."""
        prefill = cache.length == 0
        k, v = cache.append(k, v)
        if prefill:
            return self.core(q, k, v)
        out = _sdpa_cached(q, k, v)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """Training and full forwards: `cache` None. Decoding: the new positions of x, which
        follow the `cache.length` positions the cache holds (docs/design.md §13)."""
        qkv, _ = self.qkv(x)  # under sequence parallelism this gathers the full sequence
        s, b, _ = qkv.shape
        qkv = qkv.view(s, b, self.kv_heads, self.q_per_kv + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_kv].reshape(s, b, self.heads, self.head_dim)
        # v is copied out: attention saves it for the backward, and a view would keep the whole
        # fused qkv output alive with it (q and k are already new tensors after RoPE).
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1].contiguous()
        if cache is None:
            cos, sin = self._rope(s, x.device)
        else:  # one table for the whole decode, sliced at the new positions
            at = cache.next_positions(s)
            cos, sin = self._rope(cache.capacity, x.device)
            cos, sin = cos[at], sin[at]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            out = self.cached_core(q, k, v, cache)
        elif self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(self.core, q, k, v, use_reentrant=False)
        else:
            out = self.core(q, k, v)
        out, _ = self.proj(out)
        return out
