"""What is drawn from attention: galleries and slide heatmaps.

PLACEHOLDERS with the contract's signatures, so the bag pipeline runs before merge; the `milio`
part owns this file and its real versions replace these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd


def attention_gallery(
    attention: pd.DataFrame, bags: pd.DataFrame, view: Any, out_dir: Path, k: int
) -> list[Path]:
    """The highest- and lowest-attention tiles of each false-negative and false-positive bag."""
    return []


def attention_heatmaps(
    attention: pd.DataFrame, tile_manifest: pd.DataFrame, out_dir: Path
) -> list[Path]:
    """Each slide's attention over its thumbnail."""
    return []
