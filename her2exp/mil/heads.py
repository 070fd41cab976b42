"""MIL heads over padded bags (the contract: `build_head(mil_cfg, in_features)`).

TEMPORARY: a mean-pool head for every `mil.name`, to develop the bag pipeline against; the
`milio` part owns this file (mean_pool, max_pool, gated-attention ABMIL) and replaces it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MeanPool(nn.Module):
    """The mean of a bag's real instances, then a linear layer; uniform attention."""

    def __init__(self, in_features: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = mask.float() / mask.float().sum(1, keepdim=True).clamp_min(1.0)
        pooled = torch.einsum("bn,bnd->bd", weights, self.embed(x))
        return self.classifier(pooled), weights


def build_head(mil_cfg: Any, in_features: int) -> nn.Module:
    """The head `mil_cfg.name` names (here: always mean pool, see the module docstring)."""
    return MeanPool(in_features, int(mil_cfg.hidden), float(mil_cfg.dropout))
