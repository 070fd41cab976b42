"""Rates of a sweep's children and their pooling: each child's test AUC and rates at its own
frozen operating points, their mean and sample sd, and the out-of-fold table of a
cross-validation sweep with its pooled metrics.

Pooling at each fold's OWN frozen thresholds means pooling the `called_her2_pos_<op>` columns a
child wrote, never re-thresholding the pooled probabilities: the pooled sensitivity is what
the K deployed models would have called on the K test folds.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from her2exp.evaluation.sweep_children import CALLED, Child
from her2exp.metrics.operating_points import binary_report
from her2exp.metrics.ranking import auc, auc_ci_delong, roc_with_band
from her2exp.tracking.schema import level_infix


def nan_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC, NaN for an empty table; undefined-AUC warnings silenced (a one-class fold)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auc(labels, scores) if labels.size else math.nan


def child_rates(table: pd.DataFrame, ops: list[str]) -> dict[str, float]:
    """One child's test AUC and sensitivity/specificity at its frozen operating points."""
    labels = table["label"].to_numpy().astype(np.int64)
    rates = {"auc": nan_auc(labels, table["prob_her2_pos"].to_numpy(dtype=float))}
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
    prefix = f"cv_{level_infix(level)}"
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


def roc_curve(
    table: pd.DataFrame,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(fpr, tpr, labels, scores) of a test table; None when no ROC can be drawn."""
    labels = table["label"].to_numpy().astype(np.int64)
    scores = table["prob_her2_pos"].to_numpy(dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roc = roc_with_band(labels, scores)
    return None if roc is None else (roc.fpr, roc.tpr, labels, scores)
