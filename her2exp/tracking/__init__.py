"""Experiment tracking: every MLflow call of her2exp (docs/architecture.md, "Tracking").

Owns the MLflow side of a run: the tracker a trainer or an eval talks to (MLflow on rank 0, a
no-op elsewhere), the audit tags, the store and its retries, the offline queue and its replay,
the model registry, and the tags that make a sweep's jobs children of its parent run.

May import the floors below it (runtime, models, reports, metrics, stain, slides, config,
core; today it needs only core and config) and its own modules; never data, engine,
evaluation, training, apps or cli. The one exception is the lazy alias `MlflowSweepCallback`
below (pyproject.toml's `floors` contract lists it).

| module            | holds                                                                  |
|-------------------|------------------------------------------------------------------------|
| `base`            | the `Tracker` interface (also the no-op tracker), `TrackingUnavailable` |
| `factory`         | `build`: the tracker for this process                                   |
| `audit`           | audit tags: git, pip freeze, environment, run tags (pure, no MLflow)   |
| `schema`          | what a run shows in MLflow: metrics kept (`headline`), tags, artifacts, |
|                   | the experiment's kind; docs/reference/mlflow.md (pure, no MLflow)      |
| `store`           | the store's URI, reachability, transient errors and retries           |
| `mlflow_tracker`  | `MlflowTracker`: one run per job, continued by resumed attempts        |
| `offline`         | calls buffered in the run directory while the server is away; replay  |
| `registry`        | registered models: URIs, aliases, promotion checks                     |
| `sweep_model`     | a sweep's child record, its one kind (cv/repeat/leaderboard/plain), why |
|                   | it is no ensemble; its children from the run directories (pure)        |
| `sweep`           | a Hydra multirun's context, its jobs' child-run tags, the one listing  |
|                   | of its children (MLflow, else the run directories), experiment runs   |

Within the package the modules form a DAG: schema <- store, base <- store <- offline <- mlflow_tracker <-
factory, store <- registry, audit and offline <- sweep_model <- sweep <- mlflow_tracker; none
imports the package.

`import mlflow` happens only when an `MlflowTracker` is made, a replay runs or a sweep's runs
are read: never with `tracking=off` or on ranks other than 0.
"""

from typing import Any

from her2exp.tracking.audit import (
    REPO_DIR,
    environment_tags,
    flatten,
    git_diff,
    git_info,
    pip_freeze,
    run_tags,
)
from her2exp.tracking.base import Tracker, TrackingUnavailable
from her2exp.tracking.factory import build
from her2exp.tracking.mlflow_tracker import MlflowTracker
from her2exp.tracking.offline import (
    BUFFER_FILE,
    MODEL_DIR,
    RUN_FILE,
    DeferredLog,
    OfflineQueue,
    describe_deferred,
    read_run_file,
    replay,
    sync,
)
from her2exp.tracking.store import (
    add_to_run,
    check_reachable,
    download_from_run,
    is_transient,
    require_store,
    resolve_uri,
    sqlite_file,
    store_problem,
    with_retries,
)
from her2exp.tracking.sweep import SWEEP_ENV, export_sweep_context, sweep_context

__all__ = [
    "add_to_run",
    "download_from_run",
    "BUFFER_FILE",
    "MODEL_DIR",
    "REPO_DIR",
    "RUN_FILE",
    "SWEEP_ENV",
    "DeferredLog",
    "MlflowSweepCallback",
    "MlflowTracker",
    "OfflineQueue",
    "Tracker",
    "TrackingUnavailable",
    "build",
    "check_reachable",
    "describe_deferred",
    "environment_tags",
    "export_sweep_context",
    "flatten",
    "git_diff",
    "git_info",
    "is_transient",
    "pip_freeze",
    "read_run_file",
    "replay",
    "require_store",
    "resolve_uri",
    "run_tags",
    "sqlite_file",
    "store_problem",
    "sweep_context",
    "sync",
    "with_retries",
]


def __getattr__(name: str) -> Any:
    """`her2exp.tracking.MlflowSweepCallback`: the Hydra callback's path before it moved to
    her2exp/evaluation/sweep_callback.py, kept because the saved .hydra configs of earlier runs
    name it. Imported lazily, on first use: tracking sits below evaluation, and importing
    tracking must not import evaluation (the one exemption in the `floors` contract)."""
    if name == "MlflowSweepCallback":
        from her2exp.evaluation.sweep_callback import MlflowSweepCallback

        return MlflowSweepCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
