"""The scoring pass: every sample once, in loader order, with the test-time views (`tta`) of
final evaluation, her2exp-eval and her2exp-predict computed by one view loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from her2exp.core import progress
from her2exp.engine.preprocess import Preprocess
from her2exp.engine.step import StepPolicy


@dataclass
class Scores:
    """HER2+ probabilities and labels in loader order, plus the summed loss and count."""

    probs: np.ndarray
    labels: np.ndarray
    loss_sum: float
    n: int
    # The probabilities before temperature scaling, where a calibration was applied
    # (evaluation.score); None: `probs` are the model's own.
    uncalibrated: np.ndarray | None = None

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n if self.n else math.nan


def tta_views(x: torch.Tensor, tta: str = "none") -> list[torch.Tensor]:
    """The views of a batch a model scores. `d4`: the 8 symmetries of the square (rot90 by
    k = 0..3 in the image plane, each as is and flipped left-right); a patch of tissue has no
    up or left, so every view is as much the patch as the original (training flips it so)."""
    if tta == "none":
        return [x]
    if tta != "d4":
        raise ValueError(f"tta={tta!r}: none or d4")
    views = []
    for k in range(4):
        turned = torch.rot90(x, k, dims=(-2, -1))
        views += [turned, turned.flip(-1)]
    return views


def view_logits(
    model: nn.Module, x: torch.Tensor, tta: str, policy: StepPolicy | None = None
) -> list[torch.Tensor]:
    """float logits of every view of a (preprocessed) batch: the one view loop of scoring,
    shared by engine.score (final evaluation, her2exp-eval) and her2exp-predict."""
    policy = policy or StepPolicy()
    out = []
    for view in tta_views(x, tta):
        with policy.autocast(x.device):
            out.append(model(view).float())
    return out


#: The class whose probability is P(HER2+) in a binary head: (HER2-, HER2+).
POSITIVE_CLASS = 1


def mean_class_probabilities(logits: list[torch.Tensor]) -> torch.Tensor:
    """(N, C) class probabilities averaged over the views (the mean of probabilities, not of
    logits), for a head of any number of classes."""
    return torch.stack([torch.softmax(v, dim=1) for v in logits]).mean(0)


def mean_probability(logits: list[torch.Tensor]) -> torch.Tensor:
    """P(HER2+) averaged over the views: the positive class of `mean_class_probabilities`."""
    return mean_class_probabilities(logits)[:, POSITIVE_CLASS]


@torch.no_grad()
def score(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    preprocess: Preprocess,
    autocast_dtype: torch.dtype | None = None,
    criterion: nn.Module | None = None,
    tta: str = "none",
    desc: str = "scoring",
    leave: bool = True,
) -> Scores:
    """Score every sample once, in loader order (the loader must not shuffle). With `tta=d4`
    the probability is the mean over the 8 views and the loss the mean of the views' losses.
    `desc`, `leave`: its progress bar (core.progress), the pass of a cohort can take hours."""
    model.eval()
    device = preprocess.device
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    policy = StepPolicy(autocast_dtype=autocast_dtype)
    probs, labels = [], []
    loss_sum, n = torch.zeros((), dtype=torch.float64, device=device), 0
    for x, y, *_ in progress.bar(loader, desc=desc, unit="batch", leave=leave):
        x, y = preprocess(x), y.to(device, non_blocking=True)
        logits = view_logits(model, x, tta, policy)
        for v in logits:
            loss_sum += criterion(v, y).double() * y.shape[0] / len(logits)
        n += y.shape[0]
        probs.append(mean_probability(logits).cpu())
        labels.append(y.cpu())
    return Scores(
        probs=torch.cat(probs).numpy().astype(np.float64) if probs else np.zeros(0),
        labels=torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64),
        loss_sum=float(loss_sum),
        n=n,
    )
