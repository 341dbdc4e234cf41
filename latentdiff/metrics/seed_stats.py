"""Statistics over training seeds: mean +- standard error, and paired comparisons to a baseline.

* :func:`mean_se`: the sample mean and its standard error ``s / sqrt(n)`` with the unbiased sample
  standard deviation ``s`` (``ddof = 1``; NaN for n < 2).
* :func:`paired_comparison` of two schedules trained with the same seeds (same initial weights and data
  order, so the seed-to-seed variation is shared): the differences ``d_i = a_i - b_i`` with their mean,
  standard error, the paired t statistic ``t = mean(d) / (s_d / sqrt(n))`` on ``n - 1`` degrees of
  freedom (Student 1908; any statistics text, e.g. Wasserman, *All of Statistics*, Sec. 10.3) with its
  two-sided p-value, and the exact two-sided sign test (binomial(n', 1/2) over the n' non-zero
  differences: ``p = min(1, 2 P(X <= min(k+, k-)))``).

With 2 or 3 seeds these tests have little power: a p-value above 0.05 says "not resolved by this many
seeds", not "equal".
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import stdtr

__all__ = ["mean_se", "paired_comparison", "sign_test_p", "t_test_p"]


def _finite(values) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(a).all():
        raise ValueError(f"values must be finite numbers, got {values!r}")
    return a


def mean_se(values) -> tuple[float, float, int]:
    """``(mean, standard error, n)``; the standard error is NaN for fewer than 2 values."""
    a = _finite(values)
    if a.size == 0:
        return math.nan, math.nan, 0
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else math.nan
    return float(a.mean()), se, int(a.size)


def t_test_p(t: float, df: int) -> float:
    """Two-sided p-value ``2 (1 - F_t(|t|; df))`` of Student's t distribution (``scipy.special.stdtr`` is its CDF)."""
    if df < 1 or math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return float(2.0 * stdtr(df, -abs(t)))


def sign_test_p(diffs) -> float:
    """Exact two-sided sign test of ``median(d) = 0``; zero differences are dropped (NaN if none remain)."""
    d = _finite(diffs)
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    n = pos + neg
    if n == 0:
        return math.nan
    k = min(pos, neg)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return float(min(1.0, 2.0 * tail))


def paired_comparison(a, b) -> dict:
    """Paired ``a - b`` over seeds: ``{"n", "mean", "se", "t", "p_t", "p_sign", "wins"}``.

    ``wins`` counts the seeds where ``a < b`` (lower is better for every metric of the study).  ``t`` is
    ``+-inf`` when every difference is equal and non-zero (zero spread), NaN when they are all zero.
    """
    a, b = _finite(a), _finite(b)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same seeds: {a.size} vs {b.size} values")
    d = a - b
    mean, se, n = mean_se(d)
    if n < 2:
        t = math.nan
    elif se > 0:
        t = mean / se
    else:
        t = math.nan if mean == 0 else math.copysign(math.inf, mean)
    return {"n": n, "mean": mean, "se": se, "t": t, "p_t": t_test_p(t, n - 1), "p_sign": sign_test_p(d),
            "wins": int((d < 0).sum())}
