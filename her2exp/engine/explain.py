"""Where a patch model saw HER2+: Grad-CAM maps for CNNs and token maps for ViTs, via captum.

`evaluation.explain` draws them over the false-negative and false-positive galleries
(`reports.plot_explained_galleries`), so a reader sees whether a miss looked at the membranes or
at the background. Both kinds of backbone use captum's `LayerGradCam` for the HER2+ logit: a
CNN's on the output of timm's `forward_features` (its last conv stage after the final
norm/activation), a ViT's on the last block's first norm, its patch tokens reshaped to the patch
grid (where the class token still attends to them); the map is ReLU'd, upsampled with `LayerAttribution.interpolate` to
the patch and scaled to [0, 1] per image. One method for both keeps the maps comparable and
class-specific (a ViT's raw CLS attention is neither), and needs no hooks into timm's fused
attention. (The grad-cam package is not used: it pulls in OpenCV's GUI libraries.)
docs/architecture.md, "Evaluation".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# Re-exported: the drawing lives in reports (below engine); `explain.overlay` stays importable.
from her2exp.reports.overlay import ALPHA as ALPHA
from her2exp.reports.overlay import overlay as overlay
from her2exp.runtime.hydra_run import HydraRun

log = logging.getLogger("her2exp")

BATCH = 16


class _Tap(nn.Module):
    """The layer captum attributes to: an identity on the backbone's feature map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Explained(nn.Module):
    """The classifier's own function with the feature map passed through `tap`, so captum's
    Grad-CAM sees a spatial (B, C, h, w) layer: a CNN's `forward_features` output; a ViT's last
    block's first norm (its patch tokens as the patch grid, through a forward hook). Not the
    ViT's final output: a class-token head gives its patch tokens no gradient there. `close()`
    removes the hook."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.tap = model, _Tap()
        self.backbone = model.backbone
        self.vit = is_vit(self.backbone)
        self._grid: tuple[int, int] = (0, 0)
        self._hook = None
        if self.vit:
            self._hook = self.backbone.blocks[-1].norm1.register_forward_hook(self._through_grid)

    def _through_grid(self, _module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        n_prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
        prefix, patches = out[:, :n_prefix], out[:, n_prefix:]
        b, n, d = patches.shape
        h, w = self._grid
        grid = self.tap(patches.transpose(1, 2).reshape(b, d, h, w))
        return torch.cat([prefix, grid.reshape(b, d, n).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.vit:
            self._grid = patch_grid(self.backbone, x.shape[-2:])
            return self.model(x)
        feats = self.backbone.forward_features(x)
        if feats.ndim != 4:
            raise TypeError(f"forward_features gave {tuple(feats.shape)}, not a feature map")
        if str(getattr(self.backbone, "output_fmt", "NCHW")).endswith("NHWC"):  # e.g. Swin
            feats = self.tap(feats.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            feats = self.tap(feats)
        return self.model.head(self.backbone.forward_head(feats))

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def is_vit(backbone: nn.Module) -> bool:
    """A timm vision transformer: patch tokens after prefix tokens from `forward_features`."""
    return hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks")


def patch_grid(backbone: nn.Module, size: Any) -> tuple[int, int]:
    """The patch-token grid of an input of `size` (H, W)."""
    ph, pw = backbone.patch_embed.patch_size
    return int(size[0]) // ph, int(size[1]) // pw


def explainable(model: nn.Module) -> str | None:
    """None when `model` can be explained, else why not (logged, never an error)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(model, "head"):
        return "not a backbone + head classifier"
    if not all(hasattr(backbone, f) for f in ("forward_features", "forward_head")):
        return f"{type(backbone).__name__} has no forward_features/forward_head"
    return None


def layer_map(model: nn.Module, x: torch.Tensor, target: int = 1) -> torch.Tensor:
    """(N, 1, h, w) ReLU'd Grad-CAM at the feature map's own resolution (a ViT: its patch grid)
    for the normalised batch `x` (N, 3, H, W), of the log-odds of class `target` against the
    other (what P(HER2+) depends on, rather than one logit alone)."""
    from captum.attr import LayerGradCam

    wrapped = _Explained(model)

    def log_odds(batch: torch.Tensor) -> torch.Tensor:
        z = wrapped(batch)
        if z.shape[1] != 2:
            return z[:, target : target + 1]
        return (z[:, target] - z[:, 1 - target]).unsqueeze(1)

    was_training = model.training
    model.eval()
    try:  # gradients even if a caller scores under inference_mode or no_grad
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().float().clone().requires_grad_(True)
            cam = LayerGradCam(log_odds, wrapped.tap)
            attr = cam.attribute(x, target=0, relu_attributions=True)
    finally:
        wrapped.close()
        model.train(was_training)
    return attr.detach().float()


