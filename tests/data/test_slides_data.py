"""`data=slides`: tiles read lazily from the embedded slides (real OpenSlide), checked before
training, trained on under DDP, predicted with heatmaps.

The store returns the rendered pixels in DataLoader workers and keeps at most
`data.max_open_slides` handles; every unusable manifest or slide is one problem naming the
slide; the shared DDP run (conftest `slides_run`, 2 gloo processes) scores every val and test
tile exactly once, patient-grouped; `her2exp-predict` on the tile manifest gives the run's own
test scores and one heatmap per slide.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import open_dict
from PIL import Image
from torch.utils.data import DataLoader

from conftest import compose_train
from her2exp import data
from her2exp.cli.common import compose
from her2exp.data.datasets import PatchDataset
from her2exp.data.slide_tiles import SlideTiles
from her2exp.data.sources import DataValidationError
from her2exp.reports.heatmap import score_map


def slides_cfg(path: Path, *overrides: str):
    return compose_train(["data=slides", f"data.path={path}", "data.image_size=128", *overrides])


def test_tiles_come_from_the_slides_in_the_workers_with_few_handles_open(tiled_slides) -> None:
    _, cohort, out = tiled_slides
    cfg = slides_cfg(out / "tiles.parquet", "data.max_open_slides=2")
    bundle = data.build(cfg.data, seed=0)
    manifest = bundle.manifest
    assert isinstance(bundle.patches, SlideTiles) and len(bundle.patches) == len(manifest)
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    labels = manifest["label"].to_numpy().copy()
    loader = DataLoader(PatchDataset(bundle.patches, labels), batch_size=16, num_workers=2)
    for x, y, index in loader:
        for tile, label, i in zip(x.permute(0, 2, 3, 1).numpy(), y, index, strict=True):
            row = manifest.iloc[int(i)]
            want = cohort.images[row.slide_id][row.y : row.y + 128, row.x : row.x + 128]
            assert np.array_equal(tile, want) and int(label) == row.label
    store = bundle.patches
    rows = np.random.default_rng(0).permutation(len(store))
    many = store.read_many(rows)
    assert len(store._open) <= 2  # six slides read, two handles kept
    assert np.array_equal(many[3], store.read(int(rows[3])).permute(1, 2, 0).numpy())
    assert pickle.loads(pickle.dumps(store))._open == {}  # handles never travel to a worker
    # data.cache=true: the same tiles, read once up front.
    cached = data.build(slides_cfg(out / "tiles.parquet", "data.cache=true").data, seed=0)
    assert np.array_equal(cached.images[rows[:8]], many[:8])
    assert cached.fingerprint == bundle.fingerprint


def broken(tiled_slides, tmp_path: Path, change) -> Path:
    """A copy of the tile manifest (and its slides) with one thing wrong."""
    folder, _, out = tiled_slides
    slides = tmp_path / "slides"
    shutil.copytree(folder, slides)
    tiles = pd.read_parquet(out / "tiles.parquet")
    tiles["slide_path"] = [str(slides / Path(p).name) for p in tiles["slide_path"]]
    tiles = change(tiles, slides)
    path = tmp_path / "tiles.parquet"
    tiles.to_parquet(path)
    return path


def truncate(tiles: pd.DataFrame, slides: Path) -> pd.DataFrame:
    victim = slides / "P0001-S0.tiff"
    victim.write_bytes(victim.read_bytes()[:3000])
    return tiles


def refused(path: Path) -> str:
    with pytest.raises(DataValidationError) as info:
        data.build(slides_cfg(path).data, seed=0)
    return str(info.value)


def test_every_unusable_slide_is_named_before_training(tiled_slides, tmp_path: Path) -> None:
    def many(tiles: pd.DataFrame, slides: Path) -> pd.DataFrame:
        truncate(tiles, slides)
        (slides / "P0002-S0.tiff").unlink()
        tiles.loc[tiles["slide_id"] == "P0003-S0", "x"] += 10_000
        tiles.loc[tiles["slide_id"] == "P0004-S0", "label"] = 7
        return tiles

    err = refused(broken(tiled_slides, tmp_path, many))
    lines = err.splitlines()
    assert lines[0].startswith("data.path=") and " problems (fix them" in lines[0], err
    assert "slide P0001-S0: slide " in err and "not a slide OpenSlide can open" in err
    assert "slide P0002-S0: slide " in err and "no such file" in err
    assert "slide P0003-S0:" in err and "outside its 1024x768 px" in err
    assert "slide P0004-S0: label 7: 0 (HER2-) or 1 (HER2+) allowed" in err
    assert "data.on_bad_file=skip" in lines[0]


def test_skip_leaves_bad_slides_out_and_lists_them(tiled_slides, tmp_path: Path) -> None:
    path = broken(tiled_slides, tmp_path, truncate)
    # As a cohort (her2exp-eval): five slides cannot make three splits of both classes.
    bundle = data.build_cohort(slides_cfg(path, "data.on_bad_file=skip").data, seed=0)
    assert set(bundle.manifest["split"]) == {"cohort"}
    assert "P0001-S0" not in set(bundle.manifest["slide_id"]) and len(bundle.manifest)
    assert bundle.skipped["path"].tolist() == ["slide P0001-S0"]


def test_a_patient_in_two_splits_and_a_stranger_table_are_refused(tiled_slides, tmp_path):
    def leak(tiles: pd.DataFrame, slides: Path) -> pd.DataFrame:
        tiles["split"] = np.where(tiles["slide_id"] < "P0002", "train", "test")
        tiles.loc[tiles["slide_id"] == "P0004-S0", "split"] = "val"
        first = tiles.index[tiles["slide_id"] == "P0000-S0"]
        tiles.loc[first[:2], "split"] = "val"  # one patient's tiles in train and val
        return tiles

    err = refused(broken(tiled_slides, tmp_path / "a", leak))
    assert "patient 'P0000' is in more than one split" in err
    table = tmp_path / "b" / "tiles.csv"
    table.parent.mkdir()
    table.write_text("path,label\na.png,0\n")
    assert "not a tile manifest of her2exp-tile: no slide_id" in refused(table)
    assert "no such file: run her2exp-tile first" in refused(tmp_path / "none.parquet")


def test_ddp_on_slides_scores_every_val_and_test_tile_exactly_once(slides_run, tiled_slides):
    _, _, out = tiled_slides
    tiles = pd.read_parquet(out / "tiles.parquet")
    reports = slides_run.run_dir / "reports"
    seen = {}
    for split in ("val", "test"):
        preds = pd.read_csv(reports / f"predictions_{split}.csv")
        keys = list(zip(preds["slide_id"], preds["x"], preds["y"], strict=True))
        assert len(keys) == len(set(keys)), f"{split}: a tile scored twice"
        slides = set(preds["slide_id"])
        assert len(keys) == tiles["slide_id"].isin(slides).sum()  # no tile left out
        assert preds["prob_her2_pos"].between(0, 1).all()
        seen[split] = {pid for pid in preds["patient_id"]}
        by_slide = pd.read_csv(reports / f"predictions_slides_{split}.csv")  # slide level
        assert sorted(by_slide["slide_id"]) == sorted(slides)
    assert not seen["val"] & seen["test"]
    assert "starting 2 workers" in slides_run.stdout


def test_predict_on_a_tile_manifest_gives_the_runs_scores_and_heatmaps(
    slides_run, tiled_slides, tmp_path: Path, capsys
) -> None:
    from her2exp.cli.predict import main

    _, _, out = tiled_slides
    best = slides_run.run_dir / "checkpoints" / "best.pt"
    table = tmp_path / "preds.csv"
    args = [f"checkpoint={best}", f"input={out / 'tiles.parquet'}", f"out={table}"]
    main(compose("predict", [*args, "num_workers=1", "batch_size=20"]))
    assert "tiles of 6 slides scored" in capsys.readouterr().out
    preds = pd.read_csv(table)
    own = pd.read_csv(slides_run.run_dir / "reports" / "predictions_test.csv")
    both = own.merge(preds, on=["slide_id", "x", "y"], suffixes=("_run", ""))
    assert len(both) == len(own)
    np.testing.assert_allclose(both["prob_her2_pos"], both["prob_her2_pos_run"], atol=1e-5)
    maps = sorted((tmp_path / "preds_heatmaps").iterdir())
    assert [p.stem for p in maps] == sorted(preds["slide_id"].unique())
    assert Image.open(maps[0]).size[0] > 400
    # At the slide level: the manifest's slide ids group the tiles, one call per slide.
    level = [*args[:2], f"out={tmp_path / 'by_slide.csv'}", "decision_level=slide"]
    main(compose("predict", [*level, f"heatmaps={tmp_path / 'maps2'}"]))
    slides = pd.read_csv(tmp_path / "by_slide.slides.csv")
    assert sorted(slides["slide_id"]) == sorted(preds["slide_id"].unique())
    # The slide score is the mean (the run's slide_aggregation) of the same call's tile scores;
    # another batch size scores a tile within float32 rounding of the first call.
    tiles = pd.read_csv(tmp_path / "by_slide.csv")
    np.testing.assert_allclose(tiles["prob_her2_pos"], preds["prob_her2_pos"], atol=1e-6)
    mean = tiles.groupby("slide_id")["prob_her2_pos"].mean()
    got = slides.set_index("slide_id").loc[mean.index, "prob_her2_pos"]
    np.testing.assert_allclose(got, mean, rtol=1e-9)
    with pytest.raises(SystemExit):  # an earlier run's heatmaps are kept
        main(
            compose(
                "predict",
                [*args, f"out={tmp_path / 'other.csv'}", "heatmaps=" + str(maps[0].parent)],
            )
        )
    assert "holds an earlier run's heatmaps" in capsys.readouterr().err


def test_the_heatmap_paints_each_tile_square_with_its_score() -> None:
    tiles = pd.DataFrame(
        {
            "x": [0, 256],
            "y": [0, 256],
            "level": [0, 1],
            "read_size": [128, 64],
            "prob_her2_pos": [0.2, 0.9],
        }
    )
    grid = score_map((100, 100), 4.0, tiles, (1.0, 2.0))
    assert np.all(grid[0:32, 0:32] == 0.2) and np.all(grid[64:96, 64:96] == 0.9)
    assert np.isnan(grid).sum() == 100 * 100 - 2 * 32 * 32


def test_a_cache_config_is_refused_for_synthetic_but_slides_stream() -> None:
    cfg = compose_train(["data=slides"])
    assert cfg.data.cache is False and cfg.data.max_open_slides == 16
    with open_dict(cfg):
        cfg.data.path = None
    with pytest.raises(DataValidationError, match="data.path"):
        data.build(cfg.data, seed=0)


def test_slide_paths_hold_from_any_working_directory(tiled_slides, tmp_path, monkeypatch) -> None:
    """A table given relative to the cwd tiles to absolute slide paths; a manifest whose paths
    are relative is read relative to itself (a tiled cohort moved with its slides)."""
    from her2exp.apps.tile import read_slide_table
    from her2exp.config import commands as schemas

    folder, _, out = tiled_slides
    monkeypatch.chdir(folder.parent)
    cfg = compose("tile", [f"input={folder.name}/slides.csv", "out=x"])
    jobs = read_slide_table(Path(cfg.input), schemas.tile_data_config(cfg))
    assert all(Path(j.path).is_absolute() and Path(j.path).is_file() for j in jobs)
    moved = tmp_path / "cohort"
    shutil.copytree(folder, moved / "slides")
    tiles = pd.read_parquet(out / "tiles.parquet")
    tiles["slide_path"] = ["slides/" + Path(p).name for p in tiles["slide_path"]]
    tiles.to_parquet(moved / "tiles.parquet")
    monkeypatch.chdir(tmp_path.parent)
    bundle = data.build(slides_cfg(moved / "tiles.parquet").data, seed=0)
    assert bundle.patches.read_many(np.arange(3)).shape == (3, 128, 128, 3)


def test_eval_on_a_tiled_cohort_reports_tiles_slides_and_patients(
    slides_run, tiled_slides, tmp_path
):
    """her2exp-eval's library path on the tile manifest as an external cohort: every tile
    scored once, at the run's frozen thresholds, with the slide and patient levels beside."""
    from her2exp import evaluation
    from her2exp.core.checkpoint import load as load_checkpoint

    _, _, out = tiled_slides
    best = slides_run.run_dir / "checkpoints" / "best.pt"
    cfg = compose("eval", ["tracking.backend=off", f"checkpoint={best}", "data=slides"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
        cfg.data.path = str(out / "tiles.parquet")
    result = evaluation.evaluate_cohort(cfg)
    ev = result["evaluation"]
    tiles = pd.read_parquet(out / "tiles.parquet")
    assert ev.n == len(tiles) and ev.slide.n == 6 and ev.patient.n == 6
    frozen = load_checkpoint(best)["thresholds"]
    assert ev.thresholds == pytest.approx(frozen["tile"])
    assert (tmp_path / "reports" / "predictions_slides_external.csv").is_file()
