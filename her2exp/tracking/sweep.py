"""Hydra multiruns in MLflow: one parent run per sweep, each job's run its child.

`conf/hydra/default.yaml` names the callback as `her2exp.tracking.MlflowSweepCallback`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from her2exp.tracking.audit import command_line, git_info
from her2exp.tracking.store import experiment_id, with_retries

if TYPE_CHECKING:
    from her2exp.crossval import SweepResult
    from her2exp.tracking.mlflow_tracker import MlflowTracker

log = logging.getLogger(__name__)

#: The sweep context as environment variables, for workers a job spawns (nproc_per_node > 1).
SWEEP_ENV = {
    "parent_run_id": "HER2EXP_PARENT_RUN_ID",
    "job_num": "HER2EXP_SWEEP_JOB_NUM",
    "job_overrides": "HER2EXP_SWEEP_JOB_OVERRIDES",
    "sweep_dir": "HER2EXP_SWEEP_DIR",
}


def sweep_context() -> dict[str, str]:
    """Parent run and job of a Hydra multirun: from Hydra in the job process, or from the
    environment in workers the job process spawned (trainer.nproc_per_node)."""
    ctx = {k: os.environ[v] for k, v in SWEEP_ENV.items() if v in os.environ}
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            ctx["job_num"] = str(hc.job.num)
            ctx["job_overrides"] = " ".join(hc.overrides.task)
            ctx["sweep_dir"] = str(hc.sweep.dir)
    except ValueError:
        pass
    return ctx


def export_sweep_context() -> dict[str, str]:
    """Environment for spawned workers so their run joins the same sweep parent."""
    return {SWEEP_ENV[k]: v for k, v in sweep_context().items()}


def sweep_tags(ctx: dict[str, str]) -> dict[str, str]:
    """A job run's tags from its sweep context: `mlflow.parentRunId` nests it under the parent
    in the UI (across processes, unlike `nested=True`); `sweep.*` say which job it was."""
    tags = {f"sweep.{k}": ctx[k] for k in ("job_num", "job_overrides", "sweep_dir") if k in ctx}
    if "parent_run_id" in ctx:
        tags["mlflow.parentRunId"] = ctx["parent_run_id"]
    return tags


class MlflowSweepCallback(Callback):
    """Hydra callback: one MLflow parent run per multirun, the jobs' runs as its children.

    Creating the parent in `on_multirun_start` also creates a fresh SQLite store once, before
    jobs fan out (concurrent first use of one SQLite store fails with migration errors). Jobs
    find the parent through HER2EXP_PARENT_RUN_ID (inherited by launched processes) and attach
    with the `mlflow.parentRunId` tag.
    """

    def __init__(self) -> None:
        self.tracker: MlflowTracker | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.tracking.backend != "mlflow":
            return
        from her2exp.tracking.mlflow_tracker import MlflowTracker

        hc = config.hydra  # HydraConfig is not set yet in on_multirun_start
        self.tracker = MlflowTracker(config.tracking)
        client = self.tracker.client
        sweep_dir = Path(str(hc.sweep.dir))
        tags = {
            "sweep": "parent",
            "sweeper": str(hc.runtime.choices.get("hydra/sweeper", "basic")),
            "sweep_dir": str(sweep_dir.resolve()),
            "sweep_overrides": " ".join(hc.overrides.task),
            "command": command_line(),
            **git_info(),
        }
        exp_id = with_retries(experiment_id, client, config.tracking, self.tracker.uri)
        run = with_retries(client.create_run, exp_id, run_name=f"sweep {sweep_dir.name}", tags=tags)
        self.tracker.run_id = run.info.run_id
        os.environ[SWEEP_ENV["parent_run_id"]] = run.info.run_id
        log.info("MLflow sweep parent run %s", run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Sum up the children on the parent: job counts, the best val AUC and its run; for a
        cross-validation or repeat sweep also the pooled or spread results (`her2exp.crossval`),
        written under `<sweep_dir>/cv/` even with tracking=off (there is no parent then)."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if self.tracker is None or self.tracker.run_id is None:
            _sweep_results(sweep_dir, {})
            return
        tracker, client = self.tracker, self.tracker.client
        children = client.search_runs(
            [experiment_id(client, config.tracking, tracker.uri)],
            f"tags.mlflow.parentRunId = '{tracker.run_id}'",
        )
        scored = [r for r in children if "best_val_auc" in r.data.metrics]
        tracker.log_metrics({"n_jobs": len(children), "n_finished": len(scored)})
        if scored:
            best = max(scored, key=lambda r: r.data.metrics["best_val_auc"])
            tracker.log_metrics({"best_val_auc": best.data.metrics["best_val_auc"]})
            tracker.set_tags({"best_child_run_id": best.info.run_id})
        run_ids = {
            r.data.tags["sweep.job_num"]: r.info.run_id
            for r in children
            if "sweep.job_num" in r.data.tags
        }
        result = _sweep_results(sweep_dir, run_ids)
        if result is not None:
            tracker.log_metrics(result.metrics)
            tracker.set_tags(result.tags)
            for path in result.files:
                tracker.log_artifact(path, "cv")
        failed = len(scored) < len(children)
        tracker.end("FAILED" if failed or not children else "FINISHED")
        os.environ.pop(SWEEP_ENV["parent_run_id"], None)


def _sweep_results(sweep_dir: Path, run_ids: dict[str, str]) -> SweepResult | None:
    """crossval.summarise, its failure logged with its traceback and tagged (the children's
    results are safe on disk; a summary can be made again from them)."""
    from her2exp import crossval

    try:
        result = crossval.summarise(sweep_dir, run_ids)
    except Exception as exc:  # noqa: BLE001 - the sweep is done; do not lose the parent's end
        log.exception("sweep summary of %s failed", sweep_dir)
        return crossval.SweepResult("error", tags={"sweep.summary_error": str(exc)[:500]})
    if result.warnings:
        result.tags["sweep.warnings"] = " | ".join(result.warnings)[:5000]
    if result.out_dir is not None:
        log.info("sweep %s (%s): results in %s", sweep_dir, result.kind, result.out_dir)
    return result
