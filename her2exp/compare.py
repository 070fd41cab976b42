"""The runs of an experiment or a sweep, best first (the library part of `her2exp-compare`,
her2exp/cli/compare.py; `make compare`).

Columns: run id, the parameters that differ between the listed runs, val AUC with its CI, test
AUC, sensitivity/specificity at the frozen val-chosen threshold, epochs and minutes. Read with
`mlflow.search_runs` (pandas), written as CSV.
"""

from __future__ import annotations

import pandas as pd

from her2exp import tracking
from her2exp.config import ConfigError

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


def compare(experiment: str, sweep: str, uri: str) -> pd.DataFrame:
    """One row per run (sweep: latest | all | a parent run id), sorted by val AUC."""
    resolved = tracking.require_store(uri, lookup=True)  # a look-up never creates a store
    import mlflow

    mlflow.set_tracking_uri(resolved)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"experiment={experiment!r}: no such experiment in {uri}")
    runs = mlflow.search_runs([exp.experiment_id])
    if runs.empty:
        return runs
    parent_col = "tags.mlflow.parentRunId"
    if sweep != "all":
        if sweep == "latest":
            parents = runs[runs.get("tags.sweep", pd.Series(index=runs.index)) == "parent"]
            if parents.empty:
                raise ConfigError(
                    f"sweep=latest: no sweep in experiment {experiment!r}; use sweep=all"
                )
            sweep = parents.sort_values("start_time").iloc[-1]["run_id"]
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
