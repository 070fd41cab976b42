"""evaluation.explain (issue 19, item 3): Grad-CAM for CNNs and token maps for ViTs through
captum, drawn over the false-negative/false-positive galleries. In-process, on toy models."""

from __future__ import annotations

import logging
from fnmatch import fnmatch

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from scipy.ndimage import binary_dilation
from torch import nn

from conftest import compose_train
from her2exp import reports
from her2exp.engine import Preprocess, explain
from her2exp.evaluation import PER_SPLIT_REPORTS
from her2exp.models import Her2Classifier

SIZE = 32
#: Mean/std 0.5: a grey pixel (128) is ~0 in every channel, pure red is (+1, -1, -1).
HALF = Preprocess(torch.device("cpu"), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class _RedDetector(nn.Module):
    """A hand-set CNN with timm's backbone interface: one 4x4/stride-4 conv that answers
    red-minus-green, then average pooling. Its HER2+ logit is the mean redness, so the only
    region its output depends on is where red was planted."""

    num_features = 1

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 4, stride=4, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0 / 16
            self.conv.weight[0, 1] = -1.0 / 16

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _red_detector() -> Her2Classifier:
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        head.bias.zero_()
    return Her2Classifier(_RedDetector(), head)


def _planted(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Grey patches, each with one 8x8 red square at a random place on the 4 px grid."""
    rng = np.random.default_rng(seed)
    images = np.full((n, SIZE, SIZE, 3), 128, dtype=np.uint8)
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    for k in range(n):
        r, c = rng.integers(0, (SIZE - 8) // 4 + 1, size=2) * 4
        images[k, r : r + 8, c : c + 8] = (255, 0, 0)
        masks[k, r : r + 8, c : c + 8] = True
    return images, masks


def _tiny_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=SIZE,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        **kwargs,
    )


def test_gradcam_highlights_the_region_the_output_depends_on() -> None:
    """The map peaks on the planted square and is near 0 away from it; the HER2- log-odds (which
    the square lowers) give an empty ReLU'd map: the maps are class-specific."""
    model = _red_detector()
    images, masks = _planted(6)
    explainer = explain.Explainer(model, HALF)
    assert explainer.method == "gradcam"
    heat = explainer(images)
    assert heat.shape == (6, SIZE, SIZE) and heat.dtype == np.float32
    for m, inside in zip(heat, masks, strict=True):
        assert inside.ravel()[m.argmax()]
        assert m[inside].mean() > 0.7
        far = ~binary_dilation(inside, iterations=5)  # beyond one 4 px feature cell of it
        assert m[far].max() < 0.05
    assert explainer.grid == (SIZE // 4, SIZE // 4)
    x = HALF(torch.from_numpy(images).permute(0, 3, 1, 2))
    negative, _ = explain.maps(model, x, target=0)
    assert np.all(negative == 0)


def test_a_timm_cnn_gives_overlays_of_the_patch_shape_in_range() -> None:
    """A random timm CNN: the explained function is the model's own, the maps are in [0, 1]
    at the patch's size, the overlays the patch's shape and dtype."""
    torch.manual_seed(0)
    backbone = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    model = Her2Classifier(backbone, nn.Linear(backbone.num_features, 2)).eval()
    images = np.random.default_rng(1).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    x = HALF(torch.from_numpy(images).permute(0, 3, 1, 2))
    torch.testing.assert_close(explain._Explained(model)(x), model(x))
    heat = explain.Explainer(model, HALF)(images)
    assert heat.shape == (5, SIZE, SIZE)
    assert heat.min() >= 0.0 and heat.max() <= 1.0 and heat.max() == pytest.approx(1.0)
    shown = explain.overlay(images[0], heat[0])
    assert shown.shape == images[0].shape and shown.dtype == np.uint8
    with pytest.raises(ValueError, match="does not match the patch"):
        explain.overlay(images[0], heat[0][:-1])


@pytest.mark.parametrize("embedding", ["pooled", "cls_mean"])
def test_a_vit_map_has_the_patch_grid_upsampled_to_the_image(embedding: str) -> None:
    """A tiny random ViT (32 px, 8 px patches): Grad-CAM on the last block's norm at the 4 x 4
    token grid, upsampled to 32 x 32; the hook leaves the model as it was."""
    vit = _tiny_vit()
    width = 64 if embedding == "cls_mean" else 32
    model = Her2Classifier(vit, nn.Linear(width, 2), embedding).eval()
    images = np.random.default_rng(2).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    x = HALF(torch.from_numpy(images).permute(0, 3, 1, 2))
    wrapped = explain._Explained(model)
    torch.testing.assert_close(wrapped(x), model(x))  # the grid round trip changes nothing
    wrapped.close()
    grid = explain.layer_map(model, x)
    assert tuple(grid.shape) == (3, 1, 4, 4) and grid.abs().sum() > 0
    explainer = explain.Explainer(model, HALF)
    assert explainer.method == "attention"
    heat = explainer(images)
    assert heat.shape == (3, SIZE, SIZE) and 0.0 <= heat.min() and heat.max() <= 1.0
    assert explainer.grid == (4, 4) and "attention at 4x4" in explainer.describe()
    assert not vit.blocks[-1].norm1._forward_hooks


def test_explain_is_on_by_default_off_in_smoke_and_in_sweeps_unless_named() -> None:
    assert compose_train().evaluation.explain is True
    assert compose_train(["experiment=smoke"]).evaluation.explain is False
    assert explain.sweep_default(True, multirun=False, overrides=[]) is True
    assert explain.sweep_default(True, multirun=True, overrides=["seed=1"]) is False
    for named in ("evaluation.explain=true", "++evaluation.explain=true"):
        assert explain.sweep_default(True, multirun=True, overrides=[named]) is True
    assert explain.sweep_default(False, multirun=True, overrides=[]) is False


def test_cached_features_skip_the_overlays_with_a_log_line(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="her2exp"):
        assert explain.build(_red_detector(), HALF, cached=True) is None
    assert "skipped with model.cache_features=true" in caplog.text
    assert explain.build(nn.Linear(2, 2), HALF, cached=False) is None
    assert isinstance(explain.build(_red_detector(), HALF, cached=False), explain.Explainer)


def test_the_galleries_are_drawn_again_under_the_maps(tmp_path) -> None:
    """Red patches score high: HER2- red ones are false positives, HER2+ grey ones false
    negatives; each gallery is drawn again under the maps (what write_clinical_report adds to
    its figures when evaluation.explain), named so that an evaluation without them removes
    them (evaluation.remove_stale_reports)."""
    images, _ = _planted(8, seed=3)
    images[4:] = 128  # grey: no signal
    labels = np.array([0, 0, 1, 1, 1, 1, 0, 0])
    model = _red_detector()
    x = HALF(torch.from_numpy(images).permute(0, 3, 1, 2))
    probs = torch.softmax(model(x), 1)[:, 1].detach().numpy()  # grey 0.5, red 0.56
    galleries = {"test": (images, labels, probs, 0.52)}
    explainer = explain.build(model, HALF, cached=False)
    paths = reports.plot_explained_galleries(tmp_path, galleries, 4, explainer)
    names = [p.name for p in paths]
    assert names == ["false_negatives_gradcam_test.png", "false_positives_gradcam_test.png"]
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100
        assert any(fnmatch(path.name, pattern) for pattern in PER_SPLIT_REPORTS)
