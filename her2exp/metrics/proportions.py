"""Binomial proportions: the 0/0-safe ratio and the Wilson score interval.

Every rate in her2exp (sensitivity, specificity, PPV, NPV, accuracy, the ROC band) is k/n with
an interval from :func:`wilson_interval`; a rate over an empty denominator is NaN, not an error.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import norm

from her2exp.metrics._validation import check_alpha


def ratio(num: float, den: float) -> float:
    """num / den as a float, NaN when den == 0 (a rate with nothing to count is undefined)."""
    return float(num / den) if den else math.nan


def wilson_interval(
    k: float | np.ndarray, n: float | np.ndarray, alpha: float = 0.05
) -> tuple[Any, Any]:
    """Wilson score interval for a binomial proportion k/n; NaN where n == 0.

    With z = z_{1-alpha/2} and p = k/n:
    (k + z^2/2) / (n + z^2) +- z sqrt(n) / (n + z^2) * sqrt(p (1 - p) + z^2 / (4 n)).
    Unlike the Wald interval it stays inside [0, 1] and keeps its coverage at p near 0 or 1,
    where sensitivities of good models live. Same as
    ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``, vectorised: scalars in give
    floats out, arrays in give arrays out.

    Reference: Wilson (1927), JASA 22:209-212; Newcombe (1998), Statistics in Medicine
    17:857-872 (method 3).
    """
    check_alpha(alpha)
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    z = float(norm.ppf(1 - alpha / 2))
    z2 = z * z
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k_arr / n_arr
        center = (k_arr + z2 / 2) / (n_arr + z2)
        half = z * np.sqrt(n_arr) / (n_arr + z2) * np.sqrt(p * (1 - p) + z2 / (4 * n_arr))
        low = np.where(n_arr > 0, np.clip(center - half, 0.0, 1.0), np.nan)
        high = np.where(n_arr > 0, np.clip(center + half, 0.0, 1.0), np.nan)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high
