"""Hydra multiruns in MLflow: which sweep and job a run belongs to, and the tags that make it
a child of the sweep's parent run.

The Hydra callback that opens and closes the parent run sums up the children through
`evaluation.crossval`, so it lives a floor up, in her2exp/evaluation/sweep_callback.py
(`her2exp.tracking.MlflowSweepCallback` still names it, for the .hydra configs of old runs).
"""

from __future__ import annotations

import os

from her2exp.runtime.hydra_run import HydraRun

#: The sweep context as environment variables, for workers a job spawns (nproc_per_node > 1).
SWEEP_ENV = {
    "parent_run_id": "HER2EXP_PARENT_RUN_ID",
    "job_num": "HER2EXP_SWEEP_JOB_NUM",
    "job_overrides": "HER2EXP_SWEEP_JOB_OVERRIDES",
    "sweep_dir": "HER2EXP_SWEEP_DIR",
}


def sweep_context(hydra: HydraRun | None = None) -> dict[str, str]:
    """Parent run and job of a Hydra multirun: from Hydra in the job process (`hydra`, read at
    the command's entry; None: read now, for the commands that do not pass one), or from the
    environment in workers the job process spawned (trainer.nproc_per_node)."""
    ctx = {k: os.environ[v] for k, v in SWEEP_ENV.items() if v in os.environ}
    ctx.update((HydraRun.current() if hydra is None else hydra).sweep_context())
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
