"""The sweep parent's markdown: cv_summary.md (folds, pooled results per level, the clinical
checklist read from the pooled out-of-fold results) and repeat_summary.md (each child's rates
and their spread)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from her2exp import reports
from her2exp.evaluation.sweep_children import Child, decision_point, operating_points
from her2exp.evaluation.sweep_pooling import nan_auc
from her2exp.reports.checklist import AUC_MIN, RECALL_MIN, SPECIFICITY_MIN
from her2exp.tracking.schema import level_infix


def plus_minus(metrics: Mapping[str, float], key: str, mean: str, sd: str) -> str:
    """'mean +- sd' of `key` from the metrics `<key><mean>` and `<key><sd>`."""
    return f"{reports._fmt(metrics.get(key + mean))} +- {reports._fmt(metrics.get(key + sd))}"


def _level_lines(metrics: Mapping[str, float], level: str, ops: list[str]) -> list[str]:
    p = f"cv_{level_infix(level)}"
    lines = [f"### {level} level", "", "| measure | pooled [95% CI] | per fold mean +- sd |"]
    lines.append("|---|---|---|")
    ci = reports._ci(metrics[f"{p}auc"], metrics[f"{p}auc_low"], metrics[f"{p}auc_high"])
    lines.append(
        f"| AUC (DeLong) | {ci} | {plus_minus(metrics, p + 'auc', '_fold_mean', '_fold_sd')} |"
    )
    for op in ops:
        for rate in ("sensitivity", "specificity"):
            k = f"{p}{rate}_{op}"
            ci = reports._ci(metrics[k], metrics[k + "_low"], metrics[k + "_high"])
            fold = plus_minus(metrics, k, "_fold_mean", "_fold_sd")
            lines.append(f"| {rate} at `{op}` (Wilson) | {ci} | {fold} |")
    return [*lines, ""]


def cv_checklist(
    pooled: Mapping[str, pd.DataFrame], metrics: Mapping[str, float], level: str, op: str
) -> list[dict[str, str]]:
    """The clinical checklist's test items, read from the pooled out-of-fold results."""
    p = f"cv_{level_infix(level)}"
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
            f"AUC >= {AUC_MIN:.2f} (pooled out-of-fold)",
            auc_value >= AUC_MIN,
            f"AUC {reports._fmt(auc_value)}",
        ),
        reports.checklist_item(
            f"HER2+ recall >= {RECALL_MIN:.2f} (pooled out-of-fold test, val-chosen operating "
            "points)",
            sens >= RECALL_MIN,
            f"sensitivity {reports._fmt(sens)} {where}",
        ),
        reports.checklist_item(
            f"Specificity >= {SPECIFICITY_MIN:.2f} (pooled out-of-fold test, val-chosen "
            "operating points)",
            spec >= SPECIFICITY_MIN,
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
    level, op = decision_point(children)
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
        area = reports._fmt(nan_auc(t["label"].to_numpy(), t["prob_her2_pos"].to_numpy()))
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
        p = f"repeat_{level_infix(level)}"
        spreads = " | ".join(plus_minus(metrics, p + k, "_mean", "_sd") for k in keys)
        lines += [f"| mean +- sd | | | {spreads} |", ""]
    return "\n".join(lines)
