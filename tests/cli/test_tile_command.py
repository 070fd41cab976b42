"""`her2exp-tile` on the embedded slides (real OpenSlide), in-process through its main(cfg).

The manifest holds the tiles over tissue with their slide's label, patient and site; a tile read
from a manifest row is the rendered region; a rerun skips finished slides (so a killed or sharded
run is resumed by running it again); unusable slides are named before anything is written; QuPath
regions include and exclude; other settings on an earlier output are refused unless overwrite.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from her2exp.apps.tile import MANIFEST_COLUMNS
from her2exp.cli.common import compose
from her2exp.cli.tile import main
from her2exp.data.synthetic_slides import write_slide
from her2exp.slides.reader import Slide
from her2exp.slides.tiling import read_tile

SIZE = ["tiles.size=128"]  # one tile per rendered tissue cell at 0.5 um/px


def tile(table: Path, out: Path, *overrides: str) -> None:
    main(compose("tile", [f"input={table}", f"out={out}", *SIZE, *overrides]))


def refused(table: Path, out: Path, capsys, *overrides: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        tile(table, out, *overrides)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("her2exp: "), err
    return err


@pytest.fixture(scope="module")
def tiled(tiled_slides):
    return tiled_slides  # the session's tiling (conftest.py), with the SIZE above


def test_the_manifest_holds_the_tiles_over_tissue_with_their_slides_labels(tiled) -> None:
    folder, cohort, out = tiled
    tiles = pd.read_parquet(out / "tiles.parquet")
    assert list(tiles.columns) == MANIFEST_COLUMNS
    table = cohort.table.set_index("slide_id")
    for slide_id, rows in tiles.groupby("slide_id"):
        cells = cohort.tissue[slide_id]
        got = np.zeros_like(cells)
        got[rows["y"] // 128, rows["x"] // 128] = True
        assert not (got & ~cells).any() and got.sum() >= 0.9 * cells.sum()
        assert set(rows["label"]) == {table.loc[slide_id, "label"]}
        assert set(rows["patient_id"]) == {table.loc[slide_id, "patient_id"]}
        assert set(rows["site"]) == {table.loc[slide_id, "site"]}
        assert (out / "qc" / f"{slide_id}.png").is_file()
    assert set(tiles["slide_id"]) == set(table.index)
    assert (tiles[["level", "read_size", "size", "mpp"]] == [0, 128, 128, 0.5]).all().all()
    row = tiles.iloc[len(tiles) // 2]
    with Slide(row.slide_path) as slide:
        got = read_tile(slide, row.x, row.y, row.level, row.read_size, row["size"])
    want = cohort.images[row.slide_id][row.y : row.y + 128, row.x : row.x + 128]
    assert np.array_equal(got, want)
    summary = pd.read_csv(out / "summary.csv")
    assert (summary["status"] == "tiled").all()
    assert (
        summary.set_index("slide_id")["tiles"].to_dict()
        == tiles.groupby("slide_id").size().to_dict()
    )
    assert set(summary.columns) >= {"vendor", "width", "height", "levels", "mpp", "tissue_mm2"}


def test_a_rerun_skips_finished_slides_and_a_killed_run_resumes(tiled, tmp_path, capsys) -> None:
    folder, _, done = tiled
    out = tmp_path / "tiles"
    shutil.copytree(done, out)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "slides").iterdir()}
    capsys.readouterr()
    tile(folder / "slides.csv", out)
    assert "0 slides tiled, 6 already tiled" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "slides").iterdir()} == stamps
    # Killed while writing one slide: its file never appeared (a stale temporary file did), and
    # no manifest was written.
    victim = sorted((out / "slides").iterdir())[1]
    victim.rename(victim.with_name(f".{victim.name}.tmp-kill"))
    (out / "tiles.parquet").unlink()
    tile(folder / "slides.csv", out)
    assert "1 slides tiled, 5 already tiled" in capsys.readouterr().out
    assert pd.read_parquet(out / "tiles.parquet").equals(pd.read_parquet(done / "tiles.parquet"))


def test_shards_write_the_manifest_once_every_shard_has_run(tiled, tmp_path, capsys) -> None:
    folder, _, done = tiled
    out = tmp_path / "tiles"
    capsys.readouterr()
    tile(folder / "slides.csv", out, "tiles.shard=0/2")
    assert "3 slides tiled" in capsys.readouterr().out and not (out / "tiles.parquet").exists()
    tile(folder / "slides.csv", out, "tiles.shard=1/2", "tiles.processes=2")
    assert "-> " in capsys.readouterr().out
    assert pd.read_parquet(out / "tiles.parquet").equals(pd.read_parquet(done / "tiles.parquet"))


def test_a_bad_table_is_refused_naming_every_problem(slide_cohort, tmp_path, capsys) -> None:
    folder, cohort = slide_cohort
    table = cohort.table.astype({"label": object})
    table["path"] = [str(folder / p) for p in table["path"]]
    table["split"] = ["train", "val", "test", "train", "val", "test"]
    table.loc[0, "path"] = str(tmp_path / "gone.svs")
    table.loc[1, "label"] = "maybe"
    table.loc[3, "patient_id"] = table.loc[2, "patient_id"]  # one patient, train and test
    csv = tmp_path / "slides.csv"
    table.to_csv(csv, index=False)
    err = refused(csv, tmp_path / "out", capsys)
    assert "3 problems" in err
    assert f"{tmp_path / 'gone.svs'}: no such file" in err
    assert "unknown label 'maybe'" in err
    assert f"{table.loc[2, 'patient_id']}: patient in more than one split: test, train" in err
    assert not (tmp_path / "out").exists()


def test_unusable_slides_are_named_before_anything_is_written(slide_cohort, tmp_path, capsys):
    folder, cohort = slide_cohort
    junk, glass, bare = tmp_path / "junk.svs", tmp_path / "glass.tiff", tmp_path / "bare.tiff"
    junk.write_bytes(b"not a slide")
    write_slide(glass, np.full((512, 512, 3), 242, np.uint8), mpp=0.5)
    tifffile.imwrite(bare, np.full((512, 512, 3), 240, np.uint8), tile=(256, 256), metadata=None)
    extra = pd.DataFrame(
        {"path": [str(junk), str(glass), str(bare)], "label": [0, 1, 0], "site": "site_a"}
    )
    table = cohort.table.assign(path=[str(folder / p) for p in cohort.table["path"]])
    csv = tmp_path / "slides.csv"
    pd.concat([table, extra], ignore_index=True).to_csv(csv, index=False)
    err = refused(csv, tmp_path / "out", capsys)
    assert "3 problems (on_bad_file=skip leaves these slides out" in err  # its separator
    assert f"{junk}: not a slide OpenSlide or tiffslide can open" in err
    assert f"{glass}: no tissue found" in err
    assert f"{bare}: its resolution (microns per pixel) is unknown" in err
    assert not (tmp_path / "out").exists()  # nothing written
    tile(csv, tmp_path / "out", "on_bad_file=skip")
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("slide_id")
    assert summary.loc[["junk", "glass", "bare"], "status"].tolist() == ["skipped"] * 3
    tiles = pd.read_parquet(tmp_path / "out" / "tiles.parquet")
    assert set(tiles["slide_id"]) == set(cohort.table["slide_id"])


def test_a_tissue_mask_too_fine_to_see_tissue_is_refused(slide_cohort, tmp_path, capsys):
    """tiles.mask_mpp=0.001 asked for a mask at level 0, which called the tissue glass ('no
    tissue' on slides that have it, issue 31): refused before a slide is opened, in one line
    saying what is allowed and why (TilesConfig: the floor)."""
    folder, _ = slide_cohort
    out = tmp_path / "out"
    err = refused(folder / "slides.csv", out, capsys, "tiles.mask_mpp=0.001")
    assert "tiles.mask_mpp=0.001 is not allowed (a value in [2, 1000] um per pixel" in err
    assert "nuclei" in err and len(err.strip().splitlines()) == 1
    assert not (out / "slides").exists()


def test_qupath_regions_include_and_exclude_tiles(slide_cohort, tmp_path, capsys) -> None:
    folder, cohort = slide_cohort
    row = cohort.table.iloc[0]
    square = [[0, 0], [512, 0], [512, 768], [0, 768], [0, 0]]  # the left half
    pen = [[0, 0], [256, 0], [256, 256], [0, 256], [0, 0]]
    geojson = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
             "properties": {"classification": {"name": "Tumor"}}},
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [pen]},
             "properties": {"classification": {"name": "Pen"}}},
        ],
    }  # fmt: skip
    (tmp_path / "a.geojson").write_text(json.dumps(geojson))
    one = pd.DataFrame(
        [{**row.to_dict(), "path": str(folder / row["path"]), "annotation": "a.geojson"}]
    )
    one.to_csv(tmp_path / "one.csv", index=False)
    tile(tmp_path / "one.csv", tmp_path / "out")
    tiles = pd.read_parquet(tmp_path / "out" / "tiles.parquet")
    cx, cy = tiles["x"] + 64, tiles["y"] + 64
    assert len(tiles) and (cx < 512).all() and not ((cx < 256) & (cy < 256)).any()
    cells = cohort.tissue[row["slide_id"]].copy()
    cells[:, 4:] = False  # the right half
    cells[:2, :2] = False  # the pen mark
    assert len(tiles) >= 0.9 * cells.sum()
    # The pen mark's region deleted in QuPath: a rerun tiles the slide again (issue 31).
    geojson["features"] = geojson["features"][:1]
    (tmp_path / "a.geojson").write_text(json.dumps(geojson))
    capsys.readouterr()
    tile(tmp_path / "one.csv", tmp_path / "out")
    assert "1 slides tiled (1 changed since tiled), 0 already tiled" in capsys.readouterr().out
    tiles = pd.read_parquet(tmp_path / "out" / "tiles.parquet")
    assert ((tiles["x"] + 64 < 256) & (tiles["y"] + 64 < 256)).any() == bool(
        cohort.tissue[row["slide_id"]][:2, :2].any()
    )


def test_other_settings_on_an_earlier_output_are_refused_unless_overwrite(tiled, tmp_path, capsys):
    folder, _, done = tiled
    out = tmp_path / "tiles"
    shutil.copytree(done, out)
    err = refused(folder / "slides.csv", out, capsys, "tiles.min_tissue=0.9")
    assert "tiles.min_tissue: 0.5 -> 0.9" in err and "overwrite=true" in err
    tile(folder / "slides.csv", out, "tiles.min_tissue=0.9", "overwrite=true")
    assert len(pd.read_parquet(out / "tiles.parquet")) <= len(
        pd.read_parquet(done / "tiles.parquet")
    )
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    err = refused(folder / "slides.csv", foreign, capsys, "overwrite=true")
    assert "not an earlier her2exp-tile output" in err and os.listdir(foreign) == ["notes.txt"]


def test_a_corrected_table_reaches_the_manifest_and_a_moved_slide_is_tiled_again(
    tiled, tmp_path, capsys
) -> None:
    folder, cohort, done = tiled
    out = tmp_path / "tiles"
    shutil.copytree(done, out)
    table = cohort.table.assign(path=[str(folder / p) for p in cohort.table["path"]])
    table.loc[0, "label"] = 1 - table.loc[0, "label"]  # a label fixed after tiling
    moved = tmp_path / "moved.tiff"
    shutil.copy(folder / cohort.table.loc[1, "path"], moved)
    table.loc[1, "path"] = str(moved)  # the same slide id, now another file
    table.to_csv(tmp_path / "slides.csv", index=False)
    capsys.readouterr()
    tile(tmp_path / "slides.csv", out)
    assert "1 slides tiled, 5 already tiled" in capsys.readouterr().out
    tiles = pd.read_parquet(out / "tiles.parquet").set_index("slide_id")
    first, second = table.loc[0, "slide_id"], table.loc[1, "slide_id"]
    assert set(tiles.loc[[first], "label"]) == {table.loc[0, "label"]}
    assert set(tiles.loc[[second], "slide_path"]) == {str(moved)}


def test_a_slide_damaged_past_the_checks_is_named_and_the_others_are_kept(
    slide_cohort, tmp_path, capsys
) -> None:
    """Level 1 reads (so the checks pass) but level 0's tiles are damaged: the failure is named
    in one message, the other slides' files stay, `skip` finishes the manifest without it."""
    folder, cohort = slide_cohort
    data = bytearray((folder / cohort.table.loc[0, "path"]).read_bytes())
    for offset in range(3000, 60000, 7):  # inside level 0's first tiles
        data[offset] = (data[offset] + 77) % 256
    damaged = tmp_path / "damaged.tiff"
    damaged.write_bytes(bytes(data))
    table = cohort.table.assign(path=[str(folder / p) for p in cohort.table["path"]])
    table.loc[0, "path"] = str(damaged)
    table.iloc[:3].to_csv(tmp_path / "slides.csv", index=False)
    err = refused(tmp_path / "slides.csv", tmp_path / "out", capsys)
    assert "failed while tiled" in err and f"{damaged}: region (0, 0) unreadable" in err
    assert len(list((tmp_path / "out" / "slides").iterdir())) == 2  # the other two, kept
    tile(tmp_path / "slides.csv", tmp_path / "out", "on_bad_file=skip")
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("slide_id")
    assert summary.loc[table.loc[0, "slide_id"], "status"] == "skipped"
    assert pd.read_parquet(tmp_path / "out" / "tiles.parquet")["slide_id"].nunique() == 2
