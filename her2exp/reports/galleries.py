"""The false-negative and false-positive galleries of a split, plain or under the explainer's
maps: which patches the model missed, worst first, so a reader sees what it got wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from her2exp.core.fileio import safe_name
from her2exp.metrics import misclassified
from her2exp.reports.figures import plot_error_gallery
from her2exp.reports.overlay import overlay


def plot_galleries(
    report_dir: Path,
    galleries: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]],
    max_gallery: int,
) -> list[Path]:
    """False-negative (lowest score first) and false-positive (highest first) galleries; file
    names carry the split's name through `safe_name` (a cohort_name is the user's text)."""
    figures = []
    for name, (images, labels, scores, threshold) in galleries.items():
        images = images if hasattr(images, "shape") else np.asarray(images)  # a RowView stays lazy
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] != len(scores):
            raise ValueError(
                f"gallery {name!r}: images must be (N, H, W, 3) with N = {len(scores)}; "
                f"got {images.shape}"
            )
        fn, fp = misclassified(labels, scores, threshold)
        s = np.asarray(scores, dtype=np.float64)
        t = f"t={threshold:.3f}"
        figures += [
            plot_error_gallery(
                report_dir / f"false_negatives_{safe_name(name)}.png",
                images,
                s,
                fn,
                f"{name}: HER2+ called HER2- at {t}, lowest score first",
                max_gallery,
            ),
            plot_error_gallery(
                report_dir / f"false_positives_{safe_name(name)}.png",
                images,
                s,
                fp,
                f"{name}: HER2- called HER2+ at {t}, highest score first",
                max_gallery,
            ),
        ]
    return figures


def plot_explained_galleries(
    report_dir: Path,
    galleries: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]],
    max_gallery: int,
    explainer: Any,
) -> list[Path]:
    """The false-negative and false-positive galleries again, each patch under the map of where
    the model saw HER2+ (`explain.Explainer`: Grad-CAM for CNNs, a token map for ViTs), as
    `false_{negatives,positives}_<method>_<split>.png`; only the patches shown are explained."""
    figures = []
    for name, (images, labels, scores, threshold) in galleries.items():
        fn, fp = misclassified(labels, scores, threshold)
        s = np.asarray(scores, dtype=np.float64)
        for kind, idx, order in (("negatives", fn, "lowest"), ("positives", fp, "highest")):
            shown = np.asarray(idx)[:max_gallery]
            overlays: dict[int, np.ndarray] = {}
            if shown.size:
                patches = np.stack([images[int(i)] for i in shown])
                heat = explainer(patches)
                overlays = {
                    int(i): overlay(p, m) for i, p, m in zip(shown, patches, heat, strict=True)
                }
            called = "HER2+ called HER2-" if kind == "negatives" else "HER2- called HER2+"
            figures.append(
                plot_error_gallery(
                    report_dir / f"false_{kind}_{explainer.method}_{safe_name(name)}.png",
                    overlays,
                    s,
                    idx,
                    f"{name}: {called} at t={threshold:.3f}, {order} score first; "
                    + explainer.describe(),
                    max_gallery,
                )
            )
    return figures
