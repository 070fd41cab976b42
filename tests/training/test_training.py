"""End to end: the real CLI smoke run and what its MLflow run holds; determinism; resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import SmokeRun, compose_train
from her2exp.core import checkpoint
from her2exp.engine import NonFiniteLossError
from her2exp.training import run as train_mod

EPOCH_METRICS = [
    "train_loss",
    "val_loss",
    "val_auc",
    "val_sensitivity",
    "val_specificity",
    "val_youden_threshold",
    "lr",
    "epoch_seconds",
    "images_per_second",
]


@pytest.fixture(scope="module")
def mlflow_run(smoke_run: SmokeRun):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=smoke_run.uri)
    return client, client.get_run(smoke_run.run_id)


def test_cli_prints_the_headline_numbers(smoke_run: SmokeRun) -> None:
    out = smoke_run.stdout
    assert "her2exp: best val AUC" in out and "Youden threshold (val)" in out
    assert "test AUC" in out and f"MLflow run {smoke_run.run_id} in {smoke_run.uri}" in out


def test_run_finished_with_flattened_config_as_params(mlflow_run) -> None:
    _, run = mlflow_run
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model.name"] == "test_resnet"
    assert p["trainer.epochs"] == "2" and p["data.image_size"] == "32"
    assert p["seed"] == "42" and p["loss.name"] == "ce"


def test_audit_tags(mlflow_run) -> None:
    _, run = mlflow_run
    tags = run.data.tags
    assert tags["seed"] == "42"
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"
    assert tags["git_dirty"] in ("true", "false", "unknown")
    assert "experiment=smoke" in tags["overrides"]
    for key in (
        "python_version",
        "torch_version",
        "timm_version",
        "hydra_version",
        "mlflow_version",
        "device",
        "hostname",
        "data_fingerprint",
    ):
        assert tags[key] and tags[key] != "not installed", key
    assert tags["torch_version"] == torch.__version__
    assert tags["device"] == "cpu" and tags["world_size"] == "1"


def test_git_commit_tag_is_the_repository_head(mlflow_run) -> None:
    _, run = mlflow_run
    from her2exp.tracking import git_info

    assert run.data.tags["git_commit"] == git_info()["git_commit"]


def test_per_epoch_metrics(mlflow_run) -> None:
    client, run = mlflow_run
    for name in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [1, 2], name
        assert all(math.isfinite(m.value) for m in history), name
    aucs = [m.value for m in client.get_metric_history(run.info.run_id, "val_auc")]
    assert all(0.5 < a <= 1.0 for a in aucs)


def test_final_test_metrics_at_the_frozen_val_threshold(mlflow_run, smoke_run: SmokeRun) -> None:
    _, run = mlflow_run
    m = run.data.metrics
    best = json.loads((smoke_run.run_dir / "reports" / "best.json").read_text())
    # Each split's copy of the frozen thresholds and the levels other than the decision level's
    # are rows of reports/metrics.csv (tracking/schema.py), not MLflow metrics.
    table = pd.read_csv(smoke_run.run_dir / "reports" / "metrics.csv").set_index("metric")["value"]
    assert m["threshold_youden_val"] == pytest.approx(best["threshold_youden_val"])
    assert table["test_youden_threshold"] == pytest.approx(m["threshold_youden_val"])
    assert table["test_p50_threshold"] == 0.5
    assert m["best_val_auc"] == pytest.approx(best["best_val_auc"])
    assert m["test_auc"] == pytest.approx(best["test_auc"]) and 0.5 < m["test_auc"] <= 1.0
    t = best["splits"]["test"]["reports"]["youden"]
    assert t["tp"] + t["fn"] + t["fp"] + t["tn"] == t["n"]
    assert m["test_youden_sensitivity"] == pytest.approx(t["tp"] / (t["tp"] + t["fn"]))
    assert m["test_youden_sensitivity_low"] < m["test_youden_sensitivity"] or t["fn"] == 0
    assert m["test_auc_low"] <= m["test_auc"] <= m["test_auc_high"]
    # Operating points chosen on val are the ones test is scored at.
    assert best["splits"]["test"]["thresholds"] == best["splits"]["val"]["thresholds"]
    assert m["threshold_sens90_val"] == pytest.approx(best["thresholds"]["tile"]["sens90"])
    for level in ("slide", "patient"):
        frozen = best["thresholds"][level]
        assert table[f"threshold_{level}_youden_val"] == pytest.approx(frozen["youden"])
        assert table[f"test_{level}_youden_threshold"] == pytest.approx(frozen["youden"])
    # The best epoch's val AUC is what the per-epoch history says it was.
    assert best["best_val_auc"] == max(h["val_auc"] for h in _history(smoke_run))


def _history(smoke_run: SmokeRun) -> list[dict]:
    return checkpoint.load(smoke_run.run_dir / "checkpoints" / "last.pt")["history"]


def test_artifacts(mlflow_run) -> None:
    client, run = mlflow_run
    rid = run.info.run_id
    top = {a.path for a in client.list_artifacts(rid)}
    assert {"config_resolved.yaml", "hydra", "reports", "checkpoints"} <= top
    assert {"hydra/config.yaml", "hydra/overrides.yaml"} <= {
        a.path for a in client.list_artifacts(rid, "hydra")
    }
    assert {"reports/best.json", "reports/summary.md", "reports/roc.png"} <= {
        a.path for a in client.list_artifacts(rid, "reports")
    }
    local = Path(client.download_artifacts(rid, "checkpoints/best.pt"))
    state = checkpoint.load(local)
    assert state["model_name"] == "test_resnet" and "model" in state


def test_best_checkpoint_reproduces_the_test_auc(smoke_run: SmokeRun) -> None:
    """Reload best.pt in a fresh model and score test: the logged AUC must come back."""
    from her2exp import data, metrics, models
    from her2exp.engine import Preprocess, score

    cfg = compose_train(["experiment=smoke"], smoke_run.run_dir)
    best = json.loads((smoke_run.run_dir / "reports" / "best.json").read_text())
    model = models.build(cfg.model, torch.device("cpu"))
    state = checkpoint.load(smoke_run.run_dir / "checkpoints" / "best.pt")
    model.load_state_dict(state["model"])
    run_cfg = OmegaConf.create(state["config"])  # data.mean/std as resolved from the model
    bundle = data.build(cfg.data, cfg.seed)
    assert bundle.fingerprint == best["data_fingerprint"]
    loader = data.eval_loader(
        data.make_dataset(bundle, "test", cfg.data, cfg.seed), cfg.data, torch.device("cpu")
    )
    preprocess = Preprocess(torch.device("cpu"), tuple(run_cfg.data.mean), tuple(run_cfg.data.std))
    scores = score(model, loader, preprocess)
    assert metrics.auc(scores.labels, scores.probs) == pytest.approx(best["test_auc"], abs=1e-9)


def _train(tmp: Path, *extra: str) -> dict:
    cfg = compose_train(["experiment=smoke", "tracking=off", *extra], tmp)
    return train_mod.train(cfg)


def _comparable(summary: dict) -> dict:
    """The numbers two equivalent runs must share, from train()'s summary or a best.json."""
    flat = (
        summary["test_evaluation"].as_flat_dict("test_")
        if "test_evaluation" in summary
        else summary
    )
    keys = ("best_epoch", "best_val_auc", "threshold_youden_val")
    tests = (
        "test_auc",
        "test_youden_tp",
        "test_youden_fn",
        "test_youden_fp",
        "test_youden_tn",
        "test_sens90_threshold",
    )
    return {k: summary[k] for k in keys} | {k: flat[k] for k in tests}


