"""her2exp-eval on an external cohort and her2exp-predict on a folder, through the real CLIs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import BIN, SmokeRun
from her2exp import checkpoint
from her2exp.data import synthetic


def cli(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def external_eval(smoke_run: SmokeRun) -> tuple[subprocess.CompletedProcess, Path]:
    out = smoke_run.cwd / "eval_external"
    proc = cli("her2exp-eval", [f"run_id={smoke_run.run_id}", f"tracking.uri={smoke_run.uri}",
                                "data.n_patients=16", "data.patches_per_patient=8",
                                f"hydra.run.dir={out}"], smoke_run.cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


def test_best_checkpoint_holds_the_frozen_thresholds(smoke_run: SmokeRun) -> None:
    state = checkpoint.load(smoke_run.run_dir / "checkpoints" / "best.pt")
    best = json.loads((smoke_run.run_dir / "reports" / "best.json").read_text())
    assert state["thresholds"] == pytest.approx(best["thresholds"])
    assert set(state["thresholds"]) == {"youden", "sens90", "p50"}


def test_external_eval_is_a_linked_mlflow_run_with_a_report(smoke_run, external_eval) -> None:
    import mlflow

    proc, out = external_eval
    assert "external (frozen thresholds from the training run)" in proc.stdout
    client = mlflow.MlflowClient(tracking_uri=smoke_run.uri)
    exp = client.get_experiment_by_name("her2exp")
    linked = client.search_runs([exp.experiment_id],
                                f"tags.source_run_id = '{smoke_run.run_id}'")  # fmt: skip
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


def test_external_eval_uses_the_training_thresholds(smoke_run, external_eval) -> None:
    _, out = external_eval
    train_best = json.loads((smoke_run.run_dir / "reports" / "best.json").read_text())
    ext = json.loads((out / "reports" / "best.json").read_text())
    assert ext["splits"]["external"]["thresholds"] == train_best["thresholds"]
    preds = pd.read_csv(out / "reports" / "predictions_external.csv")
    assert len(preds) == 16 * 8 and set(preds["site"]) == {"external"}
    t = train_best["thresholds"]["youden"]
    assert (preds["called_her2_pos_youden"] == (preds["prob_her2_pos"] >= t)).all()


def test_eval_refuses_an_unknown_run(smoke_run: SmokeRun, tmp_path: Path) -> None:
    proc = cli("her2exp-eval", ["run_id=doesnotexist", f"tracking.uri={smoke_run.uri}",
                                f"hydra.run.dir={tmp_path}"], tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "run_id='doesnotexist' not found" in proc.stderr


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
    proc = cli("her2exp-predict", [f"checkpoint={smoke_run.run_dir}/checkpoints/best.pt",
                                   f"input={folder}", f"output={out}"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out)
    assert len(table) == len(data.images) + 2
    assert table["path"].is_unique and table["prob_her2_pos"].between(0, 1).all()
    state = checkpoint.load(smoke_run.run_dir / "checkpoints" / "best.pt")
    for name, t in state["thresholds"].items():
        expected = (table["prob_her2_pos"] >= t).astype(int)
        assert np.array_equal(table[f"called_her2_pos_{name}"], expected)
    assert "broken.png" in proc.stderr and "truncated.jpg" in proc.stderr
    errors = pd.read_csv(out.with_suffix(".errors.csv"))
    assert sorted(Path(p).name for p in errors["path"]) == ["broken.png", "truncated.jpg"]
