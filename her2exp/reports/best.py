"""best.json: a run's summary as strict JSON (no NaN: `to_jsonable` turns it into null), the
file tools and later commands read back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from her2exp.core.fileio import atomic_write_text
from her2exp.metrics import to_jsonable


def write_best_json(path: Path, summary: dict[str, Any]) -> Path:
    """Write `summary` as best.json: NaN/inf become null, so any JSON reader takes the file."""
    return atomic_write_text(
        path, json.dumps(to_jsonable(summary), indent=2, sort_keys=False, allow_nan=False) + "\n"
    )
