"""Issue 31: no leak between splits from a slide table, and no mixed or lost tiling.

Slides are known by their content: one file under two slide ids (or twice with opposite labels)
is refused before any slide is tiled, and again by `data=slides`; a slide replaced after tiling
is tiled again by a rerun and refused by training. Shards claim `out`'s settings under a lock
(another's settings are refused, `overwrite=true` clears once), and an empty or corrupt slide
table is one line. Real slide files (the embedded generator) read by real OpenSlide.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_tile_command import SIZE, refused, tile  # the same in-process her2exp-tile

from conftest import compose_train
from her2exp import data
from her2exp.apps import tile as tile_app
from her2exp.cli.common import compose
from her2exp.config import commands as schemas
from her2exp.config.tile import ACTIVE_LOCK
from her2exp.data.sources import DataValidationError
from her2exp.data.synthetic_slides import write_slide


def absolute(folder: Path, cohort) -> pd.DataFrame:
    return cohort.table.assign(path=[str(folder / p) for p in cohort.table["path"]])


def test_one_slide_file_under_two_ids_or_labels_is_refused_before_tiling(
    slide_cohort, tmp_path, capsys
) -> None:
    folder, cohort = slide_cohort
    table = absolute(folder, cohort)
    copy = tmp_path / "rescan-named-otherwise.tiff"
    shutil.copy(table.loc[0, "path"], copy)  # the same scan, another name, id and patient
    twin = table.iloc[[0]].assign(path=str(copy), slide_id="X1", patient_id="PX", label=1)
    again = table.iloc[[1]].assign(slide_id="X2", label=1 - table.loc[1, "label"])
    csv = tmp_path / "slides.csv"
    pd.concat([table, twin, again], ignore_index=True).to_csv(csv, index=False)
    err = refused(csv, tmp_path / "out", capsys)
    assert "2 problems" in err, err
    first, second = table.loc[0], table.loc[1]
    assert f"{first.path}: one slide file (same content) in 2 rows (row 2: slide_id " in err
    assert f"row 8: slide_id X1, patient PX, label 1, {copy}" in err
    assert f"row 9: slide_id X2, patient {second.patient_id}, label {1 - second.label}" in err
    assert not (tmp_path / "out").exists()  # nothing written, not even tiling.json


def test_data_slides_refuses_one_file_under_two_slide_ids(tiled_slides, tmp_path) -> None:
    """A manifest put together by hand (or by an older tiler) is checked again for training."""
    folder, _, out = tiled_slides
    tiles = pd.read_parquet(out / "tiles.parquet")
    first = tiles[tiles["slide_id"] == "P0001-S0"]
    copy = tmp_path / "P0001-copy.tiff"
    shutil.copy(first["slide_path"].iloc[0], copy)
    twin = first.assign(slide_id="P9999-S0", patient_id="P9999", slide_path=str(copy))
    path = tmp_path / "tiles.parquet"
    pd.concat([tiles, twin], ignore_index=True).to_parquet(path)
    cfg = compose_train(["data=slides", f"data.path={path}", "data.image_size=32"])
    with pytest.raises(DataValidationError) as info:
        data.build(cfg.data, seed=0)
    assert "slide P0001-S0: the same slide file (same content) as slide(s) P9999-S0" in str(
        info.value
    )


def rescan(path: Path, image: np.ndarray) -> None:
    """Another scan of the same glass at the same path: same size and levels, other pixels."""
    write_slide(path, np.ascontiguousarray(image[:, ::-1]), mpp=0.5)


def test_a_slide_replaced_after_tiling_is_tiled_again_and_refused_by_training(
    tiled_slides, tmp_path, capsys
) -> None:
    folder, cohort, done = tiled_slides
    victim = cohort.table.loc[0]
    path = tmp_path / victim["path"]  # the victim's file, where this test may replace it
    shutil.copy(folder / victim["path"], path)
    table = absolute(folder, cohort)
    table.loc[0, "path"] = str(path)
    table.to_csv(tmp_path / "slides.csv", index=False)
    out = tmp_path / "tiles"
    shutil.copytree(done, out)
    capsys.readouterr()
    tile(tmp_path / "slides.csv", out)  # the victim's new path: tiled; the others reused
    assert "1 slides tiled, 5 already tiled" in capsys.readouterr().out
    shutil.copy(out / "tiles.parquet", tmp_path / "before.parquet")
    rescan(path, cohort.images[victim["slide_id"]])
    cfg = compose_train(["data=slides", f"data.path={tmp_path / 'before.parquet'}"])
    with pytest.raises(DataValidationError) as info:
        data.build(cfg.data, seed=0)
    assert f"slide {victim['slide_id']}: {path} changed since it was tiled" in str(info.value)
    tile(tmp_path / "slides.csv", out)
    said = capsys.readouterr()
    assert "1 slides tiled (1 changed since tiled), 5 already tiled" in said.out, said
    tiles = pd.read_parquet(out / "tiles.parquet")
    rows = tiles[tiles["slide_id"] == victim["slide_id"]]
    cells = cohort.tissue[victim["slide_id"]][:, ::-1]  # the new scan's tissue
    got = np.zeros_like(cells)
    got[rows["y"] // 128, rows["x"] // 128] = True
    assert not (got & ~cells).any() and got.sum() >= 0.9 * cells.sum()
    cfg = compose_train(["data=slides", f"data.path={out / 'tiles.parquet'}"])
    assert len(data.build(cfg.data, seed=0).manifest) == len(tiles)  # the new tiling trains


def shard_cfg(table: Path, out: Path, *overrides: str):
    cfg = compose("tile", [f"input={table}", f"out={out}", *SIZE, *overrides])
    schemas.check_tile(cfg)  # what her2exp-tile checks at start: out is empty for both
    return cfg


def run_shard(cfg) -> dict:
    jobs = tile_app.read_slide_table(Path(cfg.input), schemas.tile_data_config(cfg))
    return tile_app.run(jobs, Path(cfg.out), cfg.tiles, cfg.on_bad_file, cfg.overwrite)


def test_shards_started_together_with_other_settings_do_not_mix(tiled_slides, tmp_path) -> None:
    """Both shards passed the start check on an empty out (as they do when an array starts);
    the second to claim is refused, and no manifest mixes two tile sizes."""
    folder, _, _ = tiled_slides
    out = tmp_path / "tiles"
    a = shard_cfg(folder / "slides.csv", out, "tiles.shard=0/2")
    b = shard_cfg(folder / "slides.csv", out, "tiles.shard=1/2", "tiles.size=64")
    run_shard(a)
    with pytest.raises(Exception, match=r"tiles.size: 128 -> 64") as info:
        run_shard(b)
    assert "overwrite=true" in str(info.value)
    assert len(list((out / "slides").iterdir())) == 3 and not (out / "tiles.parquet").exists()


def test_overwrite_given_to_every_shard_clears_once(tiled_slides, tmp_path, capsys) -> None:
    folder, _, done = tiled_slides
    out = tmp_path / "tiles"
    shutil.copytree(done, out)  # an earlier tiling, min_tissue 0.5
    again = ["tiles.min_tissue=0.9", "overwrite=true"]
    tile(folder / "slides.csv", out, "tiles.shard=0/2", *again)
    tile(folder / "slides.csv", out, "tiles.shard=1/2", *again)
    assert "-> " in capsys.readouterr().out
    tiles = pd.read_parquet(out / "tiles.parquet")
    assert tiles["slide_id"].nunique() == 6 and (tiles["tissue_fraction"] >= 0.9).all()
    # While a tiler with the earlier settings runs in `out`, a clearing overwrite is refused.
    fd = os.open(out / ACTIVE_LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        err = refused(folder / "slides.csv", out, capsys, "tiles.min_tissue=0.7", "overwrite=true")
    finally:
        os.close(fd)
    assert "another her2exp-tile is tiling it now" in err and len(err.splitlines()) == 1
    assert pd.read_parquet(out / "tiles.parquet").equals(tiles)  # nothing cleared


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("empty.csv", b"", "not a readable CSV table (No columns to parse from file)"),
        ("header.csv", b"path,label\n", "no rows (columns: path, label)"),
        ("corrupt.parquet", b"PAR1 not really parquet", "not a readable Parquet table ("),
    ],
)
def test_an_empty_or_corrupt_slide_table_is_one_line(tmp_path, capsys, name, content, says):
    table = tmp_path / name
    table.write_bytes(content)
    err = refused(table, tmp_path / "out", capsys)
    assert err.startswith(f"her2exp: input={table}: {says}"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_an_unreadable_tiling_record_is_one_line(slide_cohort, tmp_path, capsys) -> None:
    folder, _ = slide_cohort
    out = tmp_path / "tiles"
    out.mkdir()
    (out / "tiling.json").write_text("{bad")
    err = refused(folder / "slides.csv", out, capsys)
    assert f"out={out}: its tiling.json is unreadable" in err and len(err.splitlines()) == 1
    assert (out / "tiling.json").read_text() == "{bad"
