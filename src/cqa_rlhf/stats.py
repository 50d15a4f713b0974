"""Confidence intervals for the headline numbers: Wilson intervals for accuracies, and a paired
percentile bootstrap over questions for win rates and mean score differences.

Every figure is the same on every machine: the resampled indices come from numpy's PCG64 (a
fixed integer stream), means are ``math.fsum`` sums (correctly rounded, independent of summation
order and of the CPU's vector units), and the interval ends are resampled means themselves
(``inverted_cdf`` quantiles), not interpolations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (ties counted half are allowed).

    Unlike the normal approximation it stays inside [0, 1] and is sensible near 0 and 1
    (Brown, Cai & DasGupta 2001)."""
    if n <= 0:
        return (math.nan, math.nan)
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``(resamples, n)`` indices drawn with replacement: the same questions for every statistic
    computed from them, so two policies' numbers are resampled in pairs."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def exact_mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def bootstrap_ci(values: Sequence[float], indices: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` over the resamples in ``indices``."""
    arr = np.asarray(values, dtype=np.float64)
    means = np.array([math.fsum(row) / len(row) for row in arr[indices].tolist()])
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail], method="inverted_cdf")
    return (float(lo), float(hi))


def win_points(candidate: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per question: 1 if the candidate scores higher, 0.5 on a tie, 0 otherwise."""
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError("paired scores: two equally long, non-empty lists needed")
    return [1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline)]


def paired_comparison(candidate: Sequence[float], baseline: Sequence[float],
                      indices: np.ndarray | None = None) -> dict[str, float]:
    """Win rate of ``candidate`` over ``baseline`` (ties half) and the mean paired score difference,
    each with its 95% paired-bootstrap interval over questions."""
    points = win_points(candidate, baseline)
    diffs = [float(c) - float(b) for c, b in zip(candidate, baseline)]
    idx = resample_indices(len(points)) if indices is None else indices
    (w_lo, w_hi), (d_lo, d_hi) = bootstrap_ci(points, idx), bootstrap_ci(diffs, idx)
    return {"win_rate": exact_mean(points), "win_rate_low": w_lo, "win_rate_high": w_hi,
            "score_diff": exact_mean(diffs), "score_diff_low": d_lo, "score_diff_high": d_hi}


def interval(bounds: tuple[float, float], digits: int = 4) -> dict[str, float]:
    """An interval as metrics (``{"low", "high"}``: DVC shows nested keys, not lists)."""
    return {"low": round(bounds[0], digits), "high": round(bounds[1], digits)}


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank (Spearman's convention)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i: j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r with ``math.fsum`` sums (the same on every CPU); nan when either is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("correlation: two equally long lists of at least 2 values needed")
    mx, my = exact_mean(x), exact_mean(y)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = math.fsum((a - mx) ** 2 for a in x), math.fsum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def verdict_agreement(first: Sequence[float], second: Sequence[float]) -> float:
    """How often two judges call the same verdict on paired comparisons, given each judge's score
    differences (candidate - baseline) on the same pairs: win, tie or loss alike."""
    if len(first) != len(second) or not first:
        raise ValueError("verdicts: two equally long, non-empty lists needed")
    sign = lambda d: (d > 0) - (d < 0)  # noqa: E731
    return sum(sign(a) == sign(b) for a, b in zip(first, second)) / len(first)
