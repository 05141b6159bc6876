"""Fused Triton kernels for DyT and Derf (imported as `megatron_dyt.kernels`).

`dyt`, `derf`, `residual_dyt` and `residual_derf` live in `megatron_dyt.kernels.ops`, which
imports Triton; they are re-exported here lazily, so importing this package (e.g. for the
benchmark's argument parsing) needs no Triton. `python -m megatron_dyt.kernels.bench` times them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["INTERPRET", "dyt", "derf", "residual_dyt", "residual_derf"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from megatron_dyt.kernels import ops

        return getattr(ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
