"""The clinical figures, one function per PNG: ROC with its CI band (per level and across
cross-validation folds), precision-recall, confusion matrices, reliability, decision curves and
the error gallery. Plotting only: every number comes from ``her2exp.metrics``. Each file is
written atomically (``save_figure``); matplotlib is loaded on the first figure (``pyplot``), so
importing reports costs nothing where no figure is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from her2exp.core.fileio import atomic_write
from her2exp.metrics import LEVELS, Calibration, SplitEvaluation
from her2exp.reports.formatting import fmt, split_title


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Save a figure atomically and close it."""
    plt = pyplot()
    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    finally:
        plt.close(fig)


def plot_roc_ci(path: Path, evaluations: dict[str, Any], level: str = "tile") -> Path:
    """ROC per split, DeLong CI in the legend, a pointwise Wilson band on sensitivity at each
    FPR (see ``metrics.RocCurve``) and each frozen operating point marked. ``evaluations`` are
    split evaluations (tile level) or one level of each (``SplitEvaluation.levels()``)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=120)
    markers = "osD^vP*X"
    for name, ev in evaluations.items():
        if ev.roc is None:
            ax.plot([], [], " ", label=f"{name}: one class, ROC undefined")
            continue
        a = ev.auc
        (line,) = ax.plot(
            ev.roc.fpr,
            ev.roc.tpr,
            lw=1.5,
            label=f"{name} AUC {a.auc:.3f} (95% CI {fmt(a.low)}-{fmt(a.high)}, DeLong)",
        )
        ax.fill_between(
            ev.roc.band_fpr,
            ev.roc.band_low,
            ev.roc.band_high,
            step="post",
            color=line.get_color(),
            alpha=0.15,
            lw=0,
        )
        for j, (op, rep) in enumerate(ev.reports.items()):
            ax.plot(
                [1 - rep.specificity],
                [rep.sensitivity],
                markers[j % len(markers)],
                color=line.get_color(),
                mec="black",
                ms=6,
                label=f"{name} @ {op} ({rep.threshold:.3f})",
            )
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity (HER2- called HER2+)")
    ax.set_ylabel("sensitivity (HER2+ recall)")
    ax.set_title(f"{level}-level ROC; band: pointwise 95% Wilson CI of sensitivity", fontsize=9)
    ax.legend(loc="lower right", fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_roc_folds(path: Path, curves: dict[str, tuple[Any, Any]]) -> Path:
    """A cross-validation's ROC curves in one figure: each fold's (thin) and the pooled
    out-of-fold one (the last entry, thick). `curves` maps a legend label to (fpr, tpr)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=120)
    for i, (label, (fpr, tpr)) in enumerate(curves.items()):
        last = i == len(curves) - 1
        ax.plot(fpr, tpr, lw=2.5 if last else 1.0, alpha=1.0 if last else 0.7, label=label,
                color="black" if last else None)  # fmt: skip
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity (HER2- called HER2+)")
    ax.set_ylabel("sensitivity (HER2+ recall)")
    ax.set_title("tile-level ROC of each fold's test split and the pooled out-of-fold", fontsize=9)
    ax.legend(loc="lower right", fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_precision_recall(path: Path, evaluations: dict[str, SplitEvaluation]) -> Path:
    """Precision-recall per split with its average precision and the prevalence baseline."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=120)
    for name, ev in evaluations.items():
        if ev.pr is None:
            ax.plot([], [], " ", label=f"{name}: one class, PR undefined")
            continue
        (line,) = ax.plot(
            ev.pr.recall,
            ev.pr.precision,
            drawstyle="steps-post",
            label=f"{name} AP {ev.pr.average_precision:.3f}",
        )
        ax.axhline(ev.pr.prevalence, ls=":", lw=1, color=line.get_color())
        for op, rep in ev.reports.items():
            if math.isfinite(rep.precision):
                ax.plot([rep.sensitivity], [rep.precision], "o", color=line.get_color(), mec="k")
                ax.annotate(op, (rep.sensitivity, rep.precision), fontsize=6)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("recall (HER2+ sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_title("Precision-recall (dotted: prevalence)", fontsize=9)
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion_matrices(path: Path, evaluation: SplitEvaluation, title: str) -> Path:
    """One confusion-matrix panel per operating point (rows: truth, columns: prediction)."""
    plt = pyplot()
    k = len(evaluation.reports)
    fig, axes = plt.subplots(1, k, figsize=(3.2 * k, 3.4), dpi=120, squeeze=False)
    for ax, (op, rep) in zip(axes[0], evaluation.reports.items(), strict=True):
        cm = np.array([[rep.tn, rep.fp], [rep.fn, rep.tp]])
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
        for (r, c), v in np.ndenumerate(cm):
            colour = "white" if v > cm.max() / 2 else "black"
            ax.text(c, r, str(v), ha="center", va="center", color=colour, fontsize=11)
        ax.set_xticks([0, 1], ["HER2-", "HER2+"])
        ax.set_yticks([0, 1], ["HER2-", "HER2+"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(
            f"{op} t={rep.threshold:.3f}\nsens {fmt(rep.sensitivity)} spec {fmt(rep.specificity)}",
            fontsize=8,
        )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_reliability(
    path: Path,
    evaluations: dict[str, SplitEvaluation],
    before: dict[str, Calibration] | None = None,
) -> Path:
    """Reliability diagram: observed HER2+ fraction vs mean predicted probability per bin;
    with a recalibrated run, each split's curve before (`before`, dashed) and after."""
    plt = pyplot()
    before = before or {}
    fig, ax = plt.subplots(figsize=(5.0, 5.0), dpi=120)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfect calibration")
    for i, (name, ev) in enumerate(evaluations.items()):
        colour = f"C{i}"
        if name in before:
            b = before[name]
            ax.plot(
                b.prob_pred,
                b.prob_true,
                "x--",
                ms=4,
                color=colour,
                alpha=0.6,
                label=f"{name} uncalibrated Brier {b.brier:.3f}, ECE {b.ece:.3f}",
            )
        c = ev.calibration
        after = " calibrated" if name in before else ""
        ax.plot(
            c.prob_pred,
            c.prob_true,
            "o-",
            ms=4,
            color=colour,
            label=f"{name}{after} Brier {c.brier:.3f}, ECE {c.ece:.3f} ({c.n_bins} bins)",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted P(HER2+) in bin")
    ax.set_ylabel("observed HER2+ fraction in bin")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_decision_curves(path: Path, evaluations: dict[str, SplitEvaluation]) -> Path:
    """Net benefit of the model vs treat-all vs treat-none, one panel per split."""
    plt = pyplot()
    k = len(evaluations)
    fig, axes = plt.subplots(1, k, figsize=(4.5 * k, 4.0), dpi=120, squeeze=False)
    for ax, (name, ev) in zip(axes[0], evaluations.items(), strict=True):
        d = ev.decision_curve
        ax.plot(d.thresholds, d.net_benefit, lw=1.5, label="model")
        ax.plot(d.thresholds, d.treat_all, "--", lw=1, label="treat all as HER2+")
        ax.plot(d.thresholds, d.treat_none, ":", color="k", lw=1, label="treat none")
        ax.set_ylim(min(-0.05, -0.25 * d.prevalence), max(d.prevalence * 1.1, 0.05))
        ax.set_xlabel("threshold probability p_t")
        ax.set_ylabel("net benefit")
        ax.set_title(split_title(name), fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_error_gallery(
    path: Path,
    images: np.ndarray,
    scores: np.ndarray,
    indices: np.ndarray,
    title: str,
    max_images: int = 32,
    columns: int = 8,
) -> Path:
    """Patches at ``indices`` (already ordered worst first) with their HER2+ scores."""
    plt = pyplot()
    shown = np.asarray(indices)[:max_images]
    rows = max(1, math.ceil(shown.size / columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(1.6 * columns, 1.8 * rows + 0.5), dpi=100, squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), shown, strict=False):
        ax.imshow(images[i])
        ax.set_title(f"#{int(i)} p={scores[i]:.3f}", fontsize=7)
    if shown.size == 0:
        axes[0, 0].text(0, 0.5, "none", fontsize=12, transform=axes[0, 0].transAxes)
    fig.suptitle(f"{title} ({len(indices)} total, {shown.size} shown)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_level_rocs(report_dir: Path, evaluations: dict[str, SplitEvaluation]) -> list[Path]:
    """roc_slide.png and roc_patient.png: each split's ROC at that level."""
    figures = []
    for level in LEVELS[1:]:
        at_level = {n: ev.levels()[level] for n, ev in evaluations.items() if level in ev.levels()}
        if at_level:
            figures.append(plot_roc_ci(report_dir / f"roc_{level}.png", at_level, level))
    return figures
