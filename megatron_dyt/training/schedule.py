"""Learning-rate schedule of the DyT paper: quadratic warm-up, then cosine to a floor."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    Warm-up is quadratic, ((step+1)/warmup)², reaching the peak at the last warm-up step; then a
    cosine from the peak down to `min_ratio` × peak at the final step (`total - 1`). Without
    warm-up the first step is the peak; with it, the first decay step is already below it.
    """
    if warmup > 0 and step < warmup:
        return ((step + 1) / warmup) ** 2
    peak = warmup - 1 if warmup > 0 else 0  # the step that runs at the peak
    progress = min(1.0, (step - peak) / max(1, total - 1 - peak))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
