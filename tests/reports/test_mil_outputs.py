"""What is drawn from a bag head's attention (her2exp.reports.mil): the galleries of the
misclassified bags and the slide heatmaps, on the session's real tiled slides, no training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from her2exp.data import slide_tiles as dataset
from her2exp.data.datasets import RowView
from her2exp.reports.heatmap import THUMB_SIDE, score_map
from her2exp.reports.mil import (
    RELATIVE,
    _where,
    attention_gallery,
    attention_heatmaps,
    extremes,
    misclassified_bags,
    slide_tiles,
)
from her2exp.slides.reader import Slide


@pytest.fixture(scope="module")
def manifest(tiled_slides) -> pd.DataFrame:
    return dataset.read_tiles(tiled_slides[2] / "tiles.parquet")


def synthetic_attention(manifest: pd.DataFrame, by: str, seed: int = 0) -> pd.DataFrame:
    """Random weights summing to 1 over each bag's tiles (bags = the manifest's `by` groups)."""
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(
        {"bag_id": manifest[by].astype(str).to_numpy(), "row": manifest.index.to_numpy()}
    )
    raw = rng.gamma(0.5, size=len(table))
    table["attention"] = raw / table.assign(r=raw).groupby("bag_id")["r"].transform("sum")
    return table


def bag_table(manifest: pd.DataFrame, by: str) -> pd.DataFrame:
    """Every bag called right except the first HER2+ one (a false negative) and the first
    HER2- one (a false positive)."""
    bags = manifest.groupby(by, sort=True)["label"].first().astype(int).reset_index()
    bags = bags.rename(columns={by: "bag_id"})
    bags["prob_her2_pos"] = np.where(bags["label"] == 1, 0.9, 0.1)
    bags["called"] = bags["label"]
    for label, wrong_prob in ((1, 0.2), (0, 0.8)):
        first = bags.index[bags["label"] == label][0]
        bags.loc[first, ["called", "prob_her2_pos"]] = [1 - label, wrong_prob]
    return bags


def test_gallery_shows_the_k_highest_and_lowest_tiles_of_each_misclassified_bag(
    manifest: pd.DataFrame, tmp_path: Path
) -> None:
    attention = synthetic_attention(manifest, "patient_id")
    attention[["slide_id", "x", "y"]] = manifest[["slide_id", "x", "y"]].to_numpy()
    bags = bag_table(manifest, "patient_id")
    view = RowView(dataset.SlideTiles(manifest, 32), np.arange(len(manifest)))
    written = attention_gallery(attention, bags, view, tmp_path, k=2)
    fn = bags[(bags["label"] == 1) & (bags["called"] == 0)]["bag_id"].item()
    fp = bags[(bags["label"] == 0) & (bags["called"] == 1)]["bag_id"].item()
    assert [p.name for p in written] == [f"attention_fn_{fn}.png", f"attention_fp_{fp}.png"]
    for path in written:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size == (340, 430)  # 2 columns x 2 rows
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)


def test_a_gallery_tile_is_named_by_row_slide_and_coordinates_when_known() -> None:
    full = pd.DataFrame({"row": [7], "attention": [0.5], "slide_id": ["S1"], "x": [256], "y": [0]})
    assert _where(next(full.itertuples())) == "#7 S1 (256, 0)"
    assert _where(next(full[["row", "attention"]].itertuples())) == "#7"


def test_extremes_are_the_top_and_bottom_k_and_never_share_a_tile() -> None:
    tiles = pd.DataFrame({"row": range(10), "attention": np.linspace(0.01, 0.19, 10)})
    top, low = extremes(tiles, 3)
    assert top["row"].tolist() == [9, 8, 7] and low["row"].tolist() == [0, 1, 2]
    top, low = extremes(tiles.head(4), 3)  # fewer than 2k tiles: each shown once
    assert top["row"].tolist() == [3, 2, 1] and low["row"].tolist() == [0]


def test_misclassified_bags_are_the_most_confident_errors_first() -> None:
    bags = pd.DataFrame(
        {
            "bag_id": list("abcdef"),
            "label": [1, 1, 1, 0, 0, 0],
            "prob_her2_pos": [0.3, 0.1, 0.9, 0.6, 0.95, 0.2],
            "called": [0, 0, 1, 1, 1, 0],
        }
    )
    errors = misclassified_bags(bags)
    assert errors["bag_id"].tolist() == ["b", "a", "e", "d"]
    assert errors["error"].tolist() == ["false_negative"] * 2 + ["false_positive"] * 2
    assert misclassified_bags(bags, max_bags=1)["bag_id"].tolist() == ["b", "e"]
    unlabelled = bags.assign(label=[1, None, 1, 0, None, 0])
    assert misclassified_bags(unlabelled)["bag_id"].tolist() == ["a", "d"]
    with pytest.raises(ValueError, match="lacks column.*called"):
        misclassified_bags(bags.drop(columns="called"))


def test_one_heatmap_per_slide_with_each_bags_top_tile_painted_at_its_coordinates(
    manifest: pd.DataFrame, tmp_path: Path
) -> None:
    two = manifest[manifest["slide_id"].isin(sorted(manifest["slide_id"].unique())[:2])]
    attention = synthetic_attention(two, "slide_id", seed=1)
    written = attention_heatmaps(attention, manifest, tmp_path)
    slides = sorted(two["slide_id"].astype(str).unique())
    assert [p.name for p in written] == [f"attention_{s}.png" for s in slides]
    for path in written:
        with Image.open(path) as png:
            assert png.format == "PNG" and min(png.size) > 200
    tiles = slide_tiles(attention, manifest)
    assert tiles.groupby("bag_id")[RELATIVE].max().tolist() == [1.0, 1.0]
    # The painted grid holds each tile's relative attention at its place on the thumbnail.
    rows = tiles[tiles["slide_id"] == slides[0]]
    with Slide(rows["slide_path"].iloc[0]) as slide:
        thumb, down = slide.thumbnail(THUMB_SIDE)
        grid = score_map(thumb.shape[:2], down, rows, slide.level_downsamples, RELATIVE)
    for tile in rows.itertuples():
        assert grid[int(tile.y // down) + 1, int(tile.x // down) + 1] == tile.attention_relative
    assert np.isnan(grid).any()  # the background carries no tile


def test_rows_of_another_manifest_are_refused_and_patches_draw_no_heatmap(
    manifest: pd.DataFrame, tmp_path: Path
) -> None:
    attention = synthetic_attention(manifest, "slide_id")
    stranger = attention.assign(row=attention["row"] + len(manifest))
    with pytest.raises(ValueError, match=r"row\(s\) not in the tile manifest"):
        attention_heatmaps(stranger, manifest, tmp_path)
    patches = manifest.drop(columns=["slide_path", "x", "y"])
    assert attention_heatmaps(attention, patches, tmp_path) == []
    assert not any(tmp_path.iterdir())
