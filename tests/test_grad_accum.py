"""bf16 gradients are summed over micro-batches in fp32 (`train.grad_accum_dtype`, docs/design.md
§3): measured against the exact sum of the same bf16 micro-batch gradients
(`training/accum_check.py`).

bf16 runs on CPU too (slowly), through the same DeepSpeed optimizers as on a GPU: ZeRO-1 with
fp32 accumulation is DeepSpeed's bf16 optimizer, ZeRO-2 its ZeRO optimizer with an fp32
accumulation buffer.
"""

from __future__ import annotations

import distributed
import pytest
from common import tiny_dict

pytestmark = pytest.mark.slow

MICRO_BATCHES = 16


def _accumulated_grads(zero: int, accum: str) -> dict:
    """`accumulation_error` of a 2-layer tiny DyT model (torch backend), one micro-batch of 32
    tokens at a time."""
    from megatron_dyt.training.accum_check import accumulation_error

    tree = tiny_dict("dyt", num_layers=2, seq_length=32)
    tree["model"]["norm"]["backend"] = "torch"
    tree["parallel"].update(zero_stage=zero)
    tree["train"].update(micro_batch_size=1, grad_accum_dtype=accum)
    return accumulation_error(tree, MICRO_BATCHES)


@pytest.mark.parametrize("zero", [1, 2])
def test_bf16_gradients_accumulate_in_fp32(zero, tmp_path):
    fp32 = distributed.run(_accumulated_grads, 1, zero, "fp32", tmp_path=tmp_path / "fp32")[0]
    bf16 = distributed.run(_accumulated_grads, 1, zero, "bf16", tmp_path=tmp_path / "bf16")[0]
    print(
        f"ZeRO-{zero}: relative error of the summed gradient, fp32 / bf16 accumulation:"
        f" matrices {fp32['matrices']:.1e} / {bf16['matrices']:.1e},"
        f" α {fp32['alpha']:.1e} / {bf16['alpha']:.1e} ({fp32['optimizer']})"
    )
    assert fp32["grad_accum_dtype"] == "fp32" and bf16["grad_accum_dtype"] == "bf16"
    # fp32 sums of bf16 values: rounding of fp32 only.
    assert fp32["matrices"] < 1e-6 and fp32["alpha"] < 1e-6
    # bf16 sums: each add rounds to 8 bits of mantissa.
    assert bf16["matrices"] > 1e-3 and bf16["alpha"] > 1e-3
    assert fp32["kind"] == ("bf16" if zero == 1 else "zero")
