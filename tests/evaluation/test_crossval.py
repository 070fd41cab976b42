"""Cross-validation and repeats: folds in the splits (patient-grouped, stratified, or one site
held out), every bad setting refused in one line, and the sweep parent's pooled out-of-fold and
repeat results (`her2exp.evaluation.crossval`) on child folders built here, then once through the CLI
(conftest `cv_sweep`, a real 3-fold multirun into SQLite).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf, open_dict
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import SweepRun, compose_train
from her2exp import data
from her2exp.config import ConfigError, DataConfig
from her2exp.config.commands import validate_only
from her2exp.data import splits, synthetic
from her2exp.evaluation import crossval
from her2exp.evaluation.sweep_callback import MlflowSweepCallback


def patients_frame(n_neg: int = 20, n_pos: int = 10, sites: tuple[str, ...] = ("a", "b", "c")):
    """Three tiles per patient; a patient's site is fixed (round robin within its class)."""
    rows = []
    for cls, n in ((0, n_neg), (1, n_pos)):
        for i in range(n):
            pid = f"P{cls}{i:02d}"
            rows += [{"patient_id": pid, "label": cls, "site": sites[i % len(sites)]}] * 3
    return pd.DataFrame(rows)


def folds_of(frame: pd.DataFrame, k: int, by: str = "patient", seed: int = 7) -> list[pd.Series]:
    return [splits.assign_fold(frame, (0.7, 0.15, 0.15), seed, k, fold, by) for fold in range(k)]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_partition_the_patients(k: int) -> None:
    frame = patients_frame()
    patients = frame["patient_id"].unique()
    tested: list[str] = []
    for split in folds_of(frame, k):
        assigned = frame.assign(split=split.to_numpy())
        assert assigned["split"].notna().all()
        splits.check(assigned)  # no patient in two splits; both classes in every split
        per = assigned.drop_duplicates("patient_id").set_index("patient_id")["split"]
        tested += per.index[per == "test"].tolist()
        rest = per[per != "test"]
        # Validation is val / (train + val) of the other patients, by class.
        assert (rest == "val").sum() == pytest.approx(len(rest) * 0.15 / 0.85, abs=2)
    assert sorted(tested) == sorted(patients)  # every patient in exactly one test fold
    again = folds_of(frame, k)
    assert all(a.equals(b) for a, b in zip(again, folds_of(frame, k), strict=True))
    assert not folds_of(frame, k, seed=8)[0].equals(folds_of(frame, k)[0])


def test_site_folds_hold_whole_sites_out() -> None:
    frame = patients_frame()
    for fold, split in enumerate(folds_of(frame, 3, by="site")):
        test_sites = set(frame.loc[split == "test", "site"])
        assert test_sites == {"abc"[fold]}  # the k-th site, sorted, entirely
        assert (frame.loc[frame["site"] == "abc"[fold]].index == frame.index[split == "test"]).all()
        assert {"train", "val"} <= set(split[frame["site"] != "abc"[fold]])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.split.fold=1"], "data.split.fold=1 is not allowed (null unless data.split.folds"),
        (["data.split.folds=3", "data.split.fold=3"], "an integer in [0, 3)"),
        (["data.split.folds=3"], "data.split.fold=None is not allowed"),
        (["data.split.by=site"], "data.split.by='site' is not allowed"),
        (["data.split.by=sites", "data.split.folds=2", "data.split.fold=0"], "patient, site"),
        (["data.split.folds=1", "data.split.fold=0"], "data.split.folds=1 is not allowed"),
    ],
)
def test_bad_fold_settings_are_one_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_only("train", ["experiment=smoke", *overrides])
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.split.folds=7"], "data.split.folds=7 is more than the 6 HER2+ patients"),
        (["data.split.by=site", "data.sites=[site_a]"], "needs at least two sites"),
        (["data.split.by=site", "data.split.folds=3"], "must equal the 2 sites (site_a, site_b)"),
    ],
)
def test_folds_the_data_cannot_meet_are_one_line(overrides: list[str], expected: str) -> None:
    cfg = compose_train(["experiment=smoke", "data.split.folds=2", "data.split.fold=0", *overrides])
    with pytest.raises(splits.FoldError) as info:
        data.build(cfg.data, cfg.seed)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_fold_error_reaches_the_user_without_a_doubled_prefix() -> None:
    """What her2exp-train prints: `her2exp: data.split.folds=7 ...`."""
    from her2exp.runtime import distributed
    from her2exp.training import builders

    cfg = compose_train(["experiment=smoke", "data.split.folds=7", "data.split.fold=0"])
    with pytest.raises(ConfigError) as info:
        builders.build_data(cfg, distributed.DistContext(0, 0, 1, torch.device("cpu"), None))
    assert str(info.value).startswith("data.split.folds=7 is more than the 6 HER2+ patients")


