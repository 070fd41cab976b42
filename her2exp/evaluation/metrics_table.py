"""Every number of an evaluation, as the flat dict of MLflow keys and as one table.

Why: MLflow draws a chart per metric key, and a run's full evaluation is ~900 keys (each level x
operating point x statistic x site). `tracking.schema.headline` picks what MLflow gets; the full
set goes to `reports/metrics.csv`, one row per number under the key it was logged as before, so
a reader of an older run finds the same name there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from her2exp import metrics, reports
from her2exp.tracking.schema import METRICS_TABLE, level_infix

COLUMNS = ["metric", "split", "level", "site", "operating_point", "statistic", "value"]
LEVELS = ("slide", "patient")


def split_prefix(name: str) -> str:
    """The key prefix of a split: `final_val_` for training's val (not the per-epoch `val_*`)."""
    return f"{'final_val' if name == 'val' else name}_"


def flat_metrics(
    evaluations: dict[str, metrics.SplitEvaluation],
    before: dict[str, metrics.Calibration],
    calibration: dict[str, Any] | None,
    levels: dict[str, dict[str, float]],
) -> dict[str, float]:
    """Every scalar of the evaluation under its MLflow-style key (the table's `metric`)."""
    flat: dict[str, float] = {}
    for name, ev in evaluations.items():
        prefix = split_prefix(name)
        flat.update(ev.as_flat_dict(prefix))
        if name in before:
            flat[f"{prefix}brier_uncalibrated"] = before[name].brier
            flat[f"{prefix}ece_uncalibrated"] = before[name].ece
    if (calibration or {}).get("method") == "temperature":
        flat["calibration_temperature"] = float(calibration["temperature"])
    for level, values in levels.items():
        infix = level_infix(level)
        flat.update({f"threshold_{infix}{k}_val": v for k, v in values.items()})
    return flat


def _parse(rest: str, sites: dict[str, str], ops: list[str]) -> dict[str, str]:
    """A key's parts after its split prefix: site (`sites`: its key part -> its name), level,
    operating point, statistic."""
    row = {"site": "", "level": "tile", "operating_point": ""}
    for part, site in sites.items():
        if rest.startswith(f"site_{part}_"):
            row["site"], rest = site, rest[len(f"site_{part}_") :]
            break
    for level in LEVELS:
        if rest.startswith(f"{level}_"):
            row["level"], rest = level, rest[len(level) + 1 :]
            break
    for op in ops:
        if rest.startswith(f"{op}_"):
            row["operating_point"], rest = op, rest[len(op) + 1 :]
            break
    return {**row, "statistic": rest}


def metrics_table(
    flat: dict[str, float],
    evaluations: dict[str, metrics.SplitEvaluation],
    levels: dict[str, dict[str, float]],
) -> pd.DataFrame:
    """`flat` as rows (`COLUMNS`); keys of no split (the frozen thresholds, the temperature)
    have an empty split."""
    ops = sorted({op for values in levels.values() for op in values}, key=len, reverse=True)
    owners = {split_prefix(name): ev for name, ev in evaluations.items()}
    by_length = sorted(owners, key=len, reverse=True)  # a cohort `test_x` before `test`
    rows = []
    for key, value in flat.items():
        prefix = next((p for p in by_length if key.startswith(p)), None)
        if prefix is not None:
            sites = {s.metric_name: s.site for s in owners[prefix].sites.values()}
            parts = _parse(key[len(prefix) :], sites, ops)
            row = {"split": prefix[:-1], **parts}
        elif key.startswith("threshold_") and key.endswith("_val"):
            parts = _parse(key[len("threshold_") : -len("_val")] + "_", {}, ops)
            row = {"split": "val", **parts, "statistic": "threshold"}
        else:
            row = {"split": "", "level": "", "site": "", "operating_point": "", "statistic": key}
        rows.append({"metric": key, **row, "value": float(value)})
    return pd.DataFrame(rows, columns=COLUMNS)


def write_metrics_table(report_dir: Path, table: pd.DataFrame) -> Path:
    """reports/metrics.csv (rewritten by every evaluation into this folder)."""
    return reports.atomic_write_text(report_dir / METRICS_TABLE, table.to_csv(index=False))
