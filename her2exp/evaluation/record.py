"""An eval's MLflow run: `EvalRecord` (what it is opened with) and `record_eval` (opened once
the scores exist, reported through `report_cohorts`, closed FINISHED or FAILED). Shared by a
run's eval and an ensemble's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from her2exp.evaluation.reporting import report_cohorts
from her2exp.evaluation.scored import ScoredSplit
from her2exp.runtime.hydra_run import HydraRun
from her2exp.runtime.rundir import ARTIFACTS, RunDir, artifact
from her2exp.tracking.audit import environment_tags, git_info
from her2exp.tracking.base import Tracker


@dataclass
class EvalRecord:
    """What an eval's MLflow run is opened with: the config logged as params, its tags and the
    summary.md header (git and environment tags are added by `record_eval`)."""

    logged: DictConfig
    tags: dict[str, Any]
    header: dict[str, Any]
    device: torch.device
    #: Report files drawn into the report folder before report_cohorts (kept, uploaded).
    extra_reports: Callable[[Path], list[Path]] | None = None
    #: Files drawn after it from what it wrote (the model card), uploaded under reports/.
    after_reports: Callable[[Path], list[Path]] | None = None
    explainer: Any = None  # explain.Explainer of the scored model (evaluation.explain)
    hydra: HydraRun | None = None  # the command's Hydra facts (its sweep and job), if any


def record_eval(
    tracker: Tracker,
    record: EvalRecord,
    split: ScoredSplit,
    levels: dict[str, dict[str, float]],
    evaluation: DictConfig,
    seed: int,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One eval MLflow run, opened only once the scores exist: the audit tags, report_cohorts
    at the frozen `levels`, FINISHED or FAILED. Shared by a run's eval and an ensemble's."""
    status = "FAILED"
    try:
        git = git_info()
        tags = {**record.tags, **git, **environment_tags(record.device)}
        tracker.start(record.logged, tags, hydra=record.hydra)
        report_dir = RunDir(Path(record.logged.output_dir)).reports
        report_dir.mkdir(parents=True, exist_ok=True)
        extra = record.extra_reports(report_dir) if record.extra_reports else []
        header = {**record.header, "git_commit": git["git_commit"]}
        evs = report_cohorts(
            [split],
            levels,
            evaluation,
            report_dir,
            tracker,
            header,
            seed,
            gallery_splits=(split.name,),
            calibration=calibration,
            extra_reports=extra,
            explainer=record.explainer,
        )
        for path in record.after_reports(report_dir) if record.after_reports else []:
            tracker.log_artifact(path, artifact(ARTIFACTS.reports))
        status = "FINISHED"
        return {
            "evaluation": evs[split.name],
            "cohort": split.name,
            "settings": evaluation,
            "mlflow_run_id": tracker.run_id,
            "tracking_uri": tracker.uri,
            "report_dir": str(report_dir),
        }
    finally:
        tracker.end(status)
