"""Test-time augmentation (evaluation.tta=d4) and recalibration (evaluation.calibration=
temperature): the view loop against the 8 views scored one by one, the temperature fit against
the NLL it minimises, and one smoke run with both, end to end through best.pt and her2exp-eval."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import open_dict
from scipy.special import expit, logit
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn

from conftest import compose_train
from her2exp import engine, evaluation, metrics
from her2exp.cli.common import compose
from her2exp.config import ConfigError
from her2exp.config.commands import validate_only
from her2exp.core import checkpoint
from her2exp.evaluation import ScoredSplit, Scorer, report_cohorts
from her2exp.tracking import Tracker
from her2exp.training import run as train_mod


class _Toy(nn.Module):
    """A model that sees where each pixel is (a dense layer over them), so the 8 views differ."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * 3.0


def _toy_batch(n: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n) % 2


def test_d4_tta_is_the_mean_of_the_eight_views_scored_one_by_one() -> None:
    x, y = _toy_batch()
    model, pre = _Toy().eval(), engine.Preprocess(torch.device("cpu"))

    def loader(images: torch.Tensor) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, y), batch_size=5)

    # The D4 group written out on the numpy images, independently of engine.tta_views.
    arr = x.numpy()
    views = [np.rot90(arr, k, axes=(2, 3)) for k in range(4)]
    views += [v[..., ::-1] for v in views]
    one_by_one = [engine.score(model, loader(torch.from_numpy(v.copy())), pre).probs for v in views]
    assert len({tuple(np.round(p, 6)) for p in one_by_one}) == 8  # the views really differ
    expected = np.mean(one_by_one, axis=0)
    d4 = engine.score(model, loader(x), pre, tta="d4")
    np.testing.assert_allclose(d4.probs, expected, rtol=0, atol=1e-6)
    single = engine.score(model, loader(x), pre)
    np.testing.assert_allclose(single.probs, one_by_one[0], rtol=0, atol=1e-7)
    # The Scorer (predict, the served model) goes through the same view loop, then calibrates.
    frozen = {"method": "temperature", "temperature": 2}
    got = Scorer(model, torch.device("cpu"), pre, None, None, "off", "d4", frozen).probabilities(x)
    np.testing.assert_allclose(got, metrics.apply_temperature(expected, 2.0), atol=1e-6)
    with pytest.raises(ValueError, match="none or d4"):
        engine.tta_views(x, "d8")


