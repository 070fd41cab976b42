"""Files a reviewer opens: best.json, summary.md and ROC plots. Written atomically, rank 0 only."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_text(path: Path, text: str) -> Path:
    """Write via a temp file + os.replace so a crash never leaves half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_best_json(path: Path, summary: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(_clean(summary), indent=2, sort_keys=False) + "\n")


def _row(name: str, rep: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    return (
        f"| {name} | {rep['n']} | {rep['n_pos']} | {f(rep['auc'])} | {f(rep['threshold'])} | "
        f"{f(rep['sensitivity'])} | {f(rep['specificity'])} | {f(rep['precision'])} | "
        f"{f(rep['npv'])} | {f(rep['f1'])} | {rep['tp']}/{rep['fn']}/{rep['fp']}/{rep['tn']} |"
    )


def write_summary_md(path: Path, summary: dict[str, Any]) -> Path:
    lines = [
        f"# her2exp run summary ({summary['model']})",
        "",
        f"Best epoch {summary['best_epoch']} of {summary['last_epoch']} by validation AUC "
        f"({summary['best_val_auc']:.4f}). The Youden threshold "
        f"{summary['threshold_youden_val']:.4f} was chosen on **validation** and frozen; the "
        "test rows below are scored at it (and at 0.5), never re-tuned on test.",
        "",
        "| split @ threshold | n | HER2+ | AUC | threshold | sensitivity | specificity | "
        "PPV | NPV | F1 | TP/FN/FP/TN |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rep in summary["tables"].items():
        lines.append(_row(name, rep))
    lines += ["", f"Data fingerprint: `{summary.get('data_fingerprint', 'n/a')}`", ""]
    return atomic_write_text(path, "\n".join(lines))


def plot_roc(
    path: Path,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    points: dict[str, tuple[float, float]],
) -> Path:
    """ROC of each split with the frozen operating points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    for name, (labels, scores) in curves.items():
        if np.unique(labels).size < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(labels, scores):.3f})")
    for name, (fpr, tpr) in points.items():
        ax.plot([fpr], [tpr], "o", label=name)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set_xlabel("1 - specificity (HER2- called HER2+)")
    ax.set_ylabel("sensitivity (HER2+ recall)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
