"""The statistics of a sweep report: mean, spread and t-interval over seeds, the power-law fit.

Apart from the report's tables and figures so that the numbers can be checked on their own
against known values; the Student t quantile comes from `scipy.stats` rather than our own code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| < t) = confidence (e.g. 0.95 → 12.706 at df 1, 2.776 at df 4)."""
    if df < 1:
        raise ValueError(f"df={df}: needs at least 1 degree of freedom")
    return float(stats.t.ppf((1 + confidence) / 2, df))


@dataclass
class Spread:
    """A cell's numbers over seeds."""

    n: int
    mean: float
    std: float  # sample std (n - 1); nan for one value
    ci_low: float  # 95% t-interval of the mean; nan for one value
    ci_high: float


def spread(values: list[float], confidence: float = 0.95) -> Spread:
    """Mean, sample std and the t-interval of the mean over seeds."""
    n = len(values)
    if n == 0:
        return Spread(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(np.mean(values))
    if n == 1:
        return Spread(1, mean, math.nan, math.nan, math.nan)
    std = float(np.std(values, ddof=1))
    # Not stats.t.interval: it gives nan for a zero spread, which identical seeds can have.
    half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return Spread(n, mean, std, mean - half, mean + half)


def fit_power_law(widths: list[float], alphas: list[float]) -> tuple[float, float]:
    """Least squares of log α = log c + b·log width; returns (slope b, prefactor c)."""
    if len(set(widths)) < 2:
        raise ValueError("a fit against width needs at least 2 different widths")
    b, log_c = np.polyfit(np.log(widths), np.log(alphas), 1)
    return float(b), float(math.exp(log_c))
