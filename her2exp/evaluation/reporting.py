"""Reports of scored cohorts: metrics at the frozen thresholds -> summary.md, figures,
prediction tables -> the tracker (`report_cohorts`), and the console tables (`format_table`).

`report_cohorts` is the one reporting path: the end-of-training test evaluation and
`her2exp-eval` both call it, so a run's test table and a later re-evaluation of the same
checkpoint on the same data can never disagree.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from her2exp import metrics, reports
from her2exp.core.fileio import safe_name
from her2exp.evaluation import metrics_table
from her2exp.evaluation.scored import ScoredSplit, evaluate_scored, level_table
from her2exp.runtime.rundir import ARTIFACTS, artifact
from her2exp.tracking import schema
from her2exp.tracking.base import Tracker

log = logging.getLogger(__name__)


def _write_predictions(
    report_dir: Path, s: ScoredSplit, ev: metrics.SplitEvaluation, tile: dict[str, float]
) -> list[Path]:
    """predictions_<split>.csv (tiles) and predictions_{slides,patients}_<split>.csv."""
    rows = s.rows.copy()
    rows["prob_her2_pos"] = s.probs
    if s.member_sd is not None:
        rows["member_sd"] = s.member_sd
    for column, calls in metrics.called_columns(s.probs, tile).items():
        rows[column] = calls
    name = safe_name(s.name)
    written = [
        reports.atomic_write_text(report_dir / f"predictions_{name}.csv", rows.to_csv(index=False))
    ]
    for level in ev.levels().values():
        table = level_table(level.level, level.scores, level.thresholds, s.rows)
        path = report_dir / f"predictions_{level.level}s_{name}.csv"
        written.append(reports.atomic_write_text(path, table.to_csv(index=False)))
    return written


def report_cohorts(
    splits: list[ScoredSplit],
    thresholds: dict[str, Any],
    ecfg: DictConfig,
    report_dir: Path,
    tracker: Tracker,
    header: dict[str, Any],
    seed: int,
    gallery_splits: tuple[str, ...] = ("test", "external"),
    calibration: dict[str, Any] | None = None,
    extra_reports: list[Path] | None = None,
    explainer: Any = None,
) -> dict[str, metrics.SplitEvaluation]:
    """Metrics at the frozen `thresholds` (keyed by level; a flat dict is the tile level) for
    every split -> reports -> MLflow (rank 0 only). `ecfg.decision_level` is the headline.
    `calibration`: the run's frozen one; its Brier and ECE before (`*_uncalibrated`) and after
    are reported for every split that kept its `uncalibrated` scores. `extra_reports`: files
    the caller wrote into `report_dir` (kept, uploaded with the rest). `explainer`
    (`explain.build`): the galleries drawn again under its maps when `ecfg.explain`."""
    levels = metrics.as_level_thresholds(thresholds)
    tile = levels["tile"]
    evaluations = {s.name: evaluate_scored(s, levels, ecfg, seed) for s in splits}
    before = {
        s.name: metrics.calibration(s.labels, s.uncalibrated)
        for s in splits
        if s.uncalibrated is not None
    }
    galleries = {
        s.name: (s.images, s.labels, s.probs, tile[ecfg.operating_point])
        for s in splits
        if s.name in gallery_splits and s.images is not None
    }
    header = {
        **header,
        "decision_level": ecfg.decision_level,
        "operating_point": ecfg.operating_point,
        "target_sensitivity": float(ecfg.target_sensitivity),
        "lcb_confidence": float(ecfg.get("lcb_confidence", 0.95)),
        "aggregation": {
            "slide": ecfg.slide_aggregation,
            "patient": ecfg.patient_aggregation,
            "topk": int(ecfg.topk),
        },
        "thresholds": levels,
        "tta": ecfg.get("tta", "none"),
        "calibration": {
            **(calibration or {"method": "none"}),
            "uncalibrated": {k: {"brier": c.brier, "ece": c.ece} for k, c in before.items()},
        },
    }
    explainer = explainer if ecfg.get("explain", False) else None
    written = reports.write_clinical_report(
        report_dir,
        evaluations,
        galleries,
        header,
        max_gallery=ecfg.gallery_max,
        before=before,
        figures=ecfg.get("figures", True),
        explainer=explainer,
    )
    for s in splits:
        written += _write_predictions(report_dir, s, evaluations[s.name], tile)
    written += list(extra_reports or [])
    remove_stale_reports(report_dir, written)
    flat = metrics_table.flat_metrics(evaluations, before, calibration, levels)
    table = metrics_table.metrics_table(flat, evaluations, levels)
    metrics_table.write_metrics_table(report_dir, table)
    prefixes = [metrics_table.split_prefix(name) for name in evaluations]
    level = ecfg.decision_level
    tracker.log_metrics(schema.headline(flat, prefixes, level, levels.get(level, {})))
    tracker.log_artifact(report_dir, artifact(ARTIFACTS.reports))
    return evaluations


#: Report files named after a split or cohort: an earlier evaluation into the same folder (another
#: cohort_name or split) leaves its own, which this one must not show or upload as its own.
PER_SPLIT_REPORTS = (
    "predictions_*.csv",
    "confusion_*.png",
    "roc_*.png",
    "false_negatives_*.png",
    "false_positives_*.png",
    "most_uncertain_*.png",
    "attention_*.csv",
)


def remove_stale_reports(report_dir: Path, written: list[Path]) -> list[Path]:
    """Remove the per-split report files in `report_dir` that this evaluation did not write."""
    keep = {Path(p).resolve() for p in written}
    stale = [
        p
        for pattern in PER_SPLIT_REPORTS
        for p in sorted(Path(report_dir).glob(pattern))
        if p.resolve() not in keep
    ]
    for path in stale:
        path.unlink(missing_ok=True)
        log.info("removed %s: an earlier evaluation's, not this one's", path)
    return stale


def format_table(ev: metrics.SplitEvaluation, title: str, decision_level: str = "tile") -> str:
    """The console version of summary.md's tables: each level, each frozen operating point with
    its CIs; the decision level is marked."""

    def ci(v: float, lo: float, hi: float) -> str:
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = [f"{title}:"]
    units = {"tile": "tiles", "slide": "slides", "patient": "patients"}
    entries = [("tile", ev.n, ev.n_pos, ev.auc, ev.reports)]
    entries += [(lv.level, lv.n, lv.n_pos, lv.auc, lv.reports) for lv in ev.levels().values()]
    for level, n, n_pos, a, reports_ in entries:
        mark = " (decision level)" if level == decision_level else ""
        lines.append(
            f" {level} level{mark}: n={n} {units[level]} ({n_pos} HER2+), "
            f"AUC {ci(a.auc, a.low, a.high)} (DeLong 95% CI)"
        )
        lines += _table_rows(reports_, ci)
    for site in ev.sites.values():
        s = site.evaluation
        cells = [
            f"{name} sens {r.sensitivity:.3f} spec {r.specificity:.3f}"
            for name, r in s.level_reports(decision_level).items()
        ]
        at_level = s.levels().get(decision_level)
        area = s.auc if at_level is None else at_level.auc
        lines.append(
            f" site {site.site} ({decision_level} level): AUC {ci(area.auc, area.low, area.high)}"
            f"  {'  '.join(cells)}" + (f"  ({site.note})" if site.note else "")
        )
    return "\n".join(lines)


def _table_rows(reports_: dict[str, metrics.BinaryReport], ci: Any) -> list[str]:
    lines = []
    for name, r in reports_.items():
        sens = ci(r.sensitivity, r.sensitivity_low, r.sensitivity_high)
        spec = ci(r.specificity, r.specificity_low, r.specificity_high)
        lines.append(
            f"  {name:>7} t={r.threshold:.4f}  sensitivity {sens}  specificity {spec}"
            f"  PPV {r.precision:.3f}  NPV {r.npv:.3f}  TP/FN/FP/TN {r.tp}/{r.fn}/{r.fp}/{r.tn}"
        )
    return lines
