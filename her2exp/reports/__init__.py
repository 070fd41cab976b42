"""Files a reviewer opens: best.json, summary.md, the clinical figures, galleries, heatmaps and
the model card. Plotting and formatting only: every number comes from ``her2exp.metrics``; each
file is written atomically (temp file + os.replace), by rank 0 only.

Owns `formatting` (how a number reads), `figures` (one function per PNG), `overlay` (a map over
its patch), `galleries` (false negatives and positives, plain or explained), `checklist`,
`summary` (summary.md), `best` (best.json), `clinical` (one run's whole report), `card` (the
model card), `heatmap` (scores over a slide) and `mil` (attention outputs). May import `core`,
`config` and the pure floors (`metrics`, `stain`, `slides`), and its siblings `runtime` and
`models` (no cycle); never `tracking`, `data`, `engine` or anything above (what a card needs from
MLflow, its caller passes in). The names below are re-exported because callers write
`from her2exp import reports; reports.write_clinical_report(...)`; the underscored ones are the
old private names other modules and tests still use.
"""

from her2exp.core.fileio import atomic_write_text
from her2exp.reports.best import RunSummary, write_best_json
from her2exp.reports.checklist import (
    checklist_item,
    checklist_table,
    clinical_checklist,
    thresholds_from_validation,
)
from her2exp.reports.clinical import write_clinical_report
from her2exp.reports.figures import (
    plot_confusion_matrices,
    plot_decision_curves,
    plot_error_gallery,
    plot_level_rocs,
    plot_precision_recall,
    plot_reliability,
    plot_roc_ci,
    plot_roc_folds,
    pyplot,
    save_figure,
)
from her2exp.reports.formatting import SPLIT_TITLES, ci, fmt, split_title
from her2exp.reports.galleries import plot_explained_galleries, plot_galleries
from her2exp.reports.summary import clinical_markdown

# The old private names (evaluation.crossval, tests/stream_rss_entry.py).
_ci, _fmt, _pyplot, _save, _plot_galleries = ci, fmt, pyplot, save_figure, plot_galleries

__all__ = [
    "SPLIT_TITLES",
    "atomic_write_text",
    "checklist_item",
    "checklist_table",
    "ci",
    "clinical_checklist",
    "clinical_markdown",
    "fmt",
    "plot_confusion_matrices",
    "plot_decision_curves",
    "plot_error_gallery",
    "plot_explained_galleries",
    "plot_galleries",
    "plot_level_rocs",
    "plot_precision_recall",
    "plot_reliability",
    "plot_roc_ci",
    "plot_roc_folds",
    "pyplot",
    "save_figure",
    "split_title",
    "thresholds_from_validation",
    "write_best_json",
    "RunSummary",
    "write_clinical_report",
]
