"""A sweep's finished jobs with their files: each `Child` (its sweep-model record, folder,
flattened config, test prediction tables) and what every child shares (levels, operating
points, decision point). `SweepResult` is what the parent records. What kind of sweep they make
is the sweep model's one answer (`tracking.sweep_model.sweep_kind`).

Pure apart from reading the children's files (`<sweep_dir>/<job_num>/reports/` and the
resolved config): which children there are comes from the caller (`tracking.sweep.sweep_children`:
MLflow when the sweep is tracked) or from the run directories.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from her2exp import metrics
from her2exp.core import progress
from her2exp.runtime.rundir import RunDir
from her2exp.tracking.sweep_model import SweepChild, children_on_disk, job_config

#: Each level's test predictions in a child's reports/ folder; tile first (the pooled table).
LEVEL_FILES = {
    "tile": "predictions_test.csv",
    "slide": "predictions_slides_test.csv",
    "patient": "predictions_patients_test.csv",
}
CALLED = metrics.CALLED_PREFIX  # the decision rule's call columns (metrics.decision)


@dataclass
class Child:
    """One finished job: its sweep-model record (job, MLflow run id, config as strings: what
    `sweep_kind` reads), its folder, its flattened config with the values' own types (what the
    summaries print and compute with) and its test tables."""

    record: SweepChild
    run_dir: Path
    cfg: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    overrides: list[str] = field(default_factory=list)  # the job's, from .hydra/overrides.yaml

    @property
    def job(self) -> str:
        return str(self.record.job)

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def params(self) -> dict[str, str]:
        return dict(self.record.params)

    @property
    def fold(self) -> int | None:
        return self.record.fold

    @property
    def split_seed(self) -> int:
        value = self.cfg.get("data.split_seed")
        return int(self.cfg.get("seed", 0) if value is None else value)


@dataclass
class SweepResult:
    """What the parent records: the kind, metrics, tags, files written and warnings."""

    kind: str  # cv | repeat | leaderboard | plain
    out_dir: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def load_children(sweep_dir: Path, records: list[SweepChild] | None = None) -> list[Child]:
    """The children `records` names (tracking.sweep.sweep_children: MLflow's finished ones, in
    job order; None: the run directories under `sweep_dir`) whose job folder holds its config
    and its test predictions."""
    children = []
    listed = children_on_disk(sweep_dir) if records is None else records
    for record in progress.bar(listed, desc="sweep: reading children", unit="run"):
        run_dir = record.run_dir or Path(sweep_dir) / str(record.job)
        tile = RunDir(run_dir).report(LEVEL_FILES["tile"])
        cfg = job_config(run_dir)
        if not tile.is_file() or cfg is None:
            continue
        tables = {
            level: pd.read_csv(RunDir(run_dir).report(name))
            for level, name in LEVEL_FILES.items()
            if RunDir(run_dir).report(name).is_file()
        }
        children.append(Child(record, run_dir, cfg, tables, _overrides(run_dir)))
    return children


def _overrides(run_dir: Path) -> list[str]:
    path = RunDir(run_dir).hydra_overrides
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def operating_points(children: list[Child], level: str) -> list[str]:
    """The operating points every child called at `level` (its called_her2_pos_<op> columns)."""
    names = None
    for c in children:
        if level not in c.tables:
            return []
        ops = [col[len(CALLED) :] for col in c.tables[level].columns if col.startswith(CALLED)]
        names = ops if names is None else [o for o in names if o in ops]
    return names or []


def shared_levels(children: list[Child]) -> list[str]:
    """The levels whose test table every child wrote, tile first."""
    return [lv for lv in LEVEL_FILES if all(lv in c.tables for c in children)]


def decision_point(children: list[Child]) -> tuple[str, str]:
    """(decision level, operating point) of the sweep, from its first child's config."""
    cfg = children[0].cfg
    return (
        str(cfg.get("evaluation.decision_level") or "tile"),
        str(cfg.get("evaluation.operating_point") or "youden"),
    )
