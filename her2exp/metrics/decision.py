"""The decision rule: a probability becomes a call at a frozen threshold here and nowhere else.

A case (a tile, a bag, a slide or patient aggregate) is called HER2+ when its score is at least
the threshold chosen on validation: `score >= t`, so a threshold found by `roc_curve` (one of
the scores) calls the case it came from positive. Every caller - the reports of eval and
training, her2exp-predict, the served model, MIL bags, the confusion matrices - calls through
`called`, so a patch on a threshold gets the same call in the test table and in production.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["CALLED_PREFIX", "called", "called_columns"]

#: The column of the calls at operating point `op`: f"{CALLED_PREFIX}{op}".
CALLED_PREFIX = "called_her2_pos_"


def called(scores: np.ndarray, threshold: float) -> np.ndarray:
    """1 (HER2+) where `scores >= threshold`, else 0, as int64; NaN scores are called 0."""
    return (np.asarray(scores, dtype=np.float64) >= float(threshold)).astype(np.int64)


def called_columns(scores: np.ndarray, thresholds: Mapping[str, float]) -> dict[str, np.ndarray]:
    """The calls at every frozen operating point, keyed by their column name."""
    return {f"{CALLED_PREFIX}{name}": called(scores, t) for name, t in thresholds.items()}