def _overconfident(n: int = 4000, sharpen: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from q = sigmoid(z); the model reports sigmoid(sharpen * z)."""
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 1.5, n)
    labels = (rng.random(n) < expit(z)).astype(int)
    return labels, expit(sharpen * z)


def test_temperature_scaling_lowers_the_nll_of_overconfident_scores() -> None:
    labels, probs = _overconfident()
    t = metrics.fit_temperature(labels, probs)
    assert t == pytest.approx(3.0, rel=0.15)  # undoes the sharpening
    after = metrics.apply_temperature(probs, t)
    assert log_loss(labels, after) < log_loss(labels, probs) - 0.05
    assert metrics.temperature_nll(labels, probs, t) == pytest.approx(log_loss(labels, after))
    for other in (t * 0.9, t * 1.1):  # a minimum, not just an improvement
        assert metrics.temperature_nll(labels, probs, other) > metrics.temperature_nll(
            labels, probs, t
        )
    assert roc_auc_score(labels, after) == roc_auc_score(labels, probs)  # ranking unchanged
    assert metrics.calibration(labels, after).ece < metrics.calibration(labels, probs).ece
    # Under-confident scores are sharpened (T < 1); calibrated ones stay near T = 1.
    assert metrics.fit_temperature(*_overconfident(sharpen=0.5)) < 0.6
    assert metrics.fit_temperature(*_overconfident(sharpen=1.0)) == pytest.approx(1.0, abs=0.1)
    # 0 and 1 stay 0 and 1 (nothing clipped into a tie); one class cannot be fitted: T = 1.
    np.testing.assert_array_equal(metrics.apply_temperature(np.array([0.0, 1.0]), 2.0), [0, 1])
    assert metrics.fit_temperature(np.ones(5, int), np.full(5, 0.7)) == 1.0
    np.testing.assert_array_equal(metrics.apply_calibration(probs, {"method": "none"}), probs)
    np.testing.assert_array_equal(metrics.apply_calibration(probs, None), probs)
    with pytest.raises(ValueError, match="positive"):
        metrics.apply_temperature(probs, 0.0)
    with pytest.raises(ValueError, match="none or temperature"):
        metrics.apply_calibration(probs, {"method": "platt"})


class _Recording(Tracker):
    """The no-op tracker keeping what was logged (MLflow's own logging is tested elsewhere)."""

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_metrics(self, values, step=None) -> None:  # noqa: ANN001 - the base's signature
        self.logged.update(values)


def test_report_cohorts_logs_brier_and_ece_before_and_after(tmp_path: Path) -> None:
    labels, raw = _overconfident(400)
    t = metrics.fit_temperature(labels, raw)
    rows = pd.DataFrame({"label": labels, "patient_id": np.arange(400)})
    splits = [ScoredSplit(n, rows, metrics.apply_temperature(raw, t), None, raw) for n in ("val",)]
    ecfg = compose_train(["experiment=smoke", "evaluation.n_boot=0"]).evaluation
    frozen = {"method": "temperature", "temperature": t}
    thresholds = {"youden": 0.5, "sens90": 0.3, "p50": 0.5}
    tracker = _Recording()
    report_cohorts(splits, thresholds, ecfg, tmp_path, tracker, {}, 0, calibration=frozen)
    logged = tracker.logged
    assert logged["calibration_temperature"] == t
    # the uncalibrated figures are rows of reports/metrics.csv; MLflow keeps the calibrated ones
    table = pd.read_csv(tmp_path / "metrics.csv").set_index("metric")["value"]
    assert "final_val_ece_uncalibrated" not in logged
    logged = {**table.to_dict(), **logged}
    assert logged["final_val_ece_uncalibrated"] == pytest.approx(
        metrics.calibration(labels, raw).ece
    )
    assert logged["final_val_ece"] < logged["final_val_ece_uncalibrated"]
    assert logged["final_val_brier"] < logged["final_val_brier_uncalibrated"]
    summary = (tmp_path / "summary.md").read_text()
    assert f"T = {t:.4f}" in summary and "| val |" in summary


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["evaluation.tta=d8"], "evaluation.tta='d8' is not allowed (one of none, d4)"),
        (["evaluation.calibration=platt"], "evaluation.calibration='platt' is not allowed"),
        (
            [
                "model.finetune=frozen",
                "model.cache_features=true",
                "data.augment=false",
                "evaluation.tta=d4",
            ],
            "evaluation.tta='d4' is not allowed (none with model.cache_features=true",
        ),
    ],
)
def test_bad_tta_and_calibration_values_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_only("train", ["experiment=smoke", *overrides])


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One in-process smoke run with D4 TTA and temperature scaling (tracking off)."""
    run_dir = tmp_path_factory.mktemp("calibrated")
    overrides = ["experiment=smoke", "tracking=off", "evaluation.n_boot=0"]
    overrides += ["evaluation.tta=d4", "evaluation.calibration=temperature"]
    train_mod.train(compose_train(overrides, run_dir))
    return run_dir


def _eval_cfg(run_dir: Path, out: Path, *extra: str):
    cfg = compose("eval", ["tracking=off", f"checkpoint={run_dir}/checkpoints/best.pt", *extra])
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def _eval(run_dir: Path, out: Path, *extra: str) -> dict:
    return evaluation.evaluate_cohort(_eval_cfg(run_dir, out, *extra))


def test_a_calibrated_d4_run_freezes_its_temperature_and_eval_reproduces_it(
    calibrated_run: Path, tmp_path: Path
) -> None:
    state = checkpoint.load(calibrated_run / "checkpoints" / "best.pt")
    frozen = state["calibration"]
    assert frozen["method"] == "temperature" and frozen["temperature"] > 0
    t = frozen["temperature"]
    reports = calibrated_run / "reports"
    val = pd.read_csv(reports / "predictions_val.csv")
    test = pd.read_csv(reports / "predictions_test.csv")
    raw_val = expit(logit(val["prob_her2_pos"]) * t)  # undo the frozen temperature
    # T minimises the real validation NLL, and the thresholds were chosen on calibrated scores.
    assert metrics.fit_temperature(val["label"], raw_val) == pytest.approx(t, rel=1e-4)
    y, p = val["label"].to_numpy(), val["prob_her2_pos"].to_numpy()
    assert metrics.temperature_nll(y, raw_val, t) <= metrics.temperature_nll(y, raw_val, 1.0)
    assert state["thresholds"]["tile"]["youden"] == pytest.approx(metrics.youden_threshold(y, p))
    assert roc_auc_score(y, p) == pytest.approx(roc_auc_score(y, raw_val), abs=1e-12)
    best = json.loads((reports / "best.json").read_text())
    assert best["tta"] == "d4" and best["calibration"]["temperature"] == t
    assert set(best["calibration"]["uncalibrated"]) == {"val", "test"}
    summary = (reports / "summary.md").read_text()
    assert "Recalibration: temperature scaling" in summary and "8 rotations and flips" in summary
    # her2exp-eval of the run's test split: the run's TTA and temperature, the same probabilities.
    again = _eval(calibrated_run, tmp_path / "a", "split=test")
    assert again["settings"].tta == "d4"
    redo = pd.read_csv(tmp_path / "a" / "reports" / "predictions_test.csv")
    np.testing.assert_allclose(redo["prob_her2_pos"], test["prob_her2_pos"], rtol=0, atol=1e-7)
    # One view instead of eight really scores differently (evaluation.score, what eval and the
    # ensemble call); the frozen calibration is not optional.
    run, settings, cohort = evaluation.prepare_evaluation(
        _eval_cfg(calibrated_run, tmp_path / "b", "split=test", "tta=none")
    )
    assert settings.tta == "none"
    scorer = evaluation.build_scorer(run, None, cohort.seed, settings.tta)
    single = evaluation.score(scorer, cohort.bundle, "test", cohort.data_cfg, cohort.seed)
    np.testing.assert_allclose(single.probs, metrics.apply_temperature(single.uncalibrated, t))
    assert np.abs(single.probs - test["prob_her2_pos"].to_numpy()).max() > 1e-4
    with pytest.raises(ConfigError, match="froze its thresholds on temperature calibrated"):
        _eval(calibrated_run, tmp_path / "c", "split=test", "evaluation.calibration=none")
    with pytest.raises(ConfigError, match=r"tta='d8' is not allowed \(null"):
        evaluation.prepare_evaluation(_eval_cfg(calibrated_run, tmp_path / "d", "tta=d8"))
