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
    `label_smoothing` (eps) smooths the targets as F.cross_entropy does, q_c = y_c (1 - eps) +
    eps / K, in the focal term: FL = -sum_c q_c v_c (1 - p_c)^gamma log p_c / sum v_y, with v_c
    the class's alpha times its weight. eps=0 is the loss above; gamma=0 is
    F.cross_entropy(weight=..., label_smoothing=eps).
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | None = None,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
        self.gamma = gamma
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight if weight is not None else None)

    def _class_factors(self, n_classes: int, device: torch.device) -> torch.Tensor:
        """v_c: alpha for HER2+ (1 - alpha for HER2-) times the class weight; ones by default."""
        v = torch.ones(n_classes, device=device)
        if self.alpha is not None:
            v = torch.where(torch.arange(n_classes, device=device) == 1, self.alpha, 1 - self.alpha)
        if self.weight is not None:
            v = self.weight.to(device) * v
        return v

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        k = log_p.shape[1]
        v = self._class_factors(k, log_p.device)
        q = F.one_hot(target, k).float() * (1.0 - self.label_smoothing) + self.label_smoothing / k
        focal = -((1.0 - log_p.exp()) ** self.gamma) * log_p  # per class: (1 - p_c)^g (-log p_c)
        return (q * v * focal).sum() / v[target].sum()


def build(cfg: DictConfig, train_labels: np.ndarray) -> nn.Module:
    weight = class_weights(train_labels) if cfg.use_class_weights else None
    if cfg.name == "focal":
        return FocalLoss(
            gamma=cfg.gamma, alpha=cfg.alpha, weight=weight, label_smoothing=cfg.label_smoothing
        )
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
