"""`her2exp-compare` shows each run at its own decision point (issue 32): the run's decision level
and operating point as columns, its test sensitivity/specificity and AUC at that level and point
(an empty cell where the run did not log them, never the tile Youden numbers in their place),
best_epoch printed as an integer, and the CSV at full precision.

In-process on a copy of the session's smoke run store (a tile/youden run), beside runs logged
through the MLflow client with the smoke run's own params and metrics but another decision point:
no training run decides at the slide level in the session's fixtures.
"""

from __future__ import annotations

import math
import sqlite3
from contextlib import closing
from pathlib import Path

import pandas as pd
import pytest

from conftest import SmokeRun, copy_store


def log_like(
    client, source, full: dict[str, float], level: str, op: str, drop: str | None = None
) -> str:
    """A finished run with `source`'s params and metrics (`full`: every number of its
    evaluation, as a run deciding at another level logs that level's), deciding at `level`/`op`;
    metrics whose name starts with `drop` left out (a run that never logged that level)."""
    from mlflow.entities import Metric, Param

    run = client.create_run(source.info.experiment_id)
    decision = {"evaluation.decision_level": level, "evaluation.operating_point": op}
    params = [Param(k, v) for k, v in (source.data.params | decision).items()]
    keep = {k: v for k, v in full.items() if not (drop and k.startswith(drop))}
    metrics = [Metric(k, v, 0, 0) for k, v in keep.items()]
    for i in range(0, len(params), 100):  # MLflow's batch limits
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run.info.run_id, metrics=metrics[i : i + 1000])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_compare_shows_each_run_at_its_own_decision_point(
    smoke_run: SmokeRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import mlflow

    db = copy_store(Path(smoke_run.uri[len("sqlite:///") :]), tmp_path / "mlflow.db")
    with closing(sqlite3.connect(db)) as con, con:  # compare's default experiment (experiment=
        con.execute("UPDATE experiments SET name = 'her2exp' WHERE name = 'smoke'")  # is a group)
    uri = f"sqlite:///{db}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    smoke = client.get_run(smoke_run.run_id)
    # The smoke run decides at the tile level; its other levels are rows of reports/metrics.csv.
    rows = pd.read_csv(smoke_run.run_dir / "reports" / "metrics.csv")
    m = dict(zip(rows["metric"], rows["value"], strict=True)) | smoke.data.metrics
    slide = log_like(client, smoke, m, "slide", "sens90")
    patient = log_like(client, smoke, m, "patient", "p50", drop="test_patient_")

    from her2exp.cli.compare import main

    out = tmp_path / "compare.csv"
    monkeypatch.setattr("sys.argv", ["her2exp-compare", "sweep=all", f"tracking.uri={uri}",
                                     f"out={out}"])  # fmt: skip
    main()
    printed = capsys.readouterr().out.splitlines()
    table = pd.read_csv(out).set_index("run_id")

    # Each run's own level and point, and the metrics logged there.
    decided = ["decision_level", "operating_point", "test_level_auc", "test_sens", "test_spec"]
    assert table.loc[smoke_run.run_id, decided].tolist() == ["tile", "youden", m["test_auc"],
        m["test_youden_sensitivity"], m["test_youden_specificity"]]  # fmt: skip
    assert table.loc[slide, decided].tolist() == ["slide", "sens90", m["test_slide_auc"],
                        m["test_slide_sens90_sensitivity"], m["test_slide_sens90_specificity"]]  # fmt: skip
    # A run that never logged its level: empty cells, though its tile Youden numbers are there.
    missing = table.loc[patient, ["test_level_auc", "test_sens", "test_spec"]].tolist()
    assert all(math.isnan(v) for v in missing), missing
    assert table.loc[patient, "test_auc"] == m["test_auc"]
    # The CSV keeps full precision and the columns it had; best_epoch is an integer.
    assert table.loc[slide, "val_auc"] == m["best_val_auc"]
    assert table["best_epoch"].dtype == "int64"
    assert {"status", "val_auc_low", "val_auc_high", "test_auc", "minutes"} <= set(table.columns)

    # The printed table: the level and point columns, best_epoch as an integer, metrics to 4
    # places, `-` for what a run did not log.
    header = printed[0].split()
    assert header[:4] == ["run_id", "status", "decision_level", "operating_point"], header
    rows = {line.split()[0]: dict(zip(header, line.split(), strict=True)) for line in printed[1:-1]}
    epoch = str(int(m["best_epoch"]))
    assert [rows[r]["best_epoch"] for r in (smoke_run.run_id, slide, patient)] == [epoch] * 3
    assert rows[slide]["decision_level"] == "slide" and rows[slide]["operating_point"] == "sens90"
    assert rows[slide]["test_sens"] == f"{m['test_slide_sens90_sensitivity']:.4f}"
    assert [rows[patient][c] for c in ("test_level_auc", "test_sens", "test_spec")] == ["-"] * 3
    assert printed[-1] == f"her2exp: 3 runs, best first -> {out}"
