"""Experiment tracking: MLflow on rank 0, a no-op elsewhere (docs/architecture.md, "Tracking").

| module            | holds                                                                  |
|-------------------|------------------------------------------------------------------------|
| `base`            | the `Tracker` interface (also the no-op tracker), `build`              |
| `audit`           | audit tags: git, pip freeze, environment, run tags (pure, no MLflow)   |
| `store`           | the store's URI, reachability, transient errors and retries           |
| `mlflow_tracker`  | `MlflowTracker`: one run per job, continued by resumed attempts        |
| `offline`         | calls buffered in the run directory while the server is away; replay  |
| `sweep`           | Hydra multiruns as an MLflow parent run with the jobs as children     |

`import mlflow` happens only when an `MlflowTracker` is made or a replay runs: never with
`tracking=off` or on ranks other than 0.
"""

from her2exp.tracking.audit import (
    REPO_DIR,
    environment_tags,
    flatten,
    git_diff,
    git_info,
    pip_freeze,
    run_tags,
)
from her2exp.tracking.base import Tracker, TrackingUnavailable, build
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
    check_reachable,
    download_from_run,
    is_transient,
    require_store,
    resolve_uri,
    sqlite_file,
    store_problem,
    with_retries,
)
from her2exp.tracking.sweep import (
    SWEEP_ENV,
    MlflowSweepCallback,
    export_sweep_context,
    sweep_context,
)

__all__ = [
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
