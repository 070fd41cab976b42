"""Bag heads over cached tile embeddings: `mil=mean_pool|max_pool|abmil`.

A bag (a patient's or a slide's tiles) is a padded (B, n, D) batch and a (B, n) mask (True = a
real tile). Every head has one shape: embeddings -> a small projection (Linear, ReLU, dropout)
-> per-instance weights `attention` (B, n) summing to 1 over the bag's real tiles -> the weighted
sum of the projected tiles -> a linear classifier to 2 logits. The heads differ only in how the
weights are drawn:

- `mean_pool`: uniform over the real tiles;
- `max_pool`: one-hot on the tile whose own HER2+ log-odds (the classifier on that tile alone,
  logit 1 - logit 0) is highest, so the bag's logits are that tile's (max-pooling MIL);
- `abmil`: the gated attention of Ilse et al. 2018 (arXiv:1802.04712, eq. 9),
  ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))``, or ``w^T tanh(V h_k)`` with
  `gated=false` (eq. 8).

Padding never changes a score: padded embeddings are zeroed before the projection (a NaN in a
padding slot cannot leak through 0 * NaN), the softmax and the arg-max see only real tiles and
the weights of padding are exactly 0. A bag without any real tile (never built on purpose) gets
all-zero weights and the classifier's bias, not NaN, so no host sync is needed to check it.
The attention softmax runs in float32 under autocast.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from her2exp.config import ConfigError

HEADS = ("mean_pool", "max_pool", "abmil")


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the real instances of each bag (float32); exactly 0 on padding and on a bag
    without real instances."""
    scores = scores.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    weights = torch.softmax(scores, dim=1) * mask
    # Renormalised so a bag with no real instance sums to 0 instead of spreading over padding.
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


class GatedAttention(nn.Module):
    """Unnormalised attention scores w^T (tanh(V h) * sigmoid(U h)) (gated) or w^T tanh(V h)."""

    def __init__(self, in_features: int, attention_dim: int, gated: bool = True) -> None:
        super().__init__()
        self.tanh_branch = nn.Sequential(nn.Linear(in_features, attention_dim), nn.Tanh())
        self.gate = (
            nn.Sequential(nn.Linear(in_features, attention_dim), nn.Sigmoid()) if gated else None
        )
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, h: Tensor) -> Tensor:
        """(B, n, hidden) -> (B, n) scores."""
        a = self.tanh_branch(h)
        if self.gate is not None:
            a = a * self.gate(h)
        return self.score(a).squeeze(-1)


class BagHead(nn.Module):
    """Projection -> attention weights -> weighted sum -> 2 logits (the module docstring)."""

    def __init__(
        self,
        kind: str,
        in_features: int,
        hidden: int = 128,
        attention_dim: int = 128,
        dropout: float = 0.25,
        gated: bool = True,
    ) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ConfigError(f"mil.name={kind!r} is not a bag head: one of {', '.join(HEADS)}")
        self.kind = kind
        self.in_features = in_features
        self.project = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden, attention_dim, gated) if kind == "abmil" else None
        self.classifier = nn.Linear(hidden, 2)

    def weights(self, h: Tensor, mask: Tensor) -> Tensor:
        """(B, n) float32 weights summing to 1 over each bag's real instances, 0 on padding."""
        if self.attention is not None:
            return masked_softmax(self.attention(h), mask)
        if self.kind == "mean_pool":
            return masked_softmax(torch.zeros(mask.shape, device=h.device), mask)
        logits = self.classifier(h).float()
        log_odds = (logits[..., 1] - logits[..., 0]).masked_fill(~mask, float("-inf"))
        best = log_odds.argmax(dim=1, keepdim=True)
        one_hot = torch.zeros(mask.shape, device=h.device).scatter_(1, best, 1.0)
        return one_hot * mask  # a bag without real instances: all 0

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, n, D) float, mask (B, n) bool (True = real) -> (logits (B, 2), attention (B, n))."""
        if x.dim() != 3 or mask.shape != x.shape[:2]:
            raise ValueError(
                f"bag head: x must be (B, n, D) and mask (B, n); got {tuple(x.shape)} and "
                f"{tuple(mask.shape)}"
            )
        mask = mask.bool()
        h = self.project(x.masked_fill(~mask.unsqueeze(-1), 0.0))
        attention = self.weights(h, mask)
        pooled = torch.einsum("bn,bnd->bd", attention.to(h.dtype), h)
        return self.classifier(pooled), attention


def build_head(mil_cfg: Any, in_features: int) -> BagHead:
    """The head `mil_cfg.name` names, over `in_features`-dim embeddings (the backbone's)."""
    return BagHead(
        str(mil_cfg.name),
        int(in_features),
        hidden=int(mil_cfg.hidden),
        attention_dim=int(mil_cfg.attention_dim),
        dropout=float(mil_cfg.dropout),
        gated=bool(mil_cfg.gated),
    )
