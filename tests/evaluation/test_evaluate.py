"""her2exp-eval on an external cohort and her2exp-predict on a folder, through the real CLIs;
her2exp-eval's own settings (the run's evaluation and AMP, split=test) in-process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import BIN, SmokeRun, checkpoint_with, eval_config
from her2exp import evaluation
from her2exp.config import ConfigError
from her2exp.core import checkpoint
from her2exp.data import synthetic


def cli(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / name), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def external_eval(smoke_run: SmokeRun) -> tuple[subprocess.CompletedProcess, Path]:
    out = smoke_run.cwd / "eval_external"
    args = [f"run_id={smoke_run.run_id}", f"tracking.uri={smoke_run.uri}", "data.n_patients=16"]
    args += ["data.patches_per_patient=8", f"hydra.run.dir={out}"]
    proc = cli("her2exp-eval", args, smoke_run.cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


def test_best_checkpoint_holds_the_frozen_thresholds(smoke_run: SmokeRun) -> None:
    state = checkpoint.load(smoke_run.run_dir / "checkpoints" / "best.pt")
    best = json.loads((smoke_run.run_dir / "reports" / "best.json").read_text())
    assert state["thresholds"] == best["thresholds"]  # JSON keeps every float digit
    assert set(state["thresholds"]) == {"tile", "slide", "patient"}
    for level in state["thresholds"].values():
        assert set(level) == {"youden", "sens90", "sens90_lcb", "p50"}


def test_external_eval_is_a_linked_mlflow_run_with_a_report(smoke_run, external_eval) -> None:
    import mlflow

    proc, out = external_eval
    assert "external (frozen thresholds from the training run)" in proc.stdout
    client = mlflow.MlflowClient(tracking_uri=smoke_run.uri)
    exp = client.get_experiment_by_name("her2exp")
    linked = client.search_runs([exp.experiment_id], f"tags.source_run_id = '{smoke_run.run_id}'")
    assert len(linked) == 1
    run = linked[0]
    assert run.data.tags["cohort"] == "external"
    assert 0.0 <= run.data.metrics["external_auc"] <= 1.0
    assert run.data.params["data.sites"] == "['external']"
    paths = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {
        "reports/summary.md",
        "reports/roc.png",
        "reports/false_negatives_external.png",
    } <= paths
    summary = (out / "reports" / "summary.md").read_text()
    assert "external cohort (frozen thresholds)" in summary
    assert "| External cohort evaluated | PASS |" in summary


def test_external_eval_adds_its_cohort_to_a_copy_of_the_model_card(smoke_run, external_eval):
    """her2exp-eval re-renders the run's card with the cohort's results (from its own best.json)
    into its report folder and logs it to its eval run; the run's own card is left as it was."""
    import mlflow

    proc, out = external_eval
    card = (out / "reports" / "model_card.md").read_text()
    ext = json.loads((out / "reports" / "best.json").read_text())["splits"]["external"]
    r = ext["reports"]["youden"]
    ci = f"{r['sensitivity']:.3f} [{r['sensitivity_low']:.3f}, {r['sensitivity_high']:.3f}]"
    assert "### external (external)" in card and f"| youden | {r['threshold']:.4f} | {ci} |" in card
    assert f"MLflow run {smoke_run.run_id}" in card and "No external cohort" not in card
    client = mlflow.MlflowClient(tracking_uri=smoke_run.uri)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("her2exp: MLflow run "))
    logged = {a.path for a in client.list_artifacts(line.split()[3], "reports")}
    assert "reports/model_card.md" in logged
    own = (smoke_run.run_dir / "reports" / "model_card.md").read_text()
    assert "None evaluated yet" in own and "(external)" not in own


