"""Scoring uint8 patch batches as evaluation scores a split: the resize training applies after
decoding, then the run's stain pipeline (on the CPU), mean/std, TTA views and frozen
calibration. Shared by `her2exp-predict` (apps/predict.py), the served MLflow model
(evaluation/served.py) and ensembles of both, so a patch gets one score whichever way it comes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from her2exp import metrics
from her2exp.data.sources import resize_patch  # decoded as in training
from her2exp.engine import Preprocess, mean_probability, view_logits
from her2exp.evaluation.trained_run import TrainedRun, load_model, run_stain

log = logging.getLogger("her2exp")


def prepare_patches(images: list[np.ndarray] | np.ndarray, image_size: int) -> torch.Tensor:
    """RGB uint8 patches, each (H, W, 3) of any size, -> one uint8 NCHW batch at the run's
    `image_size`: the resize training applies after decoding (sources.resize_patch), shared by
    predict, the served MLflow model (her2exp/evaluation/served.py) and export's inputs. Stain,
    mean/std, TTA and calibration follow in `patch_probs`."""
    resized = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"patch {i}: {image.dtype} array of shape {image.shape}; expected uint8 (H, W, 3)"
            )
        resized.append(resize_patch(image, image_size))
    if not resized:
        raise ValueError("no patches")
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class Scoring:
    """How predict scores a batch: the run's model, stain pipeline (here on the CPU), input
    path (stain, then mean/std), TTA views and frozen calibration, as evaluation scores."""

    model: Any
    stain: Any
    preprocess: Preprocess
    tta: str = "none"
    calibration: dict[str, Any] | None = None


def patch_scorer(run: TrainedRun, tta: str | None = None) -> Scoring:
    """The run's Scoring; `tta` null: the run's own evaluation.tta (its thresholds were chosen
    on those views)."""
    stain = run_stain(run, 0)  # refused when a Macenko run lost its fitted reference
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(run, device)
    model.eval()
    preprocess = Preprocess(device, tuple(run.cfg.data.mean), tuple(run.cfg.data.std))
    if tta and tta != run.tta:
        log.warning("tta=%s: %s chose its thresholds on tta=%s scores", tta, run.source, run.tta)
    return Scoring(model, stain, preprocess, tta or run.tta, run.calibration)


def patch_probs(scoring: Scoring, x: torch.Tensor) -> list[float]:
    """P(HER2+) of a uint8 batch: the mean over the TTA views (engine.view_logits, the loop
    eval shares), then the run's calibration (the thresholds apply to calibrated scores)."""
    if scoring.stain is not None:
        x = scoring.stain(x, False)
    with torch.no_grad():
        logits = view_logits(scoring.model, scoring.preprocess(x), scoring.tta)
        probs = mean_probability(logits).cpu().numpy().astype(np.float64)
    return metrics.apply_calibration(probs, scoring.calibration).tolist()
