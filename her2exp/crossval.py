"""The sweep parent's results: pooled out-of-fold predictions of a cross-validation sweep, the
spread of a repeat sweep, the leaderboard of a sweep whose groups are repeats (backbone x
probe protocol x seed, experiment=fm_probe).

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
from her2exp.fileio import atomic_write_text, safe_name
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
        children.append(Child(run_dir.name, run_dir, cfg, run_id, tables, _overrides(run_dir)))
    return children


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
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
    sweep, `repeat_summary.md` for a repeat sweep, `leaderboard.csv`, `leaderboard_runs.csv`
    and `leaderboard.md` for a leaderboard; nothing for a plain one."""
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
    elif kind == "leaderboard":
        _summarise_leaderboard(children, result)
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


# -- leaderboard -------------------------------------------------------------------------------
#: leaderboard.csv's columns after the group's names; `auc_ci_*` is the mean of the runs' own
#: DeLong bounds (see child_row).
LEADERBOARD_RATES = ("auc", "sensitivity", "specificity")


def _label(child: Child, axes: set[str]) -> tuple[str, str, str]:
    """(backbone, protocol, group) of a child: the `model=` choice (else model.name), the
    probe's name, and its overrides that vary across the sweep, seeds left out."""
    own = {o.split("=", 1)[0].lstrip("+~"): o for o in child.overrides if "=" in o}
    backbone = own["model"].split("=", 1)[1] if "model" in own else str(child.cfg["model.name"])
    protocol = str(child.cfg.get("probe.name") or "none")
    group = " ".join(own[k] for k in sorted(axes) if k in own)
    return backbone, protocol, group


def child_row(child: Child) -> dict[str, Any]:
    """One child's test results at its decision level (tile when it has no such table): AUC with
    its DeLong CI, sensitivity and specificity at its own frozen operating point."""
    level, op = _decision([child])
    level = level if level in child.tables else "tile"
    table = child.tables[level]
    labels = table["label"].to_numpy().astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ci = auc_ci_delong(labels, table["prob_her2_pos"].to_numpy(dtype=float))
    ops = [op] if op in operating_points([child], level) else []
    rates = child_rates(table, ops)
    return {
        "level": level,
        "operating_point": op,
        "job": child.job,
        "run_id": child.run_id,
        "seed": child.cfg.get("seed"),
        "auc": rates["auc"],
        "auc_low": ci.low,
        "auc_high": ci.high,
        "sensitivity": rates.get(f"sensitivity_{op}", math.nan),
        "specificity": rates.get(f"specificity_{op}", math.nan),
    }


def leaderboard(children: list[Child]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(leaderboard, per-run table): one row per group (backbone x protocol) with the mean and
    sample sd over its seeds of test AUC, sensitivity and specificity at the frozen point, and
    the pooled AUC CI as the mean of the runs' DeLong bounds; best mean AUC first.

    Why not DeLong on the seeds' pooled predictions: the split is held fixed, so every seed
    scores the same test patients, and pooling would count each patient n_runs times (a CI
    about sqrt(n_runs) too narrow). The mean bounds are one run's test-set uncertainty; the sd
    is the seeds' (initialisation) spread beside it."""
    groups = repeat_groups(children)
    counts: dict[str, set[str]] = {}
    for c in children:
        for o in c.overrides:
            key = o.split("=", 1)[0].lstrip("+~")
            if "=" in o and key not in SEED_KEYS:
                counts.setdefault(key, set()).add(o)
    axes = {k for k, v in counts.items() if len(v) > 1}
    rows, runs = [], []
    for group in groups:
        backbone, protocol, name = _label(group[0], axes)
        per_child = [child_row(c) for c in group]
        runs += [{"backbone": backbone, "protocol": protocol, **r} for r in per_child]
        row: dict[str, Any] = {
            "backbone": backbone,
            "protocol": protocol,
            "group": name,
            "level": per_child[0]["level"],
            "operating_point": per_child[0]["operating_point"],
            "n_runs": len(group),
        }
        for rate in LEADERBOARD_RATES:
            row[f"test_{rate}_mean"], row[f"test_{rate}_sd"] = mean_sd([r[rate] for r in per_child])
        row["test_auc_ci_low"] = mean_sd([r["auc_low"] for r in per_child])[0]
        row["test_auc_ci_high"] = mean_sd([r["auc_high"] for r in per_child])[0]
        row["jobs"] = " ".join(r["job"] for r in per_child)
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(
        "test_auc_mean", ascending=False, na_position="last", kind="stable"
    )
    return table.reset_index(drop=True), pd.DataFrame(runs)


def _summarise_leaderboard(children: list[Child], result: SweepResult) -> None:
    out = result.out_dir
    assert out is not None
    seeds = sorted({c.split_seed for c in children})
    if len(seeds) > 1:
        result.warnings.append(
            f"the split seed varies across children ({', '.join(map(str, seeds))}): the runs "
            "of a group were tested on different patients; fix data.split_seed"
        )
    table, runs = leaderboard(children)
    result.files.append(atomic_write_text(out / "leaderboard.csv", table.to_csv(index=False)))
    result.files.append(atomic_write_text(out / "leaderboard_runs.csv", runs.to_csv(index=False)))
    result.files.append(atomic_write_text(out / "leaderboard.md", leaderboard_markdown(table)))
    labels = list(zip(table["backbone"], table["protocol"], strict=True))
    for i, row in table.iterrows():
        label = f"{row['backbone']}_{row['protocol']}"
        if labels.count((row["backbone"], row["protocol"])) > 1:  # e.g. two weights files
            label += f"_{row['group']}"
        name = safe_name(label)
        for key in ("test_auc_mean", "test_auc_sd", "test_auc_ci_low", "test_auc_ci_high"):
            result.metrics[f"leaderboard_{name}_{key}"] = float(row[key])
        if i == 0:
            result.tags["leaderboard.best"] = f"{row['backbone']} {row['protocol']}"
    result.metrics["leaderboard_n_groups"] = float(len(table))


def leaderboard_markdown(table: pd.DataFrame) -> str:
    """leaderboard.md: the table as her2exp-compare prints it."""
    lines = [
        f"# her2exp leaderboard: {len(table)} backbone x protocol groups",
        "",
        "Test results over each group's seeds (split held fixed) at its decision level and own "
        "frozen operating point; sd is the sample sd; the CI is the mean of the runs' DeLong "
        "95% bounds.",
        "",
        "| backbone | protocol | level | runs | AUC mean +- sd | AUC CI | sensitivity | "
        "specificity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['backbone']} | {r['protocol']} | {r['level']} | {r['n_runs']} | "
            f"{format_pm(r, 'test_auc')} | [{reports._fmt(r['test_auc_ci_low'])}, "
            f"{reports._fmt(r['test_auc_ci_high'])}] | {format_pm(r, 'test_sensitivity')} | "
            f"{format_pm(r, 'test_specificity')} |"
        )
    return "\n".join([*lines, ""])


def format_pm(row: Mapping[str, Any], key: str) -> str:
    """'0.912 +- 0.013' from a leaderboard row's `<key>_mean` and `<key>_sd`."""
    return f"{reports._fmt(row[key + '_mean'])} +- {reports._fmt(row[key + '_sd'])}"
