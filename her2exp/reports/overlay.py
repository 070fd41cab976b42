"""A map drawn over its patch: the explainer's [0, 1] heat in matplotlib's jet, mixed in.

Drawing only (numpy and a colour map), so the galleries in `reports` draw overlays without the
explainer (`engine.explain`, which computes the maps with captum) and the explainer re-exports it.
"""

from __future__ import annotations

import numpy as np

#: Overlay opacity of the colour map over the patch.
ALPHA = 0.45


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """uint8 (H, W, 3): the patch with the [0, 1] map drawn over it in matplotlib's jet."""
    from matplotlib import colormaps  # matplotlib loads on the first figure only

    if image.shape[:2] != heat.shape:
        raise ValueError(f"map {heat.shape} does not match the patch {image.shape[:2]}")
    colour = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
