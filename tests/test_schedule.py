"""The DyT paper's learning-rate schedule: quadratic warm-up, then cosine to the floor."""

from __future__ import annotations

import math

import pytest

from megatron_dyt.training.schedule import lr_factor


@pytest.mark.parametrize("warmup,total", [(5, 100), (1, 10), (0, 10), (20, 21)])
def test_warmup_then_cosine_from_the_peak_to_the_floor_at_the_last_step(warmup, total):
    f = [lr_factor(s, warmup, total, 0.1) for s in range(total)]
    assert f[:warmup] == [((s + 1) / warmup) ** 2 for s in range(warmup)]
    peak = max(warmup - 1, 0)
    assert f[peak] == 1.0 and f.count(1.0) == 1  # the peak is one step, not two
    assert f[-1] == pytest.approx(0.1, abs=1e-15)
    decay = f[peak:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    middle = peak + (total - 1 - peak) / 2  # halfway down the cosine: halfway to the floor
    if middle.is_integer():
        assert f[int(middle)] == pytest.approx(0.55)


def test_steps_past_the_end_stay_at_the_floor_and_a_single_step_is_the_peak():
    assert lr_factor(150, 5, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 0, 1, 0.1) == 1.0
    assert math.isclose(lr_factor(2, 3, 3, 0.0), 1.0)
