"""The key/value cache of incremental decoding (`megatron-dyt generate`).

One `LayerCache` per transformer block holds that block's keys (after RoPE) and values for the
positions decoded so far, in this rank's TP slice of the key/value heads: [capacity, b,
kv_heads/tp, head_dim], sequence-first like the activations. The buffers are allocated on the
first write, so their shape, dtype and device are the block's own. Training never builds one: a
block called without a cache runs the training code unchanged.
"""

from __future__ import annotations

import torch

from megatron_dyt.errors import UsageError


class LayerCache:
    """Keys and values of one block; `length` positions are filled."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def next_positions(self, s: int) -> slice:
        """The positions of `s` new tokens; an error if they do not fit."""
        if self.length + s > self.capacity:
            raise UsageError(
                f"the KV cache holds {self.capacity} positions; {self.length} are filled and"
                f" {s} more do not fit"
            )
        return slice(self.length, self.length + s)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v [s, b, kv_heads, d]; all keys and values so far."""
        s = k.shape[0]
        self.next_positions(s)
        if self.keys is None:
            shape = (self.capacity, *k.shape[1:])
            self.keys = k.new_empty(shape)
            self.values = v.new_empty(shape)
        self.keys[self.length : self.length + s] = k
        self.values[self.length : self.length + s] = v
        self.length += s
        return self.keys[: self.length], self.values[: self.length]


class KVCache:
    """The caches of every block a rank holds, by layer number (a pipeline stage holds some)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.layers: dict[int, LayerCache] = {}

    def layer(self, number: int) -> LayerCache:
        if number not in self.layers:
            self.layers[number] = LayerCache(self.capacity)
        return self.layers[number]
