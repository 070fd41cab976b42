"""Loss functions: focal reduces to cross-entropy, class weights match hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from her2exp.models import losses


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(37, 2, generator=g) * 3, torch.randint(0, 2, (37,), generator=g)


def test_focal_gamma0_no_alpha_equals_cross_entropy(batch) -> None:
    logits, target = batch
    focal = losses.FocalLoss(gamma=0.0, alpha=None)(logits, target)
    torch.testing.assert_close(focal, F.cross_entropy(logits, target))


def test_focal_gamma0_with_class_weights_equals_weighted_cross_entropy(batch) -> None:
    logits, target = batch
    w = torch.tensor([0.4, 1.6])
    focal = losses.FocalLoss(gamma=0.0, weight=w)(logits, target)
    torch.testing.assert_close(focal, F.cross_entropy(logits, target, weight=w))


def test_focal_matches_formula_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 1])
    p = torch.softmax(logits, 1)
    pt = torch.stack([p[0, 0], p[1, 1]])
    alpha_t = torch.tensor([0.75, 0.25])  # alpha=0.25 weights HER2+, 1-alpha the HER2- sample
    expected = (alpha_t * -((1 - pt) ** 2) * pt.log()).sum() / alpha_t.sum()
    got = losses.FocalLoss(gamma=2.0, alpha=0.25)(logits, target)
    torch.testing.assert_close(got, expected)


def test_focal_down_weights_easy_examples() -> None:
    easy = torch.tensor([[5.0, -5.0]])
    hard = torch.tensor([[0.1, 0.0]])
    t = torch.tensor([0])
    fl, ce = losses.FocalLoss(gamma=2.0), torch.nn.CrossEntropyLoss()
    assert fl(easy, t) / ce(easy, t) < fl(hard, t) / ce(hard, t) < 1.0


def test_class_weights_on_known_labels() -> None:
    # 6 HER2- and 2 HER2+: inverse frequency N/(K n_c) = 8/12, 8/4 -> [2/3, 2], mean 4/3.
    w = losses.class_weights(np.array([0, 0, 0, 0, 0, 0, 1, 1]))
    torch.testing.assert_close(w, torch.tensor([0.5, 1.5]))
    assert w.mean().item() == pytest.approx(1.0)


def test_class_weights_refuse_missing_class() -> None:
    with pytest.raises(ValueError, match="missing \\[1\\]"):
        losses.class_weights(np.zeros(5, dtype=int))


def test_build_uses_train_labels_for_weights() -> None:
    cfg = OmegaConf.create(
        {
            "name": "ce",
            "use_class_weights": True,
            "label_smoothing": 0.0,
            "gamma": 2.0,
            "alpha": None,
        }
    )
    crit = losses.build(cfg, np.array([0, 0, 0, 1]))
    torch.testing.assert_close(crit.weight, losses.class_weights(np.array([0, 0, 0, 1])))
    cfg.name = "focal"
    assert isinstance(losses.build(cfg, np.array([0, 1])), losses.FocalLoss)
