"""A sweep's finished jobs as read from disk: each `Child` (folder, flattened config, MLflow run
id, test prediction tables), what kind of sweep they make (`sweep_kind`), and what every child
shares (levels, operating points, decision point). `SweepResult` is what the parent records.

Pure apart from reading the children's files (`<sweep_dir>/<job_num>/reports/` and the
resolved config): jobs may have run in parallel (joblib) or on other machines (submitit), so
nothing here asks a process or MLflow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from her2exp.runtime.rundir import RunDir
from her2exp.tracking.audit import flatten

#: Each level's test predictions in a child's reports/ folder; tile first (the pooled table).
LEVEL_FILES = {
    "tile": "predictions_test.csv",
    "slide": "predictions_slides_test.csv",
    "patient": "predictions_patients_test.csv",
}
CALLED = "called_her2_pos_"
#: Keys that differ between the jobs of any sweep and say nothing about the experiment.
JOB_KEYS = ("output_dir",)
#: Keys a repeat sweep may vary (the seeds); split and data seeds only with a warning.
SEED_KEYS = ("seed", "data.split_seed", "data.data_seed")


@dataclass
class Child:
    """One finished job: its folder, flattened config, MLflow run id ('' untracked), tables."""

    job: str
    run_dir: Path
    cfg: dict[str, Any]
    run_id: str
    tables: dict[str, pd.DataFrame]
    overrides: list[str] = field(default_factory=list)  # the job's, from .hydra/overrides.yaml

    @property
    def fold(self) -> int | None:
        value = self.cfg.get("data.split.fold")
        return None if value is None else int(value)

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


def _read_config(run_dir: Path) -> dict[str, Any] | None:
    for path in (RunDir(run_dir).config_resolved, RunDir(run_dir).hydra_config):
        if path.is_file():
            container = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            return flatten(container)  # type: ignore[arg-type]
    return None


def _run_id_on_disk(run_dir: Path) -> str:
    """The MLflow run id a job recorded in its folder (mlflow_run.json); '' when untracked."""
    try:
        return str(json.loads(RunDir(run_dir).mlflow_run.read_text()).get("run_id") or "")
    except (OSError, ValueError):
        return ""


def load_children(sweep_dir: Path, run_ids: Mapping[str, str] | None = None) -> list[Child]:
    """Every job folder (`<sweep_dir>/<job_num>`) whose test predictions and config exist."""
    children = []
    jobs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()]
    for run_dir in sorted(jobs, key=lambda p: int(p.name)):
        tile = RunDir(run_dir).report(LEVEL_FILES["tile"])
        cfg = _read_config(run_dir)
        if not tile.is_file() or cfg is None:
            continue
        tables = {
            level: pd.read_csv(RunDir(run_dir).report(name))
            for level, name in LEVEL_FILES.items()
            if RunDir(run_dir).report(name).is_file()
        }
        run_id = (run_ids or {}).get(run_dir.name) or _run_id_on_disk(run_dir)
        children.append(Child(run_dir.name, run_dir, cfg, run_id, tables, _overrides(run_dir)))
    return children


def _overrides(run_dir: Path) -> list[str]:
    path = RunDir(run_dir).hydra_overrides
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def repeat_groups(children: list[Child]) -> list[list[Child]]:
    """The children grouped by everything but the seeds (and the job folder): each group is a
    repeat of one setting, in the order of its first job."""
    groups: dict[tuple, list[Child]] = {}
    for c in children:
        key = tuple(sorted((k, repr(v)) for k, v in c.cfg.items() if k not in SEED_KEYS + JOB_KEYS))
        groups.setdefault(key, []).append(c)
    return list(groups.values())


def sweep_kind(children: list[Child]) -> str:
    """`cv` when the children differ in data.split.fold, `repeat` when they differ in the seeds
    only, `leaderboard` when every child is a probe run (`probe.name` set: experiment=fm_probe)
    or when they fall into several groups that differ in the seeds only within and one group at
    least repeats (backbone x seed), else `plain` (a grid or an optimiser: today's best-of
    summary only)."""
    if len(children) < 2:
        return "plain"
    if len({c.fold for c in children}) > 1:
        return "cv"
    if all(str(c.cfg.get("probe.name") or "none") != "none" for c in children):
        return "leaderboard"  # a probe sweep, even of one backbone x protocol
    keys = set().union(*(c.cfg for c in children)) - set(JOB_KEYS)
    differing = {k for k in keys if len({repr(c.cfg.get(k)) for c in children}) > 1}
    if differing and differing <= set(SEED_KEYS):
        return "repeat"
    groups = repeat_groups(children)
    return "leaderboard" if len(groups) > 1 and max(map(len, groups)) > 1 else "plain"


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