@pytest.fixture(scope="module")
def reference_3_epochs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _train(tmp_path_factory.mktemp("ref"), "trainer.epochs=3")


def test_same_seed_gives_identical_metrics(tmp_path: Path, reference_3_epochs: dict) -> None:
    again = _train(tmp_path, "trainer.epochs=3")
    assert _comparable(again) == _comparable(reference_3_epochs)


def test_tracking_does_not_change_the_science(smoke_run: SmokeRun, tmp_path: Path) -> None:
    """The CLI run logged to MLflow; the same config in-process without tracking agrees."""
    best = json.loads((smoke_run.run_dir / "reports" / "best.json").read_text())
    assert _comparable(_train(tmp_path)) == _comparable(best)


def test_other_seed_differs(tmp_path: Path, reference_3_epochs: dict) -> None:
    other = _train(tmp_path, "trainer.epochs=3", "seed=7")
    assert _comparable(other) != _comparable(reference_3_epochs)


def test_resume_equals_uninterrupted(tmp_path: Path, reference_3_epochs: dict) -> None:
    first = _train(tmp_path / "a", "trainer.epochs=3", "trainer.stop_after_epoch=1")
    assert first["interrupted"] and first["last_epoch"] == 1
    last = tmp_path / "a" / "checkpoints" / "last.pt"
    assert checkpoint.load(last)["epoch"] == 1
    resumed = _train(tmp_path / "b", "trainer.epochs=3", f"trainer.resume={last}")
    assert _comparable(resumed) == _comparable(reference_3_epochs)


def test_resume_auto_continues_in_the_same_run_dir(
    tmp_path: Path, reference_3_epochs: dict
) -> None:
    _train(tmp_path, "trainer.epochs=3", "trainer.stop_after_epoch=2")
    resumed = _train(tmp_path, "trainer.epochs=3", "trainer.resume=auto")
    assert _comparable(resumed) == _comparable(reference_3_epochs)


def test_non_finite_loss_stops_with_epoch_and_step(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"at epoch 1, step \d+"):
        _train(
            tmp_path, "trainer.lr=1e30", "trainer.grad_clip_norm=null", "trainer.warmup_epochs=0"
        )
    leftovers = (
        list((tmp_path / "checkpoints").glob(".*tmp"))
        if (tmp_path / "checkpoints").exists()
        else []
    )
    assert leftovers == []


def test_loader_workers_do_not_change_the_science(tmp_path: Path, reference_3_epochs: dict) -> None:
    """Augmentation is keyed by (seed, epoch, index), so worker processes replay it exactly."""
    out = _train(
        tmp_path,
        "trainer.epochs=3",
        "data.num_workers=2",
        "data.prefetch_factor=2",
        "data.persistent_workers=true",
    )
    assert _comparable(out) == _comparable(reference_3_epochs)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_explicit_amp_modes_run_on_the_cpu(tmp_path: Path, amp: str) -> None:
    """fp16 runs a GradScaler with clipping and a skipped non-finite step (the command of issue
    14, part 2, item 1: the step after the skip used to raise in unscale_)."""
    skip = ["trainer.on_nonfinite=skip", "trainer.debug_nan_at_step=1"] if amp == "fp16" else []
    out = _train(tmp_path, f"trainer.amp={amp}", "trainer.epochs=1", "data.n_patients=12", *skip)
    assert math.isfinite(out["test_auc"])
    assert out["nonfinite_steps_skipped"] == (1 if amp == "fp16" else 0)
