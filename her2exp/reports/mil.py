"""What a bag head's attention shows a pathologist: for each misclassified bag the tiles it
weighed most and least, and on slides where in the tissue the attention went.

Inputs are the tables the MIL report step writes: attention (`bag_id, row, attention`, one line
per tile of a scored bag, `row` the bundle manifest's row as in predictions_<split>.csv) and
the bags (`bag_id, label, prob_her2_pos, called`). Called on rank 0 only, like every report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from her2exp.core import progress
from her2exp.core.fileio import safe_name
from her2exp.reports.figures import pyplot, save_figure
from her2exp.reports.heatmap import write_heatmap
from her2exp.slides.reader import Slide

log = logging.getLogger(__name__)

ATTENTION_COLUMNS = ("bag_id", "row", "attention")
BAG_COLUMNS = ("bag_id", "label", "prob_her2_pos", "called")
#: Tile manifest columns a slide heatmap needs (her2exp-tile writes them all, `reader` too).
SLIDE_COLUMNS = ("slide_id", "slide_path", "x", "y", "level", "read_size")
RELATIVE = "attention_relative"


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{what} lacks column(s) {', '.join(missing)}; it has {', '.join(map(str, frame))}"
        )


def misclassified_bags(bags: pd.DataFrame, max_bags: int | None = None) -> pd.DataFrame:
    """False negatives (most confident first: lowest P(HER2+)), then false positives (highest
    first), each with `error` = "false_negative" | "false_positive"; at most `max_bags` of each."""
    _require(bags, BAG_COLUMNS, "the bag table")
    bags = bags[bags["label"].notna()]  # a cohort predicted without labels has no errors
    label, called = bags["label"].astype(int), bags["called"].astype(int)
    fn = bags[(label == 1) & (called == 0)].sort_values("prob_her2_pos", kind="stable")
    fp = bags[(label == 0) & (called == 1)].sort_values(
        "prob_her2_pos", ascending=False, kind="stable"
    )
    return pd.concat(
        [
            fn.head(max_bags).assign(error="false_negative"),
            fp.head(max_bags).assign(error="false_positive"),
        ],
        ignore_index=True,
    )


def extremes(tiles: pd.DataFrame, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A bag's k highest-attention tiles (highest first) and its k lowest (lowest first), never
    one tile in both (a bag of fewer than 2k tiles shows each once)."""
    ordered = tiles.sort_values("attention", ascending=False, kind="stable")
    top = ordered.head(k)
    rest = ordered.iloc[len(top) :]
    return top, rest.tail(k).iloc[::-1]


def _where(tile: Any) -> str:
    """Where a tile is, as far as the attention table says: manifest row, slide, x, y."""
    text = f"#{int(tile.row)}"
    if getattr(tile, "slide_id", None) is not None:
        text += f" {tile.slide_id}"
    if getattr(tile, "x", None) is not None and getattr(tile, "y", None) is not None:
        text += f" ({int(tile.x)}, {int(tile.y)})"
    return text


def _plot_bag(
    path: Path, bag: pd.Series, top: pd.DataFrame, low: pd.DataFrame, view: Any, k: int
) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, k, figsize=(1.7 * k, 4.3), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for line, (name, tiles) in enumerate((("highest", top), ("lowest", low))):
        first = axes[line, 0]
        first.text(
            -0.15,
            0.5,
            name,
            rotation=90,
            va="center",
            ha="right",
            fontsize=8,
            transform=first.transAxes,
        )
        for ax, tile in zip(axes[line], tiles.itertuples(index=False), strict=False):
            ax.imshow(np.asarray(view[int(tile.row)], dtype=np.uint8))
            ax.set_title(f"a={tile.attention:.3g}\n{_where(tile)}", fontsize=6)
    kind = str(bag["error"]).replace("_", " ")
    fig.suptitle(
        f"{kind}: bag {bag['bag_id']} (label {int(bag['label'])}, P(HER2+)="
        f"{float(bag['prob_her2_pos']):.3f}, {len(top) + len(low)} of its tiles shown)",
        fontsize=9,
    )
    # Fixed margins: tight_layout measures every title and costs more than the drawing.
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.02, top=0.82, wspace=0.1, hspace=0.35)
    return save_figure(fig, path)


