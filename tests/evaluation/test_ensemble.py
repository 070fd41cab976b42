"""`her2exp-eval sweep_run_id=` and `her2exp-predict sweep_run_id=`: a sweep's members as one
ensemble, through the real checkpoints and MLflow store of the session's `cv_sweep`; the
ensemble's thresholds on hand-built tables of both kinds of sweep."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image

from conftest import SweepRun
from her2exp import evaluation, metrics
from her2exp.apps.predict import predict_folder, predict_slides
from her2exp.cli.common import compose
from her2exp.config import ConfigError
from her2exp.data import synthetic
from her2exp.data.sources import read_patch
from her2exp.evaluation import ensemble
from her2exp.evaluation.scorer import build_scorer

EXTERNAL = ["data.n_patients=8", "data.patches_per_patient=6", "evaluation.n_boot=0"]
THRESHOLD_KEYS = dict(target_sensitivity=0.9, slide_aggregation="mean", patient_aggregation="mean")


def eval_cfg(overrides: list[str], out: Path, uri: str | None = None):
    """conf/eval.yaml as her2exp-eval composes it; MLflow into `uri`, or off."""
    tracking = [f"tracking.uri={uri}", "tracking.experiment=ensemble-eval"] if uri else []
    cfg = compose("eval", [*(tracking or ["tracking.backend=off"]), *EXTERNAL, *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def table(rows: list[int], labels: list[int], probs: list[float], patients: list[str]):
    return pd.DataFrame(
        {"row": rows, "label": labels, "prob_her2_pos": probs, "patient_id": patients}
    )


def test_cv_thresholds_are_chosen_on_the_pooled_out_of_fold_predictions() -> None:
    a = table([0, 1, 2], [1, 0, 0], [0.9, 0.4, 0.1], ["p0", "p1", "p2"])
    b = table([3, 4, 5], [1, 1, 0], [0.35, 0.7, 0.5], ["p3", "p4", "p5"])
    ecfg = OmegaConf.create({**THRESHOLD_KEYS, "topk": 8})
    got = ensemble.ensemble_thresholds("cv", [a, b], ecfg)
    pooled = pd.concat([a, b])
    want = metrics.operating_points_by_level(
        pooled["label"].to_numpy(),
        pooled["prob_her2_pos"].to_numpy(),
        None,
        pooled["patient_id"].to_numpy(),
        0.9,
        "mean",
        "mean",
        8,
    )
    assert got == want
    assert got["tile"]["sens90"] == pytest.approx(0.35)  # 3 of 3 HER2+ at the lowest positive
    assert set(got) == {"tile", "patient"}


def test_repeat_thresholds_are_chosen_on_the_mean_validation_probabilities() -> None:
    a = table([7, 3, 5, 9], [1, 0, 1, 0], [0.8, 0.2, 0.3, 0.6], ["p1", "p0", "p1", "p2"])
    b = a.iloc[[2, 0, 3, 1]].assign(prob_her2_pos=[0.5, 0.6, 0.1, 0.4])  # other order
    ecfg = OmegaConf.create({**THRESHOLD_KEYS, "topk": 8})
    got = ensemble.ensemble_thresholds("repeat", [a, b], ecfg)
    # by row: 3 -> (0.2 + 0.4) / 2, 5 -> (0.3 + 0.5) / 2, 7 -> 0.7, 9 -> 0.35
    want = metrics.operating_points_by_level(
        np.array([0, 1, 1, 0]),
        np.array([0.3, 0.4, 0.7, 0.35]),
        None,
        np.array(["p0", "p1", "p1", "p2"]),
        0.9,
        "mean",
        "mean",
        8,
    )
    assert got == want
    with pytest.raises(ConfigError, match="member 1 validated on other rows"):
        ensemble.ensemble_thresholds("repeat", [a, b.assign(row=[5, 7, 9, 11])], ecfg)


@pytest.fixture(scope="module")
def sweep_eval(cv_sweep: SweepRun, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """her2exp-eval sweep_run_id= on a small external cohort, logged to the sweep's store."""
    out = tmp_path_factory.mktemp("sweep_eval")
    return evaluation.evaluate_cohort(
        eval_cfg([f"sweep_run_id={cv_sweep.parent_run_id}"], out, cv_sweep.uri)
    )