def test_external_eval_uses_the_training_thresholds(smoke_run, external_eval) -> None:
    _, out = external_eval
    train_best = json.loads((smoke_run.run_dir / "reports" / "best.json").read_text())
    ext = json.loads((out / "reports" / "best.json").read_text())
    assert ext["thresholds"] == train_best["thresholds"]  # every level, as frozen
    assert ext["splits"]["external"]["thresholds"] == train_best["thresholds"]["tile"]
    assert (
        ext["splits"]["external"]["patient"]["thresholds"] == (train_best["thresholds"]["patient"])
    )
    preds = pd.read_csv(out / "reports" / "predictions_external.csv")
    assert len(preds) == 16 * 8 and set(preds["site"]) == {"external"}
    t = train_best["thresholds"]["tile"]["youden"]
    assert (preds["called_her2_pos_youden"] == (preds["prob_her2_pos"] >= t)).all()


def test_eval_refuses_an_unknown_run(
    smoke_run: SmokeRun, tmp_path: Path, monkeypatch, capsys
) -> None:
    from her2exp.cli.eval import main

    args = ["run_id=doesnotexist", f"tracking.uri={smoke_run.uri}", f"hydra.run.dir={tmp_path}"]
    monkeypatch.setattr("sys.argv", ["her2exp-eval", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "run_id='doesnotexist' not found" in err
    assert err.count("\n") == 1 and err.startswith("her2exp: ")


def test_eval_keeps_the_runs_evaluation_settings(smoke_run: SmokeRun, tmp_path: Path) -> None:
    """A run trained with operating_point=sens90, patient_aggregation=max, n_boot=0 is
    re-evaluated with those settings, not the eval config's defaults (youden/mean/1000); the
    eval command line still overrides them, except an aggregation a level's frozen thresholds
    were chosen on."""
    from her2exp import metrics

    changes = {"evaluation.operating_point": "sens90", "evaluation.patient_aggregation": "max"}
    ckpt = checkpoint_with(smoke_run, tmp_path, **changes, **{"evaluation.n_boot": 0})
    common = [f"checkpoint={ckpt}", "data.n_patients=12", "data.patches_per_patient=4"]
    out = evaluation.evaluate_cohort(eval_config(common, tmp_path / "a"))
    s = out["settings"]
    assert (s.operating_point, s.patient_aggregation, s.n_boot) == ("sens90", "max", 0)
    ev = out["evaluation"]
    assert ev.auc_bootstrap is None  # n_boot=0: no bootstrap, as in the run
    best = json.loads((tmp_path / "a" / "reports" / "best.json").read_text())
    assert best["operating_point"] == "sens90"
    preds = pd.read_csv(tmp_path / "a" / "reports" / "predictions_external.csv")
    by_max = metrics.evaluate_split(
        preds["label"].to_numpy(),
        preds["prob_her2_pos"].to_numpy(),
        ev.thresholds,
        patient_ids=preds["patient_id"].to_numpy(),
        patient_how="max",
        level_thresholds={"patient": ev.patient.thresholds},
    )
    by_mean = metrics.evaluate_split(
        preds["label"].to_numpy(),
        preds["prob_her2_pos"].to_numpy(),
        ev.thresholds,
        patient_ids=preds["patient_id"].to_numpy(),
        level_thresholds={"patient": ev.patient.thresholds},
    )

    def patient_level(e: metrics.SplitEvaluation) -> dict[str, float]:
        return {k: v for k, v in e.as_flat_dict().items() if k.startswith("patient_")}

    assert patient_level(by_max) != pytest.approx(patient_level(by_mean), nan_ok=True)
    assert patient_level(ev) == pytest.approx(patient_level(by_max), nan_ok=True)

    given = ["evaluation.n_boot=20", "evaluation.operating_point=p50"]
    again = evaluation.evaluate_cohort(eval_config([*common, *given], tmp_path / "b"))
    s = again["settings"]
    assert (s.operating_point, s.patient_aggregation, s.n_boot) == ("p50", "max", 20)
    assert again["evaluation"].auc_bootstrap is not None
    with pytest.raises(ConfigError, match="froze its patient-level thresholds on max"):
        evaluation.prepare_evaluation(
            eval_config([*common, "evaluation.patient_aggregation=mean"], tmp_path / "c")
        )


def test_eval_scores_with_the_runs_amp_setting(smoke_run: SmokeRun, tmp_path: Path) -> None:
    """trainer.amp of the run is resolved as training resolves it (CPU: auto -> fp32, bf16 when
    asked); trainer.amp=... on the eval command line overrides it."""
    ckpt = checkpoint_with(smoke_run, tmp_path, **{"trainer.amp": "bf16"})
    run = evaluation.load_run(eval_config([f"checkpoint={ckpt}"], tmp_path))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert evaluation.build_scorer(run, None, 0).autocast_dtype == torch.bfloat16
    assert evaluation.build_scorer(run, "off", 0).autocast_dtype is None
    auto = evaluation.build_scorer(run, "auto", 0)
    assert (auto.autocast_dtype is None) == (device.type == "cpu")


def test_eval_split_test_reproduces_the_runs_test_metrics(smoke_run: SmokeRun, tmp_path) -> None:
    """`her2exp-eval run_id=... split=test` rebuilds the run's data and split from its stored
    config and seed and scores them at the frozen thresholds: every test metric the run logged
    (AUC with its CIs, each operating point; MLflow's headline metrics and the rest of its
    reports/metrics.csv) comes out the same."""
    import mlflow

    args = [f"run_id={smoke_run.run_id}", f"tracking.uri={smoke_run.uri}", "split=test"]
    out = evaluation.evaluate_cohort(eval_config(args, tmp_path))
    assert out["cohort"] == "test"
    table = pd.read_csv(smoke_run.run_dir / "reports" / "metrics.csv")
    logged = dict(zip(table["metric"], table["value"], strict=True))
    logged |= mlflow.MlflowClient(tracking_uri=smoke_run.uri).get_run(smoke_run.run_id).data.metrics
    again = out["evaluation"].as_flat_dict("test_")
    shared = sorted(set(again) & set(logged))
    assert {
        "test_auc",
        "test_auc_low",
        "test_youden_sensitivity",
        "test_sens90_specificity",
    } <= set(shared)
    assert len(shared) > 30
    for key in shared:
        assert again[key] == pytest.approx(logged[key], rel=1e-9, abs=1e-12, nan_ok=True), key
    own = pd.read_csv(smoke_run.run_dir / "reports" / "predictions_test.csv")
    rescored = pd.read_csv(tmp_path / "reports" / "predictions_test.csv")
    np.testing.assert_allclose(rescored["prob_her2_pos"], own["prob_her2_pos"], rtol=1e-12)


def test_predict_scores_readable_images_and_names_the_rest(smoke_run, tmp_path: Path) -> None:
    data = synthetic.generate(n_patients=4, patches_per_patient=3, image_size=40, seed=5)
    folder = tmp_path / "patches"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(data.images):
        target = folder / ("sub" if i % 2 else "") / f"p{i}.png"
        Image.fromarray(img).save(target)  # 40 px: resized to the model's 32 px
    Image.fromarray(data.images[0]).convert("L").save(folder / "gray.tif")
    Image.fromarray(data.images[1]).convert("RGBA").save(folder / "rgba.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "truncated.jpg").write_bytes(b"\xff\xd8\xff")
    out = tmp_path / "preds.csv"
    ckpt = smoke_run.run_dir / "checkpoints" / "best.pt"
    proc = cli("her2exp-predict", [f"checkpoint={ckpt}", f"input={folder}", f"out={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out)
    assert len(table) == len(data.images) + 2
    assert table["path"].is_unique and table["prob_her2_pos"].between(0, 1).all()
    state = checkpoint.load(smoke_run.run_dir / "checkpoints" / "best.pt")
    for name, t in state["thresholds"]["tile"].items():  # the decision level: tile
        expected = (table["prob_her2_pos"] >= t).astype(int)
        assert np.array_equal(table[f"called_her2_pos_{name}"], expected)
    assert "broken.png" in proc.stderr and "truncated.jpg" in proc.stderr
    errors = pd.read_csv(out.with_suffix(".errors.csv"))
    assert sorted(Path(p).name for p in errors["path"]) == ["broken.png", "truncated.jpg"]
