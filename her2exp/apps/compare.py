"""The runs of an experiment or a sweep, best first (the library part of `her2exp-compare`,
her2exp/cli/compare.py; `make compare`).

Columns: run id, the parameters that differ between the listed runs, each run's decision level
and operating point (`evaluation.decision_level`, `evaluation.operating_point`), val AUC with its
CI and test AUC (tile level: what training selects on), the test AUC at the run's decision level,
test sensitivity/specificity at the run's own frozen point (its level and operating point: the
numbers the clinic would see, and what `her2exp-promote` checks), best epoch and minutes. A run
that did not log a metric at its point has an empty cell there, never another level's or point's
value. Read through `tracking.sweep.experiment_runs` (an MlflowClient for the given store, as a
pandas table) and written as CSV at full precision; `format_table` is the printed form.

`leaderboard=true`: the sweep parent's leaderboard (backbone x protocol, mean +- sd over the
seeds; her2exp/evaluation/crossval.py computes it from the children's files when the multirun ends and
logs it to the parent as `cv/leaderboard.csv`).
"""

from __future__ import annotations

import math
import tempfile
from typing import Any

import pandas as pd

from her2exp.config import ConfigError
from her2exp.tracking.registry import decision_metric
from her2exp.tracking.schema import level_infix
from her2exp.tracking.sweep import client_for, download_artifact, experiment_runs

#: Logged metric -> column, the same for every run (tile level: the selection metric).
METRICS = {
    "best_val_auc": "val_auc",
    "final_val_auc_low": "val_auc_low",
    "final_val_auc_high": "val_auc_high",
    "test_auc": "test_auc",
}
#: Column -> the metric's name after `test_[<level>_]` at the run's own decision point.
AT_DECISION = {
    "test_level_auc": "auc",
    "test_sens": "{op}_sensitivity",
    "test_spec": "{op}_specificity",
}
DECISION_PARAMS = ("evaluation.decision_level", "evaluation.operating_point")
# Never a differing-parameter column: bookkeeping, or shown in a column of its own.
IGNORED_PARAMS = {"output_dir", "tracking.run_name", *DECISION_PARAMS}
#: Printed (not CSV) precision: counts as integers, minutes to 0.01, the rest to 4 places.
INTEGER_COLUMNS = ("best_epoch",)
PRINT_FORMATS = {"minutes": "{:.2f}"}
EMPTY = "-"


def _search(experiment: str, uri: str) -> tuple[Any, pd.DataFrame]:
    """(a client of the store `uri`, the experiment's runs as a table); a look-up never creates
    a store, and no global tracking URI is set."""
    client = client_for(uri)
    return client, experiment_runs(client, experiment, uri)


def parent_run(runs: pd.DataFrame, sweep: str, experiment: str) -> str:
    """The sweep parent's run id: the latest parent for sweep=latest, else `sweep` itself, which
    must be a run of the experiment with child runs (a mistyped id would list nothing)."""
    if sweep != "latest":
        ids = runs["run_id"] if "run_id" in runs else pd.Series(dtype=str)
        if not (ids == sweep).any():
            raise ConfigError(
                f"sweep={sweep}: no such run in experiment {experiment!r}; give latest, all, or "
                "the run id of a sweep's parent"
            )
        children = runs.get("tags.mlflow.parentRunId", pd.Series(index=runs.index))
        if not (children == sweep).any():
            raise ConfigError(
                f"sweep={sweep}: run has no child runs in experiment {experiment!r}, so it is not "
                "a sweep's parent; give latest, all, or the run id of a sweep's parent"
            )
        return sweep
    parents = runs[runs.get("tags.sweep", pd.Series(index=runs.index)) == "parent"]
    if parents.empty:
        raise ConfigError(f"sweep=latest: no sweep in experiment {experiment!r}; use sweep=all")
    return str(parents.sort_values("start_time").iloc[-1]["run_id"])