def test_the_ensemble_is_the_mean_of_its_members_scored_one_by_one(
    cv_sweep: SweepRun, sweep_eval: dict, tmp_path: Path
) -> None:
    ens = sweep_eval["ensemble"]
    assert sorted(ens.member_ids) == sorted(cv_sweep.child_run_ids)
    got = pd.read_csv(Path(sweep_eval["report_dir"]) / "predictions_external.csv")
    cfg = eval_cfg([f"tracking.uri={cv_sweep.uri}"], tmp_path)
    alone = []
    for child in cv_sweep.child_run_ids:  # each loaded and scored on its own, as run_id= does
        with open_dict(cfg):
            cfg.run_id = child
        run = evaluation.load_run(cfg)
        scorer = evaluation.build_scorer(run, None, cfg.seed)
        alone.append(evaluation.score_cohort(scorer, evaluation.load_cohort(cfg, run)).probs)
    order = [cv_sweep.child_run_ids.index(m) for m in ens.member_ids]
    probs = np.stack(alone)[order]
    assert len(got) == probs.shape[1] and probs.shape[0] == len(cv_sweep.child_run_ids) >= 2
    np.testing.assert_allclose(got["prob_her2_pos"], probs.mean(0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["member_sd"], probs.std(0), rtol=0, atol=1e-6)
    assert got["member_sd"].max() > 0  # the seeds disagree somewhere
    for name, t in ens.run.levels["tile"].items():
        assert np.array_equal(got[f"called_her2_pos_{name}"], (got["prob_her2_pos"] >= t))


def test_the_ensemble_thresholds_come_from_the_members_own_tables(
    cv_sweep: SweepRun, sweep_eval: dict
) -> None:
    ens = sweep_eval["ensemble"]
    client = mlflow.MlflowClient(cv_sweep.uri)
    exp = client.get_run(cv_sweep.parent_run_id).info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{cv_sweep.parent_run_id}'")
    job = {r.info.run_id: r.data.tags["sweep.job_num"] for r in children}
    tables = [
        pd.read_csv(cv_sweep.sweep_dir / job[m] / ensemble.TABLE[ens.kind]) for m in ens.member_ids
    ]
    assert ens.run.levels == ensemble.ensemble_thresholds(ens.kind, tables, sweep_eval["settings"])
    assert ens.kind == "cv"  # the session's sweep is 3-fold CV: pooled out-of-fold predictions
    oof = pd.read_csv(cv_sweep.sweep_dir / "cv" / "oof_predictions.csv")  # the parent's own
    again = ensemble.ensemble_thresholds("cv", [oof], sweep_eval["settings"])
    for level, values in ens.run.levels.items():
        assert values == pytest.approx(again[level], abs=1e-12)
    summary = (Path(sweep_eval["report_dir"]) / "summary.md").read_text()
    k = len(cv_sweep.child_run_ids)
    assert ensemble.CHOSEN_ON[ens.kind].format(k=k) in summary


def test_the_ensemble_eval_run_names_its_sweep_members_and_uncertainty(
    cv_sweep: SweepRun, sweep_eval: dict
) -> None:
    run = mlflow.MlflowClient(cv_sweep.uri).get_run(sweep_eval["mlflow_run_id"])
    assert run.data.tags["source_sweep_run_id"] == cv_sweep.parent_run_id
    assert sorted(run.data.tags["ensemble_members"].split(",")) == sorted(cv_sweep.child_run_ids)
    assert run.data.params["ensemble.thresholds"] == sweep_eval["ensemble"].chosen_on
    preds = pd.read_csv(Path(sweep_eval["report_dir"]) / "predictions_external.csv")
    assert run.data.metrics["external_member_sd_mean"] == pytest.approx(preds["member_sd"].mean())
    assert (Path(sweep_eval["report_dir"]) / "most_uncertain_external.png").is_file()
    uploaded = mlflow.MlflowClient(cv_sweep.uri).list_artifacts(run.info.run_id, "reports")
    assert "reports/most_uncertain_external.png" in {a.path for a in uploaded}


def test_ensemble_refusals_name_the_source(cv_sweep: SweepRun, tmp_path: Path) -> None:
    uri = cv_sweep.uri
    parent = cv_sweep.parent_run_id

    def refused(overrides: list[str]) -> str:
        with pytest.raises(ConfigError) as info:
            evaluation.evaluate_cohort(eval_cfg([f"tracking.uri={uri}", *overrides], tmp_path))
        assert "\n" not in str(info.value)
        return str(info.value)

    both = refused([f"sweep_run_id={parent}", f"run_id={cv_sweep.child_run_ids[0]}"])
    assert "give exactly one of" in both and "run_id and sweep_run_id" in both
    assert "not found" in refused(["sweep_run_id=0123456789abcdef"])
    child = cv_sweep.child_run_ids[0]
    assert "no FINISHED child run" in refused([f"sweep_run_id={child}"])
    assert "split=test" in refused([f"sweep_run_id={parent}", "split=test"])
    # A finished child without best.pt (trained with tracking.log_checkpoint=false):
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("ensemble-refusals")  # apart from the sweep's experiment
    lone = client.create_run(exp, tags={"sweep": "parent"}).info.run_id
    bare = client.create_run(exp, tags={"mlflow.parentRunId": lone}).info.run_id
    client.set_terminated(bare, "FINISHED")
    message = refused([f"sweep_run_id={lone}"])
    assert bare in message and "checkpoints/best.pt" in message


def test_members_that_read_patches_differently_are_refused(cv_sweep: SweepRun) -> None:
    members = [
        ensemble._member(c, cv_sweep.parent_run_id, cv_sweep.uri) for c in cv_sweep.child_run_ids
    ]
    ensemble.check_members(members)  # the sweep's own members agree
    other = members[-1]
    cfg = OmegaConf.create(OmegaConf.to_container(other.cfg))
    cfg.data.image_size = int(cfg.data.image_size) * 2
    odd = evaluation.TrainedRun(other.state, other.source_run, cfg, other.levels, other.source)
    with pytest.raises(ConfigError, match=rf"{other.source_run}.*data.image_size"):
        ensemble.check_members([*members[:-1], odd])
    cfg = OmegaConf.create(OmegaConf.to_container(other.cfg))
    cfg.evaluation.patient_aggregation = "max"
    odd = evaluation.TrainedRun(other.state, other.source_run, cfg, other.levels, other.source)
    with pytest.raises(ConfigError, match=rf"{other.source_run}.*evaluation.patient_aggregation"):
        ensemble.check_members([*members[:-1], odd])


def predict_cfg(overrides: list[str], uri: str):
    return compose("predict", [f"tracking.uri={uri}", *overrides])


def test_predict_with_sweep_run_id_scores_folders_and_tiles_with_the_members_mean(
    cv_sweep: SweepRun, sweep_eval: dict, tiled_slides, tmp_path: Path
) -> None:
    data = synthetic.generate(n_patients=3, patches_per_patient=2, image_size=40, seed=5)
    folder = tmp_path / "patches"
    folder.mkdir()
    for i, img in enumerate(data.images):
        Image.fromarray(img).save(folder / f"p{i}.png")
    sweep = [f"sweep_run_id={cv_sweep.parent_run_id}"]
    got = predict_folder(predict_cfg([*sweep, f"input={folder}"], cv_sweep.uri)).tiles
    ens = sweep_eval["ensemble"]  # the same members, loaded by the eval: scored one by one
    size = ens.run.cfg.data.image_size
    x = torch.stack([torch.from_numpy(read_patch(p, size)) for p in got["path"]]).permute(
        0, 3, 1, 2
    )
    probs = np.stack([build_scorer(m).probabilities(x.contiguous()) for m in ens.members])
    np.testing.assert_allclose(got["prob_her2_pos"], probs.mean(0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["member_sd"], probs.std(0), rtol=0, atol=1e-6)
    for name, t in ens.run.levels["tile"].items():
        assert np.array_equal(got[f"called_her2_pos_{name}"], got["prob_her2_pos"] >= t)
    _, _, tiles = tiled_slides  # one slide of them (absolute slide paths), for time
    manifest = pd.read_parquet(tiles / "tiles.parquet")
    one = tmp_path / "one_slide" / "tiles.parquet"
    one.parent.mkdir()
    manifest[manifest["slide_id"] == manifest["slide_id"].iloc[0]].to_parquet(one)
    shutil.copy(tiles / "tiling.json", one.parent)
    opts = predict_cfg([*sweep, f"input={one}"], cv_sweep.uri)
    result = predict_slides(opts, tmp_path / "maps")
    assert len(result.tiles) > 0 and result.tiles["member_sd"].ge(0).all()
    assert len(list((tmp_path / "maps").glob("*.png"))) == result.tiles["slide_id"].nunique()