def test_runs_without_folds_keep_their_splits_and_fingerprint() -> None:
    cfg = compose_train(["experiment=smoke"])
    bundle = data.build(cfg.data, cfg.seed)
    fractions = (cfg.data.split.train, cfg.data.split.val, cfg.data.split.test)
    today = splits.assign(bundle.manifest, fractions, cfg.seed)
    assert bundle.manifest["split"].equals(today)
    # The fingerprint of the schema before CV existed (split = the three fractions only).
    old = OmegaConf.create(OmegaConf.to_container(cfg.data))
    with open_dict(old):
        for key in ("folds", "fold", "by", "ignore_column"):
            del old.split[key]
    assert bundle.fingerprint == data._fingerprint(old, cfg.seed, bundle.manifest)
    cv = compose_train(["experiment=smoke", "data.split.folds=3", "data.split.fold=0"])
    assert data.build(cv.data, cv.seed).fingerprint != bundle.fingerprint


def test_a_manifest_split_column_is_refused_under_cv_unless_ignored(tmp_path: Path) -> None:
    d = synthetic.generate(n_patients=12, patches_per_patient=2, image_size=16, seed=0)
    paths = []
    for k, image in enumerate(d.images):
        Image.fromarray(image).save(tmp_path / f"{k:03d}.png")
        paths.append(f"{k:03d}.png")
    frame = d.frame[["label", "patient_id", "slide_id", "site"]].assign(path=paths, split="train")
    csv = tmp_path / "manifest.csv"
    frame.to_csv(csv, index=False)
    cfg = OmegaConf.structured(DataConfig)
    cfg.source, cfg.path, cfg.image_size = "manifest", str(csv), 16
    cfg.split.folds, cfg.split.fold = 2, 1
    with pytest.raises(splits.FoldError) as info:
        data.build(cfg, seed=0)
    assert str(info.value) == (
        f"data.path={csv} has its own split column, which data.split.folds would override: "
        "empty it, or set data.split.ignore_column=true"
    )
    cfg.split.ignore_column = True
    bundle = data.build(cfg, seed=0)
    expected = splits.assign_fold(bundle.manifest, (0.7, 0.15, 0.15), 0, 2, 1)
    assert bundle.manifest["split"].equals(expected)


def test_a_tile_manifest_split_column_is_refused_under_cv_unless_ignored(
    tiled_slides, tmp_path: Path
) -> None:
    _, _, out = tiled_slides
    tiles = pd.read_parquet(out / "tiles.parquet").assign(split="train")
    path = tmp_path / "tiles.parquet"
    tiles.to_parquet(path)
    over = ["data=slides", f"data.path={path}", "data.split.folds=3", "data.split.fold=0"]
    with pytest.raises(splits.FoldError, match="has its own split column"):
        data.build(compose_train(over).data, seed=0)
    bundle = data.build(compose_train([*over, "data.split.ignore_column=true"]).data, seed=0)
    expected = splits.assign_fold(bundle.manifest, (0.7, 0.15, 0.15), 0, 3, 0)
    assert bundle.manifest["split"].equals(expected)


# --- the sweep parent, on child folders built in-process -------------------------------------


def write_child(sweep: Path, job: int, cfg: dict, tiles: pd.DataFrame) -> None:
    """A finished job's folder as a child run leaves it: config and test predictions."""
    run = sweep / str(job)
    (run / "reports").mkdir(parents=True)
    cfg = {**cfg, "output_dir": str(run)}
    (run / "config_resolved.yaml").write_text(yaml.safe_dump(cfg))
    tiles.to_csv(run / "reports" / "predictions_test.csv", index=False)
    called = [c for c in tiles.columns if c.startswith("called_")]
    patients = tiles.groupby("patient_id", sort=True).agg(
        label=("label", "max"), prob_her2_pos=("prob_her2_pos", "mean")
    )
    for c in called:
        patients[c] = (patients["prob_her2_pos"] >= 0.5).astype(int)
    patients.reset_index().to_csv(run / "reports" / "predictions_patients_test.csv", index=False)


