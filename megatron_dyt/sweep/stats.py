"""The statistics of a sweep report: mean, spread and t-interval over seeds, the power-law fit,
and a study's intervals (docs/design.md §14): paired differences between runs that share seeds,
the set of α₀ cells the best one cannot be told apart from, and a seed bootstrap of the best
α₀ and of its trend against width.

Apart from the report's tables and figures so that the numbers can be checked on their own
against known values; the Student t quantile comes from `scipy.stats` rather than our own code.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
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


def paired(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95) -> Spread:
    """The t-interval of the mean of a − b over the seeds both have (a seed is a pair: the same
    initial weights, where the shapes match, and the same data order)."""
    common = sorted(set(a) & set(b))
    return spread([a[k] - b[k] for k in common], confidence)


def best_key(cells: Mapping[Hashable, Mapping[int, float]]) -> Hashable:
    """The cell with the lowest mean over its seeds (ties: the first)."""
    if not cells:
        raise ValueError("no cells to choose from")
    return min(cells, key=lambda k: float(np.mean(list(cells[k].values()))))


def optimum_set(
    cells: Mapping[Hashable, Mapping[int, float]], confidence: float = 0.95
) -> tuple[Hashable, list[Hashable]]:
    """The best cell and every cell not shown worse than it: the paired t-interval of (cell −
    best) over their common seeds reaches 0 or below, i.e. a two-sided paired t-test at
    1 − `confidence` does not reject. With fewer than 2 common seeds a cell cannot be ruled
    out and stays in. No correction for the number of cells: the set is a per-cell test."""
    best = best_key(cells)
    keep = []
    for key, values in cells.items():
        diff = paired(values, cells[best], confidence)
        if key == best or not diff.ci_low > 0:  # nan (too few pairs) keeps the cell
            keep.append(key)
    return best, keep


def bootstrap_best(
    cells: Mapping[Hashable, Mapping[int, float]], draws: int, rng: np.random.Generator
) -> list[Hashable]:
    """The best cell of each of `draws` seed resamples: each draw picks as many seeds as there
    are, with replacement, and every cell is averaged over the same drawn seeds (those it has);
    a cell with none of them sits that draw out."""
    keys = list(cells)
    seeds = sorted({s for values in cells.values() for s in values})
    table = np.array([[cells[k].get(s, np.nan) for s in seeds] for k in keys], dtype=float)
    picks = rng.integers(0, len(seeds), size=(draws, len(seeds)))
    out = []
    for pick in picks:
        sub = table[:, pick]
        counts = np.isfinite(sub).sum(axis=1)
        means = np.where(counts > 0, np.nansum(sub, axis=1) / np.maximum(counts, 1), np.inf)
        out.append(keys[int(np.argmin(means))])
    return out


def percentile_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """The bootstrap percentile interval of `values` (e.g. 2.5% and 97.5% at 0.95)."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(np.asarray(values, dtype=float), [tail, 100 - tail])
    return float(low), float(high)
