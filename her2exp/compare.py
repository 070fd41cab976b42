"""`her2exp-compare` / `make compare`: the runs of an experiment or a sweep, best first.

    her2exp-compare [experiment=her2exp] [sweep=latest|<parent run id>|all] [out=compare.csv]

Columns: run id, the parameters that differ between the listed runs, val AUC with its CI, test
AUC, sensitivity/specificity at the frozen val-chosen threshold, epochs and minutes. Read with
`mlflow.search_runs` (pandas), written as CSV.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from her2exp import tracking
from her2exp.reports import atomic_write_text

DEFAULTS = {
    "experiment": "her2exp",
    "sweep": "latest",
    "out": "compare.csv",
    "tracking": {"uri": "sqlite:///mlflow.db"},
}
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
    import mlflow

    mlflow.set_tracking_uri(tracking.resolve_uri(uri))
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"her2exp: no experiment {experiment!r} in {uri}")
    runs = mlflow.search_runs([exp.experiment_id])
    if runs.empty:
        return runs
    parent_col = "tags.mlflow.parentRunId"
    if sweep != "all":
        if sweep == "latest":
            parents = runs[runs.get("tags.sweep", pd.Series(index=runs.index)) == "parent"]
            if parents.empty:
                raise SystemExit("her2exp: no sweep in this experiment; use sweep=all")
            sweep = parents.sort_values("start_time").iloc[-1]["run_id"]
        runs = runs[runs.get(parent_col, pd.Series(index=runs.index)) == sweep]
    runs = runs[runs.get("tags.sweep", pd.Series(index=runs.index)) != "parent"]
    params = [c for c in runs.columns if c.startswith("params.")
              and c[len("params."):] not in IGNORED_PARAMS]  # fmt: skip
    differing = [c for c in params if runs[c].nunique(dropna=False) > 1]
    table = pd.DataFrame({"run_id": runs["run_id"], "status": runs["status"]})
    for c in differing:
        table[c[len("params.") :]] = runs[c]
    for metric, name in METRICS.items():
        table[name] = runs.get(f"metrics.{metric}")
    table["minutes"] = (runs["end_time"] - runs["start_time"]).dt.total_seconds() / 60
    return table.sort_values("val_auc", ascending=False, na_position="last").reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    opts = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(sys.argv[1:] if argv is None else argv))
    table = compare(opts.experiment, str(opts.sweep), opts.tracking.uri)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    atomic_write_text(Path(opts.out), table.to_csv(index=False))
    print(f"her2exp: {len(table)} runs, best first -> {opts.out}")


if __name__ == "__main__":
    main()
