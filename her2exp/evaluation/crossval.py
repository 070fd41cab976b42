"""The sweep parent's results: pooled out-of-fold predictions of a cross-validation sweep, the
spread of a repeat sweep, the leaderboard of a sweep whose groups are repeats (backbone x
probe protocol x seed, experiment=fm_probe).

Pure apart from reading the children's files on disk (`<sweep_dir>/<job_num>/reports/` and the
resolved config): jobs may have run in parallel (joblib) or on other machines (submitit), so
nothing here asks a process or MLflow; `sweep_callback` logs what `summarise` returns.

Pooling at each fold's OWN frozen thresholds means pooling the `called_her2_pos_<op>` columns a
child wrote, never re-thresholding the pooled probabilities: the pooled sensitivity is what
the K deployed models would have called on the K test folds.

The parts: the children (sweep_children; their kind is tracking.sweep_model's), their rates and pooling
(sweep_pooling), the markdown (sweep_markdown), the leaderboard (sweep_leaderboard). Every
name they hold stays importable from here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from her2exp import reports
from her2exp.core import progress
from her2exp.core.fileio import atomic_write_text
from her2exp.evaluation.sweep_children import (
    CALLED,
    LEVEL_FILES,
    Child,
    SweepResult,
    load_children,
    operating_points,
    shared_levels,
)
from her2exp.evaluation.sweep_leaderboard import (
    LEADERBOARD_RATES,
    child_row,
    format_pm,
    leaderboard,
    leaderboard_markdown,
    summarise_leaderboard,
)
from her2exp.evaluation.sweep_markdown import cv_checklist, cv_markdown, repeat_markdown
from her2exp.evaluation.sweep_pooling import (
    child_rates,
    mean_sd,
    nan_auc,
    pool,
    pooled_metrics,
    roc_curve,
    spread,
)
from her2exp.tracking.schema import level_infix
from her2exp.tracking.sweep_model import JOB_KEYS, SEED_KEYS, SweepChild, repeat_groups, sweep_kind

log = logging.getLogger(__name__)

__all__ = [
    "CALLED",
    "JOB_KEYS",
    "LEADERBOARD_RATES",
    "LEVEL_FILES",
    "SEED_KEYS",
    "Child",
    "SweepResult",
    "child_rates",
    "child_row",
    "cv_checklist",
    "cv_markdown",
    "format_pm",
    "leaderboard",
    "leaderboard_markdown",
    "load_children",
    "mean_sd",
    "operating_points",
    "pool",
    "pooled_metrics",
    "repeat_groups",
    "repeat_markdown",
    "spread",
    "summarise",
    "sweep_kind",
]


def summarise(sweep_dir: Path, records: list[SweepChild] | None = None) -> SweepResult:
    """Read the finished jobs of a sweep (`records`: tracking.sweep.sweep_children's list, None:
    the run directories), classify them (the sweep model's `sweep_kind`) and write the parent's
    results under `<sweep_dir>/cv/`: `oof_predictions*.csv`, `cv_summary.md` and
    `roc_folds.png` for a CV sweep, `repeat_summary.md` for a repeat sweep, `leaderboard.csv`,
    `leaderboard_runs.csv` and `leaderboard.md` for a leaderboard; nothing for a plain one."""
    sweep_dir = Path(sweep_dir)
    children = load_children(sweep_dir, records) if sweep_dir.is_dir() else []
    kind = sweep_kind(children)
    result = SweepResult(kind, tags={"sweep.kind": kind})
    if kind == "plain":
        return result
    result.out_dir = sweep_dir / "cv"
    result.out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "cv":
        _summarise_cv(children, result)
    elif kind == "leaderboard":
        summarise_leaderboard(children, result)
    else:
        _summarise_repeat(children, result)
    for line in result.warnings:
        log.warning("sweep %s: %s", sweep_dir, line)
    return result


def _cv_warnings(children: list[Child]) -> list[str]:
    folds = [c.fold for c in children]
    declared = children[0].cfg.get("data.split.folds")
    found = []
    repeated = sorted({f for f in folds if folds.count(f) > 1})
    if repeated:
        found.append(f"folds {repeated} were run more than once: their rows are pooled twice")
    if declared is not None:
        missing = sorted(set(range(int(declared))) - set(folds))
        if missing:
            found.append(
                f"folds {missing} of {declared} did not finish: pooled over the other "
                f"{len(set(folds))}"
            )
    return found


def _summarise_cv(children: list[Child], result: SweepResult) -> None:
    out = result.out_dir
    assert out is not None
    result.warnings += _cv_warnings(children)
    pooled: dict[str, pd.DataFrame] = {}
    for level in progress.bar(shared_levels(children), desc="CV pooling", unit="level"):
        pooled[level] = pool(children, level)
        ops = operating_points(children, level)
        result.metrics.update(pooled_metrics(pooled[level], level, ops))
        name = "oof_predictions.csv" if level == "tile" else f"oof_predictions_{level}s.csv"
        result.files.append(atomic_write_text(out / name, pooled[level].to_csv(index=False)))
    result.metrics["cv_n_folds"] = float(len(children))
    curves = {}
    for c in children:
        table = c.tables["tile"]
        curve = roc_curve(table)
        if curve is not None:
            curves[f"fold {c.fold} (job {c.job}) AUC {nan_auc(*curve[2:]):.3f}"] = curve[:2]
    whole = roc_curve(pooled["tile"])
    if whole is not None:
        curves[f"pooled out-of-fold AUC {result.metrics['cv_auc']:.3f}"] = whole[:2]
    result.files.append(reports.plot_roc_folds(out / "roc_folds.png", curves))
    by = str(children[0].cfg.get("data.split.by") or "patient")
    text = cv_markdown(children, pooled, result.metrics, by, result.warnings)
    result.files.append(atomic_write_text(out / "cv_summary.md", text))
    result.tags["cv.by"] = by


def _summarise_repeat(children: list[Child], result: SweepResult) -> None:
    out = result.out_dir
    assert out is not None
    seeds = sorted({c.split_seed for c in children})
    if len(seeds) > 1:
        result.warnings.append(
            f"the split seed varies across children ({', '.join(map(str, seeds))}): the spread "
            "mixes initialisation with different test sets; fix data.split_seed to measure "
            "the initialisation alone"
        )
        result.tags["repeat.split_seed_varies"] = "true"
    rates: dict[str, list[dict[str, float]]] = {}
    for level in shared_levels(children):
        ops = operating_points(children, level)
        rates[level] = [child_rates(c.tables[level], ops) for c in children]
        result.metrics.update(
            spread(rates[level], f"repeat_{level_infix(level)}", ("_mean", "_sd"))
        )
    result.metrics["repeat_n"] = float(len(children))
    text = repeat_markdown(children, rates, result.metrics, result.warnings)
    result.files.append(atomic_write_text(out / "repeat_summary.md", text))
