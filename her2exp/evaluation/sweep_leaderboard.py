"""The leaderboard of a sweep whose groups are repeats (backbone x probe protocol x seed,
experiment=fm_probe): one row per group with the mean and sd over its seeds, the per-run table,
leaderboard.md, and what the parent records of it."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from her2exp import reports
from her2exp.core.fileio import atomic_write_text, safe_name
from her2exp.evaluation.sweep_children import (
    Child,
    SweepResult,
    decision_point,
    operating_points,
)
from her2exp.evaluation.sweep_pooling import child_rates, mean_sd
from her2exp.metrics.ranking import auc_ci_delong
from her2exp.tracking.sweep_model import SEED_KEYS, repeat_groups

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
    level, op = decision_point([child])
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


def summarise_leaderboard(children: list[Child], result: SweepResult) -> None:
    """leaderboard.csv, leaderboard_runs.csv and leaderboard.md into `result.out_dir`, and each
    group's AUC mean, sd and CI as the parent's metrics."""
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
