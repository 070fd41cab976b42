"""Input checks shared by every metric: one place for the error messages a user reads.

Scores that cannot be scored at all raise a ValueError naming the problem; a split with a
single class is scoreable but some metrics are undefined on it, which :func:`has_two_classes`
reports with one warning.
"""

from __future__ import annotations

import warnings

import numpy as np


def check_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten to int64 labels and float64 scores; raise on anything that cannot be scored.

    Raises ValueError for mismatched lengths, labels other than 0 (HER2-) / 1 (HER2+) and NaN
    or infinite scores. An empty split passes (each metric decides whether it is defined).
    """
    labels = np.asarray(labels).astype(np.int64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (HER2-) or 1 (HER2+); got {np.unique(labels)}")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    return labels, scores


def check_alpha(alpha: float) -> None:
    """Raise unless 0 < alpha < 1 (the two-sided level of a (1 - alpha) interval)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")


def check_probabilities(scores: np.ndarray, what: str) -> None:
    """Raise unless every score is a probability in [0, 1] (logits are a common mistake)."""
    if scores.size and (scores.min() < 0.0 or scores.max() > 1.0):
        raise ValueError(
            f"{what} needs probabilities in [0, 1]; scores span "
            f"[{scores.min():.4g}, {scores.max():.4g}] (pass softmax/sigmoid outputs, not logits)"
        )


def has_two_classes(labels: np.ndarray, what: str) -> bool:
    """True when both classes are present; otherwise warn that ``what`` is NaN and return False.

    The warning points at the caller of the public metric (two frames up).
    """
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        present = "HER2+" if n_pos else "HER2-"
        warnings.warn(
            f"{what} is undefined with a single class present (only {present}, n={labels.size}); "
            "reporting NaN",
            stacklevel=3,
        )
        return False
    return True
