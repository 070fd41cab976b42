"""How a number reads in a report: 3 decimals or n/a, an estimate with its interval, a split's
title. One place, so summary.md, the figures and the sweep summaries print alike.
"""

from __future__ import annotations

import math
from typing import Any

SPLIT_TITLES = {
    "val": "validation (thresholds chosen here)",
    "test": "test (frozen thresholds)",
    "external": "external cohort (frozen thresholds)",
}


def split_title(name: str) -> str:
    return SPLIT_TITLES.get(name, f"{name} (frozen thresholds)")


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def ci(v: float, low: float, high: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.3f} [{fmt(low)}, {fmt(high)}]"
