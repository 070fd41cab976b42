"""Hydra multiruns in MLflow: which sweep and job a run belongs to, the tags that make it a
child of the sweep's parent run, and the MLflow queries of a sweep: its children
(`sweep_children`, the one listing: MLflow, else the run directories; `finished_children` for an
ensemble), an artifact of a run, and an experiment's runs as a table (her2exp-compare).

The Hydra callback that opens and closes the parent run sums up the children through
`evaluation.crossval`, so it lives a floor up, in her2exp/evaluation/sweep_callback.py
(`her2exp.tracking.MlflowSweepCallback` still names it, for the .hydra configs of old runs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from her2exp.core.errors import ConfigError
from her2exp.runtime.hydra_run import HydraRun
from her2exp.tracking.store import require_store
from her2exp.tracking.sweep_model import SweepChild, children_on_disk

#: The sweep context as environment variables, for workers a job spawns (nproc_per_node > 1).
SWEEP_ENV = {
    "parent_run_id": "HER2EXP_PARENT_RUN_ID",
    "job_num": "HER2EXP_SWEEP_JOB_NUM",
    "job_overrides": "HER2EXP_SWEEP_JOB_OVERRIDES",
    "sweep_dir": "HER2EXP_SWEEP_DIR",
}


def sweep_context(hydra: HydraRun | None = None) -> dict[str, str]:
    """Parent run and job of a Hydra multirun: from Hydra in the job process (`hydra`, read at
    the command's entry; None: a command composed without Hydra), or from the environment in
    workers the job process spawned (trainer.nproc_per_node)."""
    ctx = {k: os.environ[v] for k, v in SWEEP_ENV.items() if v in os.environ}
    if hydra is not None:
        ctx.update(hydra.sweep_context())
    return ctx


def export_sweep_context(hydra: HydraRun | None = None) -> dict[str, str]:
    """Environment for spawned workers so their run joins the same sweep parent."""
    return {SWEEP_ENV[k]: v for k, v in sweep_context(hydra).items()}


def sweep_tags(ctx: dict[str, str]) -> dict[str, str]:
    """A job run's tags from its sweep context: `mlflow.parentRunId` nests it under the parent
    in the UI (across processes, unlike `nested=True`); `sweep.*` say which job it was."""
    tags = {f"sweep.{k}": ctx[k] for k in ("job_num", "job_overrides", "sweep_dir") if k in ctx}
    if "parent_run_id" in ctx:
        tags["mlflow.parentRunId"] = ctx["parent_run_id"]
    return tags


# --- a sweep's children, the one way to list them ----------------------------------------------


def client_for(uri: str) -> Any:
    """An MlflowClient for the store `uri` (refused in one line when it is not there: a look-up
    never creates a store). The global tracking URI is left alone."""
    resolved = require_store(uri, lookup=True)
    import mlflow

    return mlflow.MlflowClient(tracking_uri=resolved)


def child_runs(client: Any, parent_run_id: str, experiment_id: str | None = None) -> list[Any]:
    """Every child run of the sweep parent `parent_run_id` (any status), in job order."""
    if experiment_id is None:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return sorted(runs, key=lambda r: (int(r.data.tags.get("sweep.job_num", 0)), r.info.run_id))


def as_child(run: Any, sweep_dir: Path | None = None) -> SweepChild:
    """An MLflow child run as the sweep model's record; its run directory is
    `<sweep_dir>/<job_num>` (the sweep folder given, else its `sweep.sweep_dir` tag)."""
    tags = run.data.tags
    job = int(tags.get("sweep.job_num", -1))
    folder = sweep_dir or (Path(tags["sweep.sweep_dir"]) if "sweep.sweep_dir" in tags else None)
    run_dir = None if folder is None or job < 0 else Path(folder) / str(job)
    return SweepChild(job, run.info.run_id, dict(run.data.params), run_dir)


def finished_children(
    client: Any, parent_run_id: str, uri: str, sweep_dir: Path | None = None
) -> list[SweepChild]:
    """The sweep parent's FINISHED child runs in job order, as SweepChild records; an unknown
    parent, or one without a finished child, is refused in one line."""
    import mlflow

    try:
        parent = client.get_run(parent_run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"sweep_run_id={parent_run_id!r} not found in {uri}") from exc
    runs = child_runs(client, parent_run_id, parent.info.experiment_id)
    done = _finished(runs, sweep_dir)
    if not done:
        raise ConfigError(
            f"sweep_run_id={parent_run_id!r}: no FINISHED child run in {uri} ({len(runs)} "
            "child runs in all): not a sweep's parent run, or none of its jobs finished"
        )
    return done


def sweep_children(
    sweep_dir: Path | None, client: Any = None, parent_run_id: str | None = None, uri: str = ""
) -> list[SweepChild]:
    """The one listing of a sweep's children: from MLflow (the parent's FINISHED children, in
    job order) when a parent run is given, else from the run directories under `sweep_dir`
    (tracking off). None finished in MLflow is an empty list here, not a refusal."""
    if client is None or parent_run_id is None:
        return children_on_disk(sweep_dir) if sweep_dir is not None else []
    return _finished(child_runs(client, parent_run_id), sweep_dir)


def _finished(runs: list[Any], sweep_dir: Path | None) -> list[SweepChild]:
    """The FINISHED ones of a sweep's child runs, as the sweep model's records."""
    return [as_child(r, sweep_dir) for r in runs if r.info.status == "FINISHED"]


def download_artifact(client: Any, run_id: str, artifact: str, folder: str) -> Path | None:
    """The run's `artifact` downloaded into `folder`; None when the run has no such artifact."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return Path(client.download_artifacts(run_id, artifact, folder))
    except (mlflow.exceptions.MlflowException, OSError):
        return None


def experiment_runs(client: Any, experiment: str, uri: str) -> pd.DataFrame:
    """Every run of the experiment named `experiment` as one table (columns as
    `mlflow.search_runs` names them: run_id, status, start_time, end_time, metrics.*, params.*,
    tags.*), read through `client` so that no global tracking URI is set."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"experiment={experiment!r}: no such experiment in {uri}")
    rows, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        for r in page:
            row = {"run_id": r.info.run_id, "status": r.info.status}
            row["start_time"] = pd.to_datetime(r.info.start_time, unit="ms", utc=True)
            row["end_time"] = pd.to_datetime(r.info.end_time, unit="ms", utc=True)
            for prefix, values in (("metrics", r.data.metrics), ("params", r.data.params)):
                row.update({f"{prefix}.{k}": v for k, v in values.items()})
            row.update({f"tags.{k}": v for k, v in r.data.tags.items()})
            rows.append(row)
        token = page.token
        if not token:
            return pd.DataFrame(rows)