def attention_gallery(
    attention: pd.DataFrame,
    bags: pd.DataFrame,
    view: Any,
    out_dir: Path,
    k: int,
    *,
    max_bags: int | None = 32,
) -> list[Path]:
    """One PNG per false-negative and false-positive bag (`attention_<fn|fp>_<bag>.png`): its
    k highest- and k lowest-attention tiles, read from `view[row]` (uint8 HWC) - only those 2k
    per bag are decoded. `max_bags` of each kind at most, the most confident errors first."""
    if k < 1:
        raise ValueError(f"attention gallery: k={k} must be >= 1")
    _require(attention, ATTENTION_COLUMNS, "the attention table")
    table = attention.assign(bag_id=attention["bag_id"].astype(str))
    groups = dict(tuple(table.groupby("bag_id", sort=False)))
    written = []
    for _, bag in misclassified_bags(bags, max_bags).iterrows():
        tiles = groups.get(str(bag["bag_id"]))
        if tiles is None:
            log.warning("attention gallery: bag %s has no attention rows; skipped", bag["bag_id"])
            continue
        top, low = extremes(tiles, k)
        prefix = "fn" if bag["error"] == "false_negative" else "fp"
        out = Path(out_dir) / f"attention_{prefix}_{safe_name(bag['bag_id'])}.png"
        written.append(_plot_bag(out, bag, top, low, view, k))
    return written


def slide_tiles(attention: pd.DataFrame, tile_manifest: pd.DataFrame) -> pd.DataFrame:
    """The attention rows with their tiles' slide and coordinates (manifest rows by index
    label), and `attention_relative` = attention / the highest in the bag, in [0, 1]: a bag's
    weights sum to 1, so their raw size shrinks with the bag's tile count."""
    _require(attention, ATTENTION_COLUMNS, "the attention table")
    rows = attention["row"].to_numpy()
    unknown = np.setdiff1d(rows, tile_manifest.index.to_numpy())
    if unknown.size:
        raise ValueError(
            f"the attention table names {unknown.size} row(s) not in the tile manifest "
            f"(first {unknown[:5].tolist()}): it belongs to another manifest"
        )
    columns = [*SLIDE_COLUMNS, *(["reader"] if "reader" in tile_manifest else [])]
    tiles = tile_manifest.loc[rows, columns].reset_index(drop=True)
    tiles["bag_id"] = attention["bag_id"].astype(str).to_numpy()
    tiles["attention"] = attention["attention"].to_numpy(dtype=float)
    top = tiles.groupby("bag_id")["attention"].transform("max").to_numpy()
    tiles[RELATIVE] = np.divide(tiles["attention"], top, out=np.zeros(len(tiles)), where=top > 0)
    if "reader" not in tiles:
        tiles["reader"] = "auto"
    return tiles


def attention_heatmaps(
    attention: pd.DataFrame, tile_manifest: pd.DataFrame, out_dir: Path
) -> list[Path]:
    """One PNG per slide (`attention_<slide>.png`): each tile's attention relative to its bag's
    highest, over the slide's thumbnail at the tile manifest's coordinates (the same painter as
    her2exp-predict's score heatmaps). A manifest without slides (patches) draws nothing."""
    missing = [c for c in SLIDE_COLUMNS if c not in tile_manifest.columns]
    if missing:
        log.info("attention heatmaps: no slides in this manifest (no %s)", ", ".join(missing))
        return []
    tiles = slide_tiles(attention, tile_manifest)
    written = []
    slides = tiles.groupby(["slide_id", "slide_path", "reader"], sort=True)
    for (slide_id, path, reader), rows in progress.bar(slides, desc="heatmaps", unit="slide"):
        bags = ", ".join(sorted(rows["bag_id"].unique()))
        # Reading needs no resolution: 1.0 stands in for a slide tiled with assume_mpp.
        with Slide(path, assume_mpp=1.0, reader=reader) as slide:
            out = Path(out_dir) / f"attention_{safe_name(str(slide_id))}.png"
            title = f"{slide_id}: attention (bag {bags})"
            label = "attention / the bag's highest"
            written.append(write_heatmap(slide, rows, out, title, column=RELATIVE, label=label))
    return written
