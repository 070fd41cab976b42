"""The runs of an experiment or a sweep, best first (the library part of `her2exp-compare`,
her2exp/cli/compare.py; `make compare`).

Columns: run id, the parameters that differ between the listed runs, val AUC with its CI, test
AUC, sensitivity/specificity at the frozen val-chosen threshold, epochs and minutes. Read through
`tracking.sweep.experiment_runs` (an MlflowClient for the given store, as a pandas table), written
as CSV.

`leaderboard=true`: the sweep parent's leaderboard (backbone x protocol, mean +- sd over the
seeds; her2exp/evaluation/crossval.py computes it from the children's files when the multirun ends and
logs it to the parent as `cv/leaderboard.csv`).
"""

from __future__ import annotations

import tempfile
from typing import Any

import pandas as pd

from her2exp.config import ConfigError
from her2exp.tracking.sweep import client_for, download_artifact, experiment_runs

METRICS = {
    "best_val_auc": "val_auc",
    "final_val_auc_low": "val_auc_low",
    "final_val_auc_high": "val_auc_high",
    "test_auc": "test_auc",
    "test_youden_sensitivity": "test_sens",
    "test_youden_specificity": "test_spec",
    "best_epoch": "best_epoch",
}
IGNORED_PARAMS = {"output_dir", "tracking.run_name"}


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
    for metric, name in METRICS.items():
        table[name] = runs.get(f"metrics.{metric}")
    table["minutes"] = (runs["end_time"] - runs["start_time"]).dt.total_seconds() / 60
    return table.sort_values("val_auc", ascending=False, na_position="last").reset_index(drop=True)
