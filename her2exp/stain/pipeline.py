"""Stain handling as the data pipeline uses it: one callable over uint8 batches.

`stain=macenko` normalises every split to one reference (fitted on a reference image or on
training patches, saved with the run so evaluation uses the same one); `stain=hed_jitter`
augments the training split only; `stain=macenko_jitter` does both, normalisation first.
Jitter draws are keyed by (seed, epoch, dataset index) of each patch (seed.keyed_uniform), so
workers or the GPU, any rank count and a resumed run give every patch the same colours.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from her2exp import config
from her2exp.stain.hed import HedJitter
from her2exp.stain.macenko import MacenkoNormalizer

log = logging.getLogger(__name__)


def __getattr__(name: str) -> object:
    """Deprecated names, still importable with a warning (docs/architecture.md, "Data")."""
    if name == "STAIN_CHOICES":  # nobody read it: config.STAIN_CHOICES is what validation uses
        msg = "her2exp.stain.pipeline.STAIN_CHOICES is deprecated: use her2exp.config.STAIN_CHOICES"
        warnings.warn(msg, FutureWarning, stacklevel=2)
        return config.STAIN_CHOICES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class StainPipeline:
    """Macenko normalisation (all splits) and/or HED jitter (train only) on uint8 batches."""

    def __init__(
        self, normalizer: MacenkoNormalizer | None, jitter: HedJitter | None, seed: int
    ) -> None:
        self.normalizer, self.jitter, self.seed = normalizer, jitter, seed

    def __call__(
        self, batch: Tensor, train: bool, epoch: int = 0, index: Tensor | None = None
    ) -> Tensor:
        """Normalise, then (training) jitter each patch by its dataset `index`."""
        if self.normalizer is not None:  # what it skipped is counted once per run (builders)
            batch, _ = self.normalizer.normalize(batch)
        if train and self.jitter is not None:
            if index is None:
                raise ValueError("stain jitter needs the dataset index of every training patch")
            batch = self.jitter.keyed(batch, self.seed, epoch, index)
        return batch

    def to(self, device: torch.device) -> StainPipeline:
        if self.normalizer is not None:
            self.normalizer.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """What a run saves so that evaluation and prediction normalise exactly the same way."""
        return {"normalizer": None if self.normalizer is None else self.normalizer.state_dict()}


def _normalizer(cfg: DictConfig) -> MacenkoNormalizer:
    return MacenkoNormalizer(
        io=cfg.io,
        alpha=cfg.alpha,
        beta=cfg.beta,
        min_tissue_fraction=cfg.min_tissue_fraction,
        n_sample=cfg.n_sample,
        percentile_method=cfg.percentile_method,
        exact=cfg.exact,
        rescale=cfg.rescale,
    )


def _load_reference(path: str) -> Tensor:
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def build(cfg: DictConfig, train_images: np.ndarray | None, seed: int) -> StainPipeline | None:
    """Fit the pipeline for a training run: reference image, else `fit_patches` train patches."""
    if cfg.name == "none":
        return None
    normalizer = None
    if cfg.name in ("macenko", "macenko_jitter"):
        normalizer = _normalizer(cfg)
        if cfg.reference:
            normalizer.fit(_load_reference(cfg.reference))
        else:
            if train_images is None or not len(train_images):
                raise ValueError("stain.reference is null and there are no training patches to fit")
            rng = np.random.default_rng(seed)
            pick = rng.choice(len(train_images), min(cfg.fit_patches, len(train_images)), False)
            normalizer.fit(torch.from_numpy(train_images[np.sort(pick)]).permute(0, 3, 1, 2))
        log.info("stain: %r", normalizer)
    jitter = None
    if cfg.name in ("hed_jitter", "macenko_jitter"):
        jitter = HedJitter(sigma=cfg.sigma, shift_sigma=cfg.shift_sigma)
    return StainPipeline(normalizer, jitter, seed)


def from_state(cfg: DictConfig, state: dict[str, Any] | None, seed: int) -> StainPipeline | None:
    """The saved pipeline of a trained run (evaluation and prediction: no refitting).

    None when the run did not normalise (HED jitter is train-only). A Macenko run whose state
    lacks the fitted reference raises ValueError: scoring it unnormalised would be silently
    wrong."""
    if cfg.name not in ("macenko", "macenko_jitter"):
        return None
    if state is None or state.get("normalizer") is None:
        raise ValueError(
            f"the run was trained with stain={cfg.name} but the checkpoint holds no fitted stain "
            "reference (its 'stain' state), so its patches cannot be normalised as in training"
        )
    normalizer = _normalizer(cfg).load_state_dict(state["normalizer"])
    return StainPipeline(normalizer, None, seed)


class StainCollate:
    """collate_fn for `stain.on_device=false`: the pipeline runs in the DataLoader workers."""

    def __init__(self, pipeline: StainPipeline, train: bool, dataset: Any) -> None:
        self.pipeline, self.train, self.dataset = pipeline, train, dataset

    def __call__(self, samples: list[tuple[Tensor, Tensor, int]]) -> tuple[Tensor, ...]:
        x = torch.stack([s[0] for s in samples])
        y = torch.stack([torch.as_tensor(s[1]) for s in samples])
        idx = torch.as_tensor([s[2] for s in samples])
        x = self.pipeline(x, self.train, self.dataset.epoch, idx)
        return x, y, idx
