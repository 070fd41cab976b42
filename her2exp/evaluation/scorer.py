"""The run's scoring pass as training scored: `Scorer` (its model, input path, AMP, stain
reference, TTA views and frozen calibration) and `score` over one split of a data bundle.
(engine.score is the pass alone; predict and the served model score uint8 batches through
evaluation.patch_scoring.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from her2exp import data, metrics
from her2exp.engine import Preprocess
from her2exp.engine import score as score_pass
from her2exp.evaluation.trained_run import TrainedRun, load_model, run_stain
from her2exp.runtime.amp import resolve_amp
from her2exp.stain.pipeline import StainCollate


@dataclass
class Scorer:
    """The run's model with the run's input pipeline, AMP and stain reference."""

    model: torch.nn.Module
    device: torch.device
    preprocess: Any  # engine.Preprocess: the one input path
    autocast_dtype: torch.dtype | None
    stain: Any  # stain pipeline run in the loader workers, or None
    amp: str  # the trainer.amp setting used
    tta: str = "none"  # the views scored (engine.tta_views)
    calibration: dict[str, Any] | None = None  # frozen on val: applied to every score


def build_scorer(run: TrainedRun, amp: str | None, seed: int, tta: str | None = None) -> Scorer:
    """Model + engine.Preprocess as training scored: `amp` null means the run's own trainer.amp, which
    resolves as in training (fp32 on the CPU, bf16/fp16 autocast on CUDA); `tta` null the
    run's own evaluation.tta; the run's frozen calibration always."""
    cfg = run.cfg
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stain = run_stain(run, seed)
    model = load_model(run, device)
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
    return Scorer(model, device, preprocess, dtype, stain, amp, tta or run.tta, run.calibration)


def score(scorer: Scorer, bundle: Any, split: str | None, data_cfg: DictConfig, seed: int) -> Any:
    """engine.score over one split of `bundle` (None: all of it), stain placed as in training,
    the scorer's TTA views averaged and its frozen calibration applied (`.uncalibrated` keeps
    the model's own probabilities)."""
    dataset = data.make_dataset(bundle, split, data_cfg, seed)
    collate = None if scorer.stain is None else StainCollate(scorer.stain, False, dataset)
    loader = data.eval_loader(dataset, data_cfg, scorer.device, collate_fn=collate)
    scores = score_pass(
        scorer.model, loader, scorer.preprocess, scorer.autocast_dtype, tta=scorer.tta
    )
    if (scorer.calibration or {}).get("method", "none") != "none":
        scores.uncalibrated = scores.probs
        scores.probs = metrics.apply_calibration(scores.probs, scorer.calibration)
    return scores
