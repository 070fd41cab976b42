"""The kNN head of `probe=knn`: the nearest training embeddings vote, nothing is trained.

It sits with the other heads (`models.backbones.build` puts it on the backbone when
`model.head=knn`); its fit step, which needs the trainer, stays in `training.probe`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from her2exp.core.errors import ConfigError

#: The log-probability a unanimous vote gives the other class: exp(-30) ~ 1e-13, so the
#: softmax is the vote fraction to float32 precision (a unanimous 1.0 stays 1.0) while the
#: cross-entropy of a confident miss stays finite (30) instead of inf.
LOG_FLOOR = -30.0


class KNNHead(nn.Module):
    """k nearest training embeddings by cosine similarity, each with one vote: P(HER2+) is the
    fraction of HER2+ neighbours, as scikit-learn's `KNeighborsClassifier(n_neighbors=k,
    metric="cosine").predict_proba` gives (tests/training/test_probe.py checks it). Logits are
    `[log(1 - p), log(p)]` (floored at LOG_FLOOR), so softmax column 1 is p.

    The bank (unit-normalised training embeddings) and its labels are buffers: they travel in
    every checkpoint, and loading resizes them to what the file holds.
    """

    def __init__(self, in_features: int, k: int) -> None:
        super().__init__()
        self.k = int(k)
        self.register_buffer("bank", torch.zeros(0, in_features))
        self.register_buffer("bank_labels", torch.zeros(0, dtype=torch.long))

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Store the training embeddings (N, D) and their labels (N,)."""
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} embeddings but {len(labels)} labels")
        if self.k > len(features):
            raise ConfigError(
                f"probe.k={self.k} (model.knn_k) is more than the {len(features)} training "
                "embeddings: choose k <= the training split's size"
            )
        device = self.bank.device
        self.bank = F.normalize(features.detach().float(), dim=1).to(device)
        self.bank_labels = torch.as_tensor(labels, dtype=torch.long).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.bank):  # not fitted (the dummy forward of build_model): p = 0.5
            return torch.zeros(len(x), 2, device=x.device, dtype=torch.float32)
        sims = F.normalize(x.float(), dim=1) @ self.bank.T
        idx = sims.topk(min(self.k, len(self.bank)), dim=1).indices
        p = self.bank_labels[idx].float().mean(dim=1)
        return torch.stack([torch.log1p(-p), torch.log(p)], dim=1).clamp_min(LOG_FLOOR)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in ("bank", "bank_labels"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"k={self.k}, bank={tuple(self.bank.shape)}"
