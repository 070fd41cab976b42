"""Cross-entropy and focal loss for the binary HER2 task, with class weights from the train split."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn


def class_weights(labels: np.ndarray, num_classes: int = 2) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1, so the loss scale stays comparable.

    w_c = (N / (K * n_c)) for the N train labels over K classes; a class absent from train would
    make the weight infinite, so it is rejected.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(float)
    if (counts == 0).any():
        missing = [c for c in range(num_classes) if counts[c] == 0]
        raise ValueError(f"class weights need every class in the train split; missing {missing}")
    weights = counts.sum() / (num_classes * counts)
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): FL = -alpha_t (1 - p_t)^gamma log p_t, averaged over the batch.

    With gamma=0, alpha=None and no class weights it equals cross-entropy. Class weights multiply
    each sample's term and the mean is normalised by the summed weights, as F.cross_entropy does.
    """

    def __init__(
        self, gamma: float = 2.0, alpha: float | None = None, weight: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        log_pt = log_p.gather(1, target.unsqueeze(1)).squeeze(1)
        pt = log_pt.exp()
        loss = -((1.0 - pt) ** self.gamma) * log_pt
        w = torch.ones_like(loss)
        if self.alpha is not None:
            w = torch.where(target == 1, self.alpha, 1.0 - self.alpha) * w
        if self.weight is not None:
            w = self.weight.to(loss.device)[target] * w
        return (w * loss).sum() / w.sum()


def build(cfg: DictConfig, train_labels: np.ndarray) -> nn.Module:
    weight = class_weights(train_labels) if cfg.use_class_weights else None
    if cfg.name == "focal":
        return FocalLoss(gamma=cfg.gamma, alpha=cfg.alpha, weight=weight)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
