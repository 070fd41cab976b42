"""One run's clinical report: every figure, summary.md and best.json, written by rank 0 after
the final evaluation (and by her2exp-eval for a cohort).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from her2exp.core.fileio import atomic_write_text, safe_name
from her2exp.metrics import Calibration, SplitEvaluation
from her2exp.reports.best import RunSummary
from her2exp.reports.checklist import clinical_checklist
from her2exp.reports.figures import (
    plot_confusion_matrices,
    plot_decision_curves,
    plot_level_rocs,
    plot_precision_recall,
    plot_reliability,
    plot_roc_ci,
)
from her2exp.reports.formatting import split_title
from her2exp.reports.galleries import plot_explained_galleries, plot_galleries
from her2exp.reports.summary import clinical_markdown
from her2exp.runtime.rundir import BEST_JSON


def write_clinical_report(
    report_dir: Path,
    evaluations: dict[str, SplitEvaluation],
    galleries: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]] | None = None,
    header: dict[str, Any] | None = None,
    max_gallery: int = 32,
    before: dict[str, Calibration] | None = None,
    figures: bool = True,
    explainer: Any = None,
) -> list[Path]:
    """Write every figure, summary.md and best.json for one run; returns the paths written.

    ``evaluations`` come from ``metrics.evaluate_split`` ("val", "test", optionally "external"
    or other cohorts), all at the thresholds chosen on val. ``galleries[split]`` is (uint8
    images (N, H, W, 3), labels, scores, threshold): its false negatives (lowest score first)
    and false positives (highest score first) are drawn. ``header`` is recorded verbatim (model,
    best_epoch, seed, git_commit, data_fingerprint, operating_point: the threshold name the
    checklist judges, default "youden"; decision_level: the level it judges, default "tile";
    thresholds: those frozen, keyed by level; calibration: the frozen one, with each split's
    Brier and ECE before it). ``before[split]``: its calibration before temperature scaling,
    drawn beside the calibrated curve. ``figures=False`` (evaluation.figures): no PNG, and the
    checklist says the gallery and decision curve were not drawn. ``explainer``
    (`explain.Explainer`, or None): the galleries drawn again under its maps
    (`plot_explained_galleries`).
    """
    report_dir = Path(report_dir)
    header = dict(header or {})
    galleries = galleries or {}
    if not evaluations:
        raise ValueError("no evaluations to report")
    paths = (
        _figures(report_dir, evaluations, galleries, max_gallery, before, explainer)
        if figures
        else []
    )
    if not figures:
        header["figures"] = False  # recorded in best.json; the checklist names it
    checklist = clinical_checklist(evaluations, header, bool(paths and galleries), bool(paths))
    flat: dict[str, Any] = {}
    for name, ev in evaluations.items():
        flat.update(ev.as_flat_dict(f"{name}_"))
    summary_path = atomic_write_text(
        report_dir / "summary.md", clinical_markdown(evaluations, header, checklist, paths)
    )
    best = RunSummary.from_dict(
        {
            **header,
            **flat,
            "checklist": checklist,
            "splits": {name: ev.to_dict() for name, ev in evaluations.items()},
            "figures": [p.name for p in paths],
        }
    )
    best_path = best.write(report_dir / BEST_JSON)
    return [*paths, summary_path, best_path]


def _figures(
    report_dir: Path,
    evaluations: dict[str, SplitEvaluation],
    galleries: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]],
    max_gallery: int,
    before: dict[str, Calibration] | None,
    explainer: Any = None,
) -> list[Path]:
    figures = [
        plot_roc_ci(report_dir / "roc.png", evaluations),
        *plot_level_rocs(report_dir, evaluations),
        plot_precision_recall(report_dir / "precision_recall.png", evaluations),
        plot_reliability(report_dir / "reliability.png", evaluations, before),
        plot_decision_curves(report_dir / "decision_curve.png", evaluations),
    ]
    for name, ev in evaluations.items():
        figures.append(
            plot_confusion_matrices(
                report_dir / f"confusion_{safe_name(name)}.png", ev, split_title(name)
            )
        )
    figures += plot_galleries(report_dir, galleries, max_gallery)
    if explainer is not None:
        try:  # an optional figure never costs a finished run its report
            figures += plot_explained_galleries(report_dir, galleries, max_gallery, explainer)
        except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
            warnings.warn(
                f"evaluation.explain: no overlays ({type(exc).__name__}: {exc})", stacklevel=2
            )
    return figures
