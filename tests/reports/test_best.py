"""RunSummary: best.json typed, read back and written back unchanged (her2exp/reports/best.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from conftest import SmokeRun
from her2exp.reports.best import RunSummary, write_best_json
from her2exp.runtime.rundir import RunDir

#: What a best.json written before the feature cache, MIL, TTA, calibration and the levels held.
OLD_KEYS = ("model", "best_epoch", "best_val_auc", "seed", "git_commit", "val_auc", "test_auc")


def test_a_trained_runs_best_json_round_trips_field_for_field(
    smoke_run: SmokeRun, tmp_path: Path
) -> None:
    source = RunDir(smoke_run.run_dir).best_json
    raw = json.loads(source.read_text())
    summary = RunSummary.read(source)
    fields = {f.name for f in dataclasses.fields(RunSummary)} - {"metrics", "extra", "keys"}
    for name in fields:  # every field is the file's value, or None where the run sets none
        assert getattr(summary, name) == raw.get(name), name
    # what training always writes is typed, not left in the untyped rest
    for name in ("model", "best_epoch", "best_val_auc", "mlflow_run_id", "thresholds", "splits"):
        assert name in raw and name not in summary.metrics and name not in summary.extra
    assert summary.best_epoch == raw["best_epoch"] and isinstance(summary.best_epoch, int)
    assert summary.mlflow_run_id == smoke_run.run_id
    assert summary.metrics["test_auc"] == raw["test_auc"]
    assert set(raw) == fields & set(raw) | set(summary.metrics) | set(summary.extra)
    written = summary.write(tmp_path / "best.json")
    assert written.read_text() == source.read_text()  # the same keys, values and order


def test_an_older_best_json_without_the_newer_keys_reads(tmp_path: Path) -> None:
    path = tmp_path / "best.json"
    old = dict(zip(OLD_KEYS, ("resnet18", 3, 0.91, 7, "abc", 0.91, 0.88), strict=True))
    path.write_text(json.dumps(old))
    summary = RunSummary.read(path)
    assert (summary.model, summary.best_epoch, summary.seed) == ("resnet18", 3, 7)
    assert summary.thresholds is None and summary.splits is None and summary.mil is None
    assert summary.metrics == {"val_auc": 0.91, "test_auc": 0.88}
    assert summary.to_dict() == old  # no key invented for what the old file lacks


def test_the_writer_makes_strict_json_and_keeps_nulls_the_file_had(tmp_path: Path) -> None:
    """NaN becomes null; a field set to None that the file had (an untracked run's
    mlflow_run_id) stays, as readers look for it."""
    summary = RunSummary.from_dict({"mlflow_run_id": None, "val_auc": float("nan")})
    summary.seed = 5  # set after reading: written after the file's keys
    text = write_best_json(tmp_path / "best.json", summary).read_text()
    assert json.loads(text) == {"mlflow_run_id": None, "val_auc": None, "seed": 5}
    assert list(json.loads(text)) == ["mlflow_run_id", "val_auc", "seed"]