def leaderboard(experiment: str, sweep: str, uri: str) -> pd.DataFrame:
    """The leaderboard a sweep parent holds (sweep: latest | a parent run id), best first."""
    if sweep == "all":
        raise ConfigError("sweep=all: a leaderboard is one sweep's; give latest or a parent run id")
    client, runs = _search(experiment, uri)
    parent = parent_run(runs, sweep, experiment)
    row = runs[runs["run_id"] == parent] if "run_id" in runs else runs
    kind = row["tags.sweep.kind"].iloc[0] if "tags.sweep.kind" in row and len(row) else None
    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifact(client, parent, "cv/leaderboard.csv", tmp)
        if path is None:
            raise ConfigError(
                f"sweep={sweep}: run {parent} holds no leaderboard (sweep.kind={kind}); a "
                "leaderboard is a sweep of groups repeated over seeds, e.g. her2exp-train -m "
                "experiment=fm_probe model=uni,h_optimus_0 probe=linear,knn"
            )
        return pd.read_csv(path)


def compare(experiment: str, sweep: str, uri: str) -> pd.DataFrame:
    """One row per run (sweep: latest | all | a parent run id), sorted by val AUC."""
    _, runs = _search(experiment, uri)
    if runs.empty:
        if sweep not in ("all", "latest"):
            parent_run(runs, sweep, experiment)  # refused: no run has that id
        return runs
    parent_col = "tags.mlflow.parentRunId"
    if sweep != "all":
        sweep = parent_run(runs, sweep, experiment)
        runs = runs[runs.get(parent_col, pd.Series(index=runs.index)) == sweep]
    runs = runs[runs.get("tags.sweep", pd.Series(index=runs.index)) != "parent"]
    params = [
        c
        for c in runs.columns
        if c.startswith("params.") and c[len("params.") :] not in IGNORED_PARAMS
    ]
    differing = [c for c in params if runs[c].nunique(dropna=False) > 1]
    table = pd.DataFrame({"run_id": runs["run_id"], "status": runs["status"]})
    for c in differing:
        table[c[len("params.") :]] = runs[c]
    at_decision = decision_columns(runs)
    table[["decision_level", "operating_point"]] = at_decision[
        ["decision_level", "operating_point"]
    ]
    for metric, name in METRICS.items():
        table[name] = _metric(runs, metric)
    for name in AT_DECISION:
        table[name] = at_decision[name]
    table["best_epoch"] = _metric(runs, "best_epoch").round().astype("Int64")
    table["minutes"] = (runs["end_time"] - runs["start_time"]).dt.total_seconds() / 60
    return table.sort_values("val_auc", ascending=False, na_position="last").reset_index(drop=True)


def _metric(runs: pd.DataFrame, name: str) -> pd.Series:
    """The logged metric `name` of each run, NaN where a run did not log it."""
    column = runs.get(f"metrics.{name}")
    return pd.Series(math.nan, index=runs.index) if column is None else column.astype(float)


def decision_columns(runs: pd.DataFrame) -> pd.DataFrame:
    """Each run's decision level and operating point (its logged params; a run from before them:
    evaluation's defaults, as `her2exp-eval` and `her2exp-promote` read it) and the test metrics
    AT_DECISION logged at that point. A metric the run did not log there is NaN: another level's
    value in its place would be a number the run never decided on."""
    rows = []
    for _, run in runs.iterrows():
        params = {
            p: run[f"params.{p}"]
            for p in DECISION_PARAMS
            if isinstance(run.get(f"params.{p}"), str)
        }
        level, op, _ = decision_metric(params)
        prefix = f"test_{level_infix(level)}"
        row: dict[str, Any] = {"decision_level": level, "operating_point": op}
        for column, name in AT_DECISION.items():
            value = run.get(f"metrics.{prefix}{name.format(op=op)}")
            row[column] = math.nan if value is None or pd.isna(value) else float(value)
        rows.append(row)
    columns = ["decision_level", "operating_point", *AT_DECISION]
    return pd.DataFrame(rows, index=runs.index, columns=columns)


def format_table(table: pd.DataFrame) -> str:
    """The table as `her2exp-compare` prints it: integer columns as integers (best epoch 2, not
    2.0000), metrics to 4 places, minutes to 0.01, a value not logged as `-` (the CSV keeps full
    precision and leaves such a cell empty)."""

    def cell(value: Any, column: str) -> str:
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            return EMPTY
        if column in INTEGER_COLUMNS:
            return str(int(value))
        if isinstance(value, float):
            return PRINT_FORMATS.get(column, "{:.4f}").format(value)
        return str(value)

    shown = pd.DataFrame({c: [cell(v, c) for v in table[c]] for c in table.columns})
    return shown.to_string(index=False)
