"""Hydra multiruns in MLflow: one parent run per sweep, each job's run its child, and the
sweep's results (`crossval.summarise`: pooled folds, repeats, leaderboard) on the parent.

`conf/hydra/default.yaml` names the callback `her2exp.evaluation.sweep_callback.MlflowSweepCallback`;
the old path `her2exp.tracking.MlflowSweepCallback` (in the saved .hydra configs of earlier
runs) is a lazy alias of this class. It sits in evaluation, not tracking, because it sums up the
children through `crossval`. It imports tracking's submodules, never the `her2exp.tracking`
package, so that alias makes no import cycle.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from her2exp.evaluation import crossval
from her2exp.evaluation.crossval import SweepResult
from her2exp.tracking.audit import command_line, git_info
from her2exp.tracking.mlflow_tracker import MlflowTracker
from her2exp.tracking.store import experiment_id, with_retries
from her2exp.tracking.sweep import SWEEP_ENV, child_runs, sweep_children
from her2exp.tracking.sweep_model import SweepChild

log = logging.getLogger(__name__)


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
        cross-validation or repeat sweep also the pooled or spread results (`her2exp.evaluation.crossval`)
        of the children `tracking.sweep.sweep_children` lists (MLflow's FINISHED ones; the run
        directories with tracking=off, where there is no parent), written under `<sweep_dir>/cv/`."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if self.tracker is None or self.tracker.run_id is None:
            _sweep_results(sweep_dir, None)
            return
        tracker, client = self.tracker, self.tracker.client
        exp = experiment_id(client, config.tracking, tracker.uri)
        children = child_runs(client, tracker.run_id, exp)
        scored = [r for r in children if "best_val_auc" in r.data.metrics]
        tracker.log_metrics({"n_jobs": len(children), "n_finished": len(scored)})
        if scored:
            best = max(scored, key=lambda r: r.data.metrics["best_val_auc"])
            tracker.log_metrics({"best_val_auc": best.data.metrics["best_val_auc"]})
            tracker.set_tags({"best_child_run_id": best.info.run_id})
        records = sweep_children(sweep_dir, client, tracker.run_id)  # FINISHED, in job order
        result = _sweep_results(sweep_dir, records)
        if result is not None:
            tracker.log_metrics(result.metrics)
            tracker.set_tags(result.tags)
            for path in result.files:
                tracker.log_artifact(path, "cv")
        failed = len(scored) < len(children)
        tracker.end("FAILED" if failed or not children else "FINISHED")
        os.environ.pop(SWEEP_ENV["parent_run_id"], None)


def _sweep_results(sweep_dir: Path, records: list[SweepChild] | None) -> SweepResult | None:
    """crossval.summarise, its failure logged with its traceback and tagged (the children's
    results are safe on disk; a summary can be made again from them)."""
    try:
        result = crossval.summarise(sweep_dir, records)
    except Exception as exc:  # noqa: BLE001 - the sweep is done; do not lose the parent's end
        log.exception("sweep summary of %s failed", sweep_dir)
        return crossval.SweepResult("error", tags={"sweep.summary_error": str(exc)[:500]})
    if result.warnings:
        result.tags["sweep.warnings"] = " | ".join(result.warnings)[:5000]
    if result.out_dir is not None:
        log.info("sweep %s (%s): results in %s", sweep_dir, result.kind, result.out_dir)
    return result
