"""The sweep parent's results: pooled out-of-fold predictions of a cross-validation sweep, the
spread of a repeat sweep.

Pure apart from reading the children's files on disk (`<sweep_dir>/<job_num>/reports/` and the
resolved config): jobs may have run in parallel (joblib) or on other machines (submitit), so
nothing here asks a process or MLflow; `tracking.sweep` logs what `summarise` returns.

Pooling at each fold's OWN frozen thresholds means pooling the `called_her2_pos_<op>` columns a
child wrote, never re-thresholding the pooled probabilities: the pooled sensitivity is what
the K deployed models would have called on the K test folds.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from her2exp import reports
from her2exp.fileio import atomic_write_text
from her2exp.metrics.operating_points import binary_report
from her2exp.metrics.ranking import auc, auc_ci_delong, roc_with_band
from her2exp.tracking.audit import flatten

log = logging.getLogger(__name__)

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

    kind: str  # cv | repeat | plain
    out_dir: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _read_config(run_dir: Path) -> dict[str, Any] | None:
    for name in ("config_resolved.yaml", ".hydra/config.yaml"):
        path = run_dir / name
        if path.is_file():
            container = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            return flatten(container)  # type: ignore[arg-type]
    return None


def _run_id_on_disk(run_dir: Path) -> str:
    """The MLflow run id a job recorded in its folder (mlflow_run.json); '' when untracked."""
    try:
        return str(json.loads((run_dir / "mlflow_run.json").read_text()).get("run_id") or "")
    except (OSError, ValueError):
        return ""


def load_children(sweep_dir: Path, run_ids: Mapping[str, str] | None = None) -> list[Child]:
    """Every job folder (`<sweep_dir>/<job_num>`) whose test predictions and config exist."""
    children = []
    jobs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()]
    for run_dir in sorted(jobs, key=lambda p: int(p.name)):
        tile = run_dir / "reports" / LEVEL_FILES["tile"]
        cfg = _read_config(run_dir)
        if not tile.is_file() or cfg is None:
            continue
        tables = {
            level: pd.read_csv(run_dir / "reports" / name)
            for level, name in LEVEL_FILES.items()
            if (run_dir / "reports" / name).is_file()
        }
        run_id = (run_ids or {}).get(run_dir.name) or _run_id_on_disk(run_dir)
        children.append(Child(run_dir.name, run_dir, cfg, run_id, tables))
    return children


def sweep_kind(children: list[Child]) -> str:
    """`cv` when the children differ in data.split.fold, `repeat` when they differ in the seeds
    only, else `plain` (a grid or an optimiser: today's best-of summary only)."""
    if len(children) < 2:
        return "plain"
    if len({c.fold for c in children}) > 1:
        return "cv"
    keys = set().union(*(c.cfg for c in children)) - set(JOB_KEYS)
    differing = {k for k in keys if len({repr(c.cfg.get(k)) for c in children}) > 1}
    return "repeat" if differing and differing <= set(SEED_KEYS) else "plain"


def operating_points(children: list[Child], level: str) -> list[str]:
    """The operating points every child called at `level` (its called_her2_pos_<op> columns)."""
    names = None
    for c in children:
        if level not in c.tables:
            return []
        ops = [col[len(CALLED) :] for col in c.tables[level].columns if col.startswith(CALLED)]
        names = ops if names is None else [o for o in names if o in ops]
    return names or []


def _nan_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auc(labels, scores) if labels.size else math.nan


def child_rates(table: pd.DataFrame, ops: list[str]) -> dict[str, float]:
    """One child's test AUC and sensitivity/specificity at its frozen operating points."""
    labels = table["label"].to_numpy().astype(np.int64)
    rates = {"auc": _nan_auc(labels, table["prob_her2_pos"].to_numpy(dtype=float))}
    for op in ops:
        rep = binary_report(labels, table[CALLED + op].to_numpy(dtype=float), 0.5, math.nan, 0.05)
        rates[f"sensitivity_{op}"] = rep.sensitivity
        rates[f"specificity_{op}"] = rep.specificity
    return rates


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample sd (ddof=1) over the finite values; sd NaN with fewer than two."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    if not arr.size:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def spread(per_child: list[dict[str, float]], prefix: str, suffixes: tuple[str, str]) -> dict:
    """`<prefix><rate><mean suffix>` and `<sd suffix>` of every rate across children."""
    out: dict[str, float] = {}
    for key in per_child[0] if per_child else []:
        mean, sd = mean_sd([r[key] for r in per_child])
        out[f"{prefix}{key}{suffixes[0]}"], out[f"{prefix}{key}{suffixes[1]}"] = mean, sd
    return out


def _infix(level: str) -> str:
    return "" if level == "tile" else f"{level}_"


def pool(children: list[Child], level: str) -> pd.DataFrame:
    """The out-of-fold table of one level: every child's test rows plus fold, job, run id."""
    frames = []
    for c in children:
        table = c.tables[level].copy()
        table.insert(0, "child_run_id", c.run_id)
        table.insert(0, "job", c.job)
        table.insert(0, "fold", c.fold)
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def pooled_metrics(pooled: pd.DataFrame, level: str, ops: list[str]) -> dict[str, float]:
    """`cv_<level_>auc` with its DeLong CI, sensitivity/specificity with Wilson CIs from the
    pooled calls at each fold's own thresholds, and the per-fold mean and sd of each."""
    prefix = f"cv_{_infix(level)}"
    labels = pooled["label"].to_numpy().astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ci = auc_ci_delong(labels, pooled["prob_her2_pos"].to_numpy(dtype=float))
    out = {f"{prefix}auc": ci.auc, f"{prefix}auc_low": ci.low, f"{prefix}auc_high": ci.high}
    for op in ops:
        rep = binary_report(labels, pooled[CALLED + op].to_numpy(dtype=float), 0.5, ci.auc, 0.05)
        for rate in ("sensitivity", "specificity"):
            out[f"{prefix}{rate}_{op}"] = getattr(rep, rate)
            out[f"{prefix}{rate}_{op}_low"] = getattr(rep, f"{rate}_low")
            out[f"{prefix}{rate}_{op}_high"] = getattr(rep, f"{rate}_high")
    per_fold = [child_rates(g, ops) for _, g in pooled.groupby("fold", sort=True)]
    out.update(spread(per_fold, prefix, ("_fold_mean", "_fold_sd")))
    return out


def summarise(sweep_dir: Path, run_ids: Mapping[str, str] | None = None) -> SweepResult:
    """Read the finished jobs of a sweep and write the parent's results under
    `<sweep_dir>/cv/`: `oof_predictions*.csv`, `cv_summary.md` and `roc_folds.png` for a CV
    sweep, `repeat_summary.md` for a repeat sweep; nothing for a plain one."""
    sweep_dir = Path(sweep_dir)
    children = load_children(sweep_dir, run_ids) if sweep_dir.is_dir() else []
    kind = sweep_kind(children)
    result = SweepResult(kind, tags={"sweep.kind": kind})
    if kind == "plain":
        return result
    result.out_dir = sweep_dir / "cv"
    result.out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "cv":
        _summarise_cv(children, result)
    else:
        _summarise_repeat(children, result)
    for line in result.warnings:
        log.warning("sweep %s: %s", sweep_dir, line)
    return result


def _levels(children: list[Child]) -> list[str]:
    return [lv for lv in LEVEL_FILES if all(lv in c.tables for c in children)]


def _decision(children: list[Child]) -> tuple[str, str]:
    cfg = children[0].cfg
    return (
        str(cfg.get("evaluation.decision_level") or "tile"),
        str(cfg.get("evaluation.operating_point") or "youden"),
    )


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
    for level in _levels(children):
        pooled[level] = pool(children, level)
        ops = operating_points(children, level)
        result.metrics.update(pooled_metrics(pooled[level], level, ops))
        name = "oof_predictions.csv" if level == "tile" else f"oof_predictions_{level}s.csv"
        result.files.append(atomic_write_text(out / name, pooled[level].to_csv(index=False)))
    result.metrics["cv_n_folds"] = float(len(children))
    curves = {}
    for c in children:
        table = c.tables["tile"]
        curve = _curve(table)
        if curve is not None:
            curves[f"fold {c.fold} (job {c.job}) AUC {_nan_auc(*curve[2:]):.3f}"] = curve[:2]
    whole = _curve(pooled["tile"])
    if whole is not None:
        curves[f"pooled out-of-fold AUC {result.metrics['cv_auc']:.3f}"] = whole[:2]
    result.files.append(reports.plot_roc_folds(out / "roc_folds.png", curves))
    by = str(children[0].cfg.get("data.split.by") or "patient")
    text = cv_markdown(children, pooled, result.metrics, by, result.warnings)
    result.files.append(atomic_write_text(out / "cv_summary.md", text))
    result.tags["cv.by"] = by


def _curve(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    labels = table["label"].to_numpy().astype(np.int64)
    scores = table["prob_her2_pos"].to_numpy(dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roc = roc_with_band(labels, scores)
    return None if roc is None else (roc.fpr, roc.tpr, labels, scores)


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
    for level in _levels(children):
        ops = operating_points(children, level)
        rates[level] = [child_rates(c.tables[level], ops) for c in children]
        result.metrics.update(spread(rates[level], f"repeat_{_infix(level)}", ("_mean", "_sd")))
    result.metrics["repeat_n"] = float(len(children))
    text = repeat_markdown(children, rates, result.metrics, result.warnings)
    result.files.append(atomic_write_text(out / "repeat_summary.md", text))


def _pm(metrics: Mapping[str, float], key: str, mean: str, sd: str) -> str:
    return f"{reports._fmt(metrics.get(key + mean))} +- {reports._fmt(metrics.get(key + sd))}"


def _level_lines(metrics: Mapping[str, float], level: str, ops: list[str]) -> list[str]:
    p = f"cv_{_infix(level)}"
    lines = [f"### {level} level", "", "| measure | pooled [95% CI] | per fold mean +- sd |"]
    lines.append("|---|---|---|")
    ci = reports._ci(metrics[f"{p}auc"], metrics[f"{p}auc_low"], metrics[f"{p}auc_high"])
    lines.append(f"| AUC (DeLong) | {ci} | {_pm(metrics, p + 'auc', '_fold_mean', '_fold_sd')} |")
    for op in ops:
        for rate in ("sensitivity", "specificity"):
            k = f"{p}{rate}_{op}"
            ci = reports._ci(metrics[k], metrics[k + "_low"], metrics[k + "_high"])
            fold = _pm(metrics, k, "_fold_mean", "_fold_sd")
            lines.append(f"| {rate} at `{op}` (Wilson) | {ci} | {fold} |")
    return [*lines, ""]


def cv_checklist(
    pooled: Mapping[str, pd.DataFrame], metrics: Mapping[str, float], level: str, op: str
) -> list[dict[str, str]]:
    """The clinical checklist's test items, read from the pooled out-of-fold results."""
    p = f"cv_{_infix(level)}"
    sens, spec = (
        metrics.get(f"{p}sensitivity_{op}", math.nan),
        metrics.get(f"{p}specificity_{op}", math.nan),
    )
    auc_value = metrics.get(f"{p}auc", math.nan)
    where = f"at each fold's own `{op}`, {level} level (the decision level)"
    patients = pooled.get("patient")
    once = None if patients is None else not patients["patient_id"].duplicated().any()
    return [
        reports.checklist_item(
            "AUC >= 0.95 (pooled out-of-fold)", auc_value >= 0.95, f"AUC {reports._fmt(auc_value)}"
        ),
        reports.checklist_item(
            "HER2+ recall >= 0.90 (pooled out-of-fold test, val-chosen operating points)",
            sens >= 0.90,
            f"sensitivity {reports._fmt(sens)} {where}",
        ),
        reports.checklist_item(
            "Specificity >= 0.85 (pooled out-of-fold test, val-chosen operating points)",
            spec >= 0.85,
            f"specificity {reports._fmt(spec)} {where}",
        ),
        reports.checklist_item(
            "Every patient tested exactly once",
            once,
            "no patient in two test folds" if once else "patient table missing or repeated",
        ),
    ]


def cv_markdown(
    children: list[Child],
    pooled: Mapping[str, pd.DataFrame],
    metrics: Mapping[str, float],
    by: str,
    warned: list[str],
) -> str:
    """cv_summary.md: the folds, the pooled results per level, the checklist."""
    level, op = _decision(children)
    lines = [f"# her2exp cross-validation: {len(children)} folds by {by}", ""]
    lines += [f"**Warning:** {w}" for w in warned] + ([""] if warned else [])
    lines += [
        "Each fold's model chose its operating points on its own validation split and froze "
        "them; the pooled rates pool those calls (the out-of-fold predictions), not one "
        "threshold over pooled probabilities. AUC and its DeLong CI are over the pooled "
        "probabilities; the fold sd is the sample sd (ddof=1).",
        "",
        "| fold | job | run | test tiles | test patients | AUC |",
        "|---|---|---|---|---|---|",
    ]
    for c in children:
        t = c.tables["tile"]
        area = reports._fmt(_nan_auc(t["label"].to_numpy(), t["prob_her2_pos"].to_numpy()))
        lines.append(
            f"| {c.fold} | {c.job} | {c.run_id or '-'} | {len(t)} | "
            f"{t['patient_id'].nunique()} | {area} |"
        )
    lines += ["", "## Pooled out-of-fold results", ""]
    for lv in pooled:
        lines += _level_lines(metrics, lv, operating_points(children, lv))
    lines += ["## Clinical Evaluation Checklist (pooled)", ""]
    lines += reports.checklist_table(cv_checklist(pooled, metrics, level, op))
    lines += ["", "Figure: `roc_folds.png` (every fold's ROC and the pooled one).", ""]
    return "\n".join(lines)


def repeat_markdown(
    children: list[Child],
    rates: Mapping[str, list[dict[str, float]]],
    metrics: Mapping[str, float],
    warned: list[str],
) -> str:
    """repeat_summary.md: each child's test rates and their mean +- sd per level."""
    lines = [f"# her2exp repeated runs: {len(children)} children", ""]
    lines += [f"**Warning:** {w}" for w in warned] + ([""] if warned else [])
    lines += ["Rates at each child's own frozen operating points; sd is the sample sd.", ""]
    for level, per_child in rates.items():
        keys = list(per_child[0])
        lines += [f"## {level} level", "", "| job | seed | split seed | " + " | ".join(keys)]
        lines[-1] += " |"
        lines.append("|---" * (len(keys) + 3) + "|")
        for c, r in zip(children, per_child, strict=True):
            values = " | ".join(reports._fmt(r[k]) for k in keys)
            lines.append(f"| {c.job} | {c.cfg.get('seed')} | {c.split_seed} | {values} |")
        p = f"repeat_{_infix(level)}"
        spreads = " | ".join(_pm(metrics, p + k, "_mean", "_sd") for k in keys)
        lines += [f"| mean +- sd | | | {spreads} |", ""]
    return "\n".join(lines)