def child_tiles(rng: np.random.Generator, patients: list[str], labels: list[int]) -> pd.DataFrame:
    rows = []
    for pid, y in zip(patients, labels, strict=True):
        for _ in range(4):
            p = float(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1))
            rows.append({"patient_id": pid, "label": y, "prob_her2_pos": p})
    frame = pd.DataFrame(rows)
    threshold = rng.uniform(0.3, 0.6)  # each fold's own frozen threshold
    frame["called_her2_pos_youden"] = (frame["prob_her2_pos"] >= threshold).astype(int)
    frame["called_her2_pos_sens90"] = (frame["prob_her2_pos"] >= threshold - 0.1).astype(int)
    return frame


def cfg_of(seed: int, fold: int | None = None, split_seed: int | None = 0) -> dict:
    split = {"train": 0.7, "val": 0.15, "test": 0.15, "folds": None if fold is None else 3}
    split |= {"fold": fold, "by": "patient"}
    return {
        "seed": seed,
        "data": {"split_seed": split_seed, "data_seed": 0, "split": split},
        "evaluation": {"decision_level": "tile", "operating_point": "youden"},
    }


def test_pooled_out_of_fold_auc_equals_sklearn_on_the_concatenation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sweep = tmp_path / "sweep"
    tables = []
    for fold in range(3):
        ids = [f"F{fold}P{i}" for i in range(6)]
        tables.append(child_tiles(rng, ids, [0, 0, 0, 0, 1, 1]))
        write_child(sweep, fold, cfg_of(42, fold), tables[-1])
    result = crossval.summarise(sweep)
    assert result.kind == "cv" and result.tags["sweep.kind"] == "cv"
    everything = pd.concat(tables)
    assert result.metrics["cv_auc"] == pytest.approx(
        roc_auc_score(everything["label"], everything["prob_her2_pos"]), abs=1e-12
    )
    assert result.metrics["cv_auc_low"] < result.metrics["cv_auc"] < result.metrics["cv_auc_high"]
    # Sensitivity at each fold's own threshold: the pooled calls, not one pooled threshold.
    pos = everything[everything["label"] == 1]
    assert result.metrics["cv_sensitivity_youden"] == pytest.approx(
        pos["called_her2_pos_youden"].mean()
    )
    fold_aucs = [roc_auc_score(t["label"], t["prob_her2_pos"]) for t in tables]
    assert result.metrics["cv_auc_fold_mean"] == pytest.approx(np.mean(fold_aucs))
    assert result.metrics["cv_auc_fold_sd"] == pytest.approx(np.std(fold_aucs, ddof=1))
    assert "cv_patient_auc" in result.metrics and "cv_patient_sensitivity_sens90" in result.metrics
    oof = pd.read_csv(sweep / "cv" / "oof_predictions.csv")
    assert len(oof) == len(everything) and sorted(oof["fold"].unique()) == [0, 1, 2]
    assert {"job", "child_run_id"} <= set(oof.columns)
    summary = (sweep / "cv" / "cv_summary.md").read_text()
    assert "| Every patient tested exactly once | PASS |" in summary
    assert (sweep / "cv" / "roc_folds.png").stat().st_size > 0


