"""The one Scorer: every way from a trained run's inputs to its probabilities goes through here
(docs/architecture.md, "Scoring").

A run is scored as it was trained: its fitted stain step placed where training ran it (on the
device, or on the host before the batch moves), its mean/std and memory format, its autocast
dtype, its TTA views and its frozen calibration. The end-of-training test (training.final,
through `calibrated`), her2exp-eval and CV pooling (`score`), ensembles (one Scorer per member),
her2exp-predict on folders and slides, the served MLflow model and the export's reference check
(`Scorer.probabilities` on uint8 batches) and MIL bags (`Scorer.embed`, then `for_features`)
all get their numbers from it, so a patch scored twice, the same batch around it, gets one
probability however it came - the served answer is the one the test table was validated on.

Built for what comes next: `class_probabilities` gives every class of a head (an ordinal HER2
score head has four), and `for_features` scores precomputed embeddings (a feature store) with
the same calibration, no pixels involved. P(HER2+) is the positive class of a binary head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from her2exp import data, metrics
from her2exp.data.sources import resize_patch  # decoded as in training
from her2exp.engine import Preprocess, Scores, StepPolicy, features, view_logits
from her2exp.engine import score as score_pass
from her2exp.engine.scoring import POSITIVE_CLASS, mean_class_probabilities
from her2exp.evaluation.trained_run import TrainedRun, load_model, run_stain
from her2exp.runtime.amp import resolve_amp
from her2exp.stain.pipeline import StainCollate

log = logging.getLogger("her2exp")


def calibrate(probs: np.ndarray, calibration: dict[str, Any] | None) -> np.ndarray:
    """A run's frozen calibration applied to its P(HER2+): the one place it is applied (the
    thresholds were chosen on calibrated scores, so every caller must see the same ones)."""
    return np.asarray(metrics.apply_calibration(probs, calibration), dtype=np.float64)


def calibrated(scores: Scores, calibration: dict[str, Any] | None) -> Scores:
    """`scores` with `calibration` applied in place; `.uncalibrated` keeps the model's own
    (for the before/after report). {"method": "none"} leaves them untouched."""
    if (calibration or {}).get("method", "none") != "none":
        scores.uncalibrated = scores.probs
        scores.probs = calibrate(scores.probs, calibration)
    return scores


def resolved_tta(run: TrainedRun, tta: str | None) -> str:
    """The views to score (`tta` null: the run's own); another setting than the run's is warned
    about once, here: its thresholds were chosen on the run's own views."""
    views = tta or run.tta
    if views != run.tta:
        log.warning(
            "TTA views %s: %s chose its thresholds on tta=%s scores; they are applied to tta=%s "
            "scores here",
            views,
            run.source,
            run.tta,
            views,
        )
    return views


@dataclass
class Scorer:
    """A trained run's model with its input path, precision, views and calibration."""

    model: torch.nn.Module
    device: torch.device
    preprocess: Preprocess  # mean/std, channels_last, and the stain when trained on the device
    autocast_dtype: torch.dtype | None
    stain: Any  # the stain step where training ran it on the host (loader workers), or None
    amp: str  # the trainer.amp setting used
    tta: str = "none"  # the views scored (engine.tta_views)
    calibration: dict[str, Any] | None = None  # frozen on val: applied to every P(HER2+)

    @torch.no_grad()
    def class_probabilities(self, x: torch.Tensor) -> np.ndarray:
        """(N, C) uncalibrated class probabilities of a uint8 NCHW batch (a float feature batch
        for a `for_features` scorer): the mean over the TTA views."""
        self.model.eval()
        if self.stain is not None:
            x = self.stain(x, False)  # on the host, as the loader workers ran it in training
        policy = StepPolicy(autocast_dtype=self.autocast_dtype)
        logits = view_logits(self.model, self.preprocess(x), self.tta, policy)
        return mean_class_probabilities(logits).cpu().numpy().astype(np.float64)

    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        """Calibrated P(HER2+) of a batch: what the run's thresholds apply to."""
        return calibrate(self.class_probabilities(x)[:, POSITIVE_CLASS], self.calibration)

    def score(
        self,
        loader: torch.utils.data.DataLoader,
        criterion: torch.nn.Module | None = None,
        desc: str = "scoring",
        leave: bool = True,
    ) -> Scores:
        """Every sample of a loader, in loader order, calibrated (`.uncalibrated` kept): uint8
        patches whose host stain step the loader's collate ran (`score` builds that loader), or
        feature batches. `criterion`: the loss summed into `Scores.loss_sum` (validation);
        `desc`, `leave`: the pass's progress bar (engine.score)."""
        scores = score_pass(
            self.model,
            loader,
            self.preprocess,
            self.autocast_dtype,
            criterion,
            self.tta,
            desc,
            leave,
        )
        return calibrated(scores, self.calibration)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) float32 embeddings on the CPU of a uint8 NCHW batch through the run's stain and
        input path (engine.features.embed_batch, the feature cache's own step): what a MIL head
        or a feature store takes."""
        return features.embed_batch(self.model, x, self.preprocess, self.stain, self.autocast_dtype)

    def for_features(self, head: torch.nn.Module | None = None) -> Scorer:
        """This scorer over precomputed embeddings: `head` (the model's own head by default)
        on float batches that only move to the device; no stain, no views (an embedding has
        no orientation), the same precision and calibration."""
        return replace(
            self,
            model=head if head is not None else self.model.head,
            preprocess=Preprocess(self.device),
            stain=None,
            tta="none",
        )


def build_scorer(
    run: TrainedRun,
    amp: str | None = None,
    seed: int = 0,
    tta: str | None = None,
    device: torch.device | None = None,
    model: torch.nn.Module | None = None,
) -> Scorer:
    """The run's Scorer: `amp` null means the run's own trainer.amp, resolved as in training
    (fp32 on the CPU unless bf16 was asked; bf16/fp16 autocast on CUDA); `tta` null the run's
    own evaluation.tta; the run's stain placed as trained (`stain.on_device`), its
    `model.channels_last`, its frozen calibration always. `model`: the run's network already
    built (the export wraps it); by default loaded from best.pt onto `device`."""
    cfg = run.cfg
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stain = run_stain(run, seed)  # refused when a Macenko run lost its fitted reference
    model = model if model is not None else load_model(run, device)
    model.eval()
    amp = amp or cfg.trainer.get("amp", "off")
    dtype, _ = resolve_amp(amp, device)
    on_device = stain is not None and bool(cfg.stain.get("on_device", False))
    preprocess = Preprocess(
        device,
        tuple(cfg.data.mean),
        tuple(cfg.data.std),
        channels_last=bool(cfg.model.get("channels_last", False)),
        stain=stain.to(device) if on_device else None,  # the run's own fitted reference
    )
    stain = None if on_device else stain
    views = resolved_tta(run, tta)
    return Scorer(model, device, preprocess, dtype, stain, amp, views, run.calibration)


def score(
    scorer: Scorer,
    bundle: Any,
    split: str | None,
    data_cfg: DictConfig,
    seed: int,
    desc: str = "scoring",
) -> Scores:
    """The scorer over one split of `bundle` (None: all of it), the host stain step run by the
    loader's collate, in the workers, where training ran it. `desc`: its progress bar's."""
    dataset = data.make_dataset(bundle, split, data_cfg, seed)
    collate = None if scorer.stain is None else StainCollate(scorer.stain, False, dataset)
    loader = data.eval_loader(dataset, data_cfg, scorer.device, collate_fn=collate)
    return scorer.score(loader, desc=desc)


def prepare_patches(images: list[np.ndarray] | np.ndarray, image_size: int) -> torch.Tensor:
    """RGB uint8 patches, each (H, W, 3) of any size, -> one uint8 NCHW batch at the run's
    `image_size`: the resize training applies after decoding (sources.resize_patch), shared by
    predict, the served MLflow model and export's inputs; the Scorer does the rest."""
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