def maps(model: nn.Module, x: torch.Tensor, target: int = 1) -> tuple[np.ndarray, tuple[int, int]]:
    """(N, H, W) float32 in [0, 1] and the (h, w) it was computed at: `layer_map` upsampled to the input with captum's
    `LayerAttribution.interpolate` (bilinear) and scaled by its maximum per image; all zero
    where nothing pointed to `target`."""
    from captum.attr import LayerAttribution

    attr = layer_map(model, x, target)
    up = LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), "bilinear").clamp_min(0)[:, 0]
    peak = up.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    heat = (up / peak[:, None, None]).clamp(0, 1).cpu().numpy().astype(np.float32)
    return heat, (int(attr.shape[-2]), int(attr.shape[-1]))


@dataclass
class Explainer:
    """A run's model with its input path: uint8 patches -> maps. `stain` is the pipeline run in
    the loader workers (None: none, or it runs on the device inside `preprocess`)."""

    model: nn.Module
    preprocess: Callable[..., torch.Tensor]
    stain: Callable[..., torch.Tensor] | None = None
    grid: tuple[int, int] | None = None  # the resolution of the last maps, before upsampling

    @property
    def method(self) -> str:
        """The file-name tag of its figures: gradcam (CNN) or attention (ViT token map)."""
        return "attention" if is_vit(self.model.backbone) else "gradcam"

    def describe(self) -> str:
        """The figure's note: the method and the grid its maps have (a 1 x 1 grid says nothing
        about where: a CNN's last stage on a small patch)."""
        grid = "" if self.grid is None else f" at {self.grid[0]}x{self.grid[1]}"
        return f"{self.method}{grid}: where it saw HER2+ (red) against HER2- (log-odds)"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, H, W) maps in [0, 1], in batches of BATCH."""
        out = []
        for start in range(0, len(images), BATCH):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + BATCH]))
            x = x.permute(0, 3, 1, 2).contiguous()
            if self.stain is not None:
                x = self.stain(x, False)
            heat, self.grid = maps(self.model, self.preprocess(x))
            out.append(heat)
        h, w = images.shape[1:3]
        return np.concatenate(out) if out else np.zeros((0, h, w), np.float32)


def build(
    model: nn.Module,
    preprocess: Callable[..., torch.Tensor],
    cached: bool,
    stain: Callable[..., torch.Tensor] | None = None,
) -> Explainer | None:
    """The explainer of a run, or None with a log line saying why there is none."""
    if cached:
        log.info(
            "evaluation.explain: skipped with model.cache_features=true (no pixels go through "
            "the backbone at scoring)"
        )
        return None
    why = explainable(model)
    if why is not None:
        log.info("evaluation.explain: skipped, %s", why)
        return None
    return Explainer(model, preprocess, stain)


def sweep_default(explain: bool, multirun: bool, overrides: list[str]) -> bool:
    """evaluation.explain in a multirun is off unless its command line names it: each child's
    overlays cost a backward pass per gallery patch, and nobody reads them across 50 children."""
    if not multirun or not explain:
        return explain
    named = any(o.lstrip("+~").split("=", 1)[0] == "evaluation.explain" for o in overrides)
    return explain if named else False


def resolve_sweep_default(cfg: Any, hydra: HydraRun) -> None:
    """Write `sweep_default` into cfg (so config_resolved.yaml and MLflow show what ran), from
    Hydra's runtime config as the command read it: a multirun, and the job's own overrides
    (`HydraRun()` outside @hydra.main: tests, notebooks, nothing changes)."""
    explain = bool(cfg.evaluation.get("explain", True))
    resolved = sweep_default(explain, hydra.multirun, list(hydra.overrides))
    if resolved != explain:
        log.info("evaluation.explain: false in a sweep (set it on the command line to keep it)")
        cfg.evaluation.explain = resolved