def test_repeat_aggregation_and_the_split_seed_warning(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ids, labels = [f"P{i}" for i in range(8)], [0, 0, 0, 0, 0, 1, 1, 1]
    for split_seed, name in ((0, "fixed"), (None, "varies")):
        sweep = tmp_path / name
        tables = [child_tiles(rng, ids, labels) for _ in range(4)]
        for job, t in enumerate(tables):
            write_child(sweep, job, cfg_of(job + 1, split_seed=split_seed), t)
        result = crossval.summarise(sweep)
        assert result.kind == "repeat"
        aucs = [roc_auc_score(t["label"], t["prob_her2_pos"]) for t in tables]
        assert result.metrics["repeat_auc_mean"] == pytest.approx(np.mean(aucs))
        assert result.metrics["repeat_auc_sd"] == pytest.approx(np.std(aucs, ddof=1))
        sens = [t.loc[t["label"] == 1, "called_her2_pos_youden"].mean() for t in tables]
        assert result.metrics["repeat_sensitivity_youden_mean"] == pytest.approx(np.mean(sens))
        assert result.metrics["repeat_sensitivity_youden_sd"] == pytest.approx(np.std(sens, ddof=1))
        text = (sweep / "cv" / "repeat_summary.md").read_text()
        varies = split_seed is None
        assert ("repeat.split_seed_varies" in result.tags) is varies
        assert ("the split seed varies across children (1, 2, 3, 4)" in text) is varies


def test_a_grid_sweep_is_plain_and_writes_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for job, lr in enumerate((1e-3, 1e-2)):
        cfg = cfg_of(1) | {"trainer": {"lr": lr}}
        write_child(tmp_path, job, cfg, child_tiles(rng, ["A", "B", "C"], [0, 1, 1]))
    result = crossval.summarise(tmp_path)
    assert result.kind == "plain" and result.metrics == {} and not (tmp_path / "cv").exists()


def test_the_callback_writes_the_results_with_tracking_off(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for fold in range(3):
        ids = [f"F{fold}P{i}" for i in range(4)]
        write_child(tmp_path, fold, cfg_of(42, fold), child_tiles(rng, ids, [0, 0, 1, 1]))
    config = OmegaConf.create({"tracking": {"backend": "off"}, "hydra": {}})
    config.hydra.sweep = {"dir": str(tmp_path)}  # what Hydra passes the callback
    callback = MlflowSweepCallback()
    callback.on_multirun_start(config)
    callback.on_multirun_end(config)
    assert (tmp_path / "cv" / "cv_summary.md").is_file()
    assert (tmp_path / "cv" / "oof_predictions_patients.csv").is_file()


# --- the real CLI sweep ------------------------------------------------------------------------


def test_the_cv_parent_run_holds_the_pooled_results(cv_sweep: SweepRun) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cv_sweep.uri)
    parent = client.get_run(cv_sweep.parent_run_id)
    assert parent.data.tags["sweep.kind"] == "cv" and parent.data.tags["cv.by"] == "patient"
    assert parent.info.status == "FINISHED"
    children = [client.get_run(r) for r in cv_sweep.child_run_ids]
    assert sorted(c.data.tags["cv.fold"] for c in children) == ["0", "1", "2"]
    assert {c.data.tags["cv.folds"] for c in children} == {"3"}
    assert {c.data.params["data.split.folds"] for c in children} == {"3"}
    names = {a.path for a in client.list_artifacts(cv_sweep.parent_run_id, "cv")}
    assert {"cv/oof_predictions.csv", "cv/cv_summary.md", "cv/roc_folds.png"} <= names
    local = Path(client.download_artifacts(cv_sweep.parent_run_id, "cv"))
    oof = pd.read_csv(local / "oof_predictions.csv")
    # Out-of-fold: every patient scored once, by the fold that held it out.
    patients = pd.read_csv(local / "oof_predictions_patients.csv")
    assert not patients["patient_id"].duplicated().any() and len(patients) == 24
    assert set(oof["child_run_id"]) == set(cv_sweep.child_run_ids)
    metrics = parent.data.metrics
    assert metrics["cv_auc"] == pytest.approx(roc_auc_score(oof["label"], oof["prob_her2_pos"]))
    for key in ("cv_auc_low", "cv_auc_high", "cv_auc_fold_mean", "cv_sensitivity_youden",
                "cv_patient_auc", "cv_patient_specificity_sens90_fold_sd"):  # fmt: skip
        assert math.isfinite(metrics[key]), key
    summary = (local / "cv_summary.md").read_text()
    assert "# her2exp cross-validation: 3 folds by patient" in summary
    assert "## Clinical Evaluation Checklist (pooled)" in summary
    # The checklist judges the pooled out-of-fold results, not any one fold's.
    auc_ok = "PASS" if metrics["cv_auc"] >= 0.95 else "FAIL"
    assert f"| {auc_ok} | AUC {metrics['cv_auc']:.3f} |" in summary
    sens = metrics["cv_sensitivity_youden"]
    sens_ok = "PASS" if sens >= 0.90 else "FAIL"
    assert f"| {sens_ok} | sensitivity {sens:.3f} at each fold's own `youden`" in summary
    assert (cv_sweep.sweep_dir / "cv" / "cv_summary.md").read_text() == summary
