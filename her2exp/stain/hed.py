"""HED stain augmentation (Tellez et al. 2018) for training batches, in torch.

Why it exists: normalisation removes known colour variation; augmentation teaches the model to
ignore the unknown rest (an unseen external site). Each patch's colour-deconvolved concentrations
s (skimage's ``rgb2hed``: hematoxylin, eosin, DAB) become ``alpha * s + beta`` with
alpha ~ U(1 - sigma, 1 + sigma) and beta ~ U(-sigma, sigma) per patch and channel.

Because deconvolution and recombination are linear in log-RGB, the whole jitter of a patch is one
3x3 map plus a bias in log space, applied with the same chunked kernel as Macenko
(:func:`her2exp.stain.log_affine.apply_log_affine`), deterministic given a ``torch.Generator``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from her2exp.core.seed import keyed_uniform
from her2exp.stain.log_affine import apply_log_affine, as_batch

__all__ = ["HED_FROM_RGB", "RGB_FROM_HED", "HedJitter"]

#: skimage.color.rgb_from_hed (Ruifrok & Johnston 2001): rows are the RGB optical densities of
#: hematoxylin, eosin and DAB. Hard-coded so augmentation does not import skimage; a test checks
#: it (and its inverse) against skimage.color.
RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
#: skimage.color.hed_from_rgb = inv(rgb_from_hed).
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
#: skimage's separate_stains floors RGB at 1e-6 and divides log-RGB by log(1e-6).
_LOG_ADJUST = math.log(1e-6)


class HedJitter:
    """Random per-patch scale and shift of H, E and DAB concentrations (training only).

    ``sigma=0`` is the identity (up to uint8 rounding). Unlike skimage's rgb2hed, negative
    concentrations are not clipped to 0, so that the jitter stays one invertible map.
    """

    def __init__(self, sigma: float = 0.05, shift_sigma: float | None = None) -> None:
        if sigma < 0 or sigma >= 1:
            raise ValueError(f"sigma must be in [0, 1), got {sigma}")
        if shift_sigma is not None and shift_sigma < 0:
            raise ValueError(f"shift_sigma must be >= 0, got {shift_sigma}")
        self.sigma = float(sigma)
        self.shift_sigma = float(sigma if shift_sigma is None else shift_sigma)

    def maps(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw n patches' (matrix (n,3,3), bias (n,3,1)) for exp(matrix @ log(rgb/255) + bias).

        Draws happen on the generator's device (CPU by default) so that results do not depend
        on where the batch lives.
        """
        dev = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand((n, 2, 3), generator=generator, device=dev, dtype=torch.float64)
        return self.maps_from(u)

    def maps_from(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """The maps of uniforms u (n, 2, 3) in [0, 1): row 0 scales, row 1 shifts H, E, DAB."""
        dev = u.device
        alpha = 1.0 + self.sigma * (2.0 * u[:, 0] - 1.0)  # (n,3)
        beta = self.shift_sigma * (2.0 * u[:, 1] - 1.0)  # (n,3)
        hed, rgb = HED_FROM_RGB.to(dev), RGB_FROM_HED.to(dev)
        # Row-vector convention of skimage: s = (L / la) @ hed; L' = (alpha*s + beta) la @ rgb.
        row_map = hed.unsqueeze(0) @ (alpha.unsqueeze(2) * rgb.unsqueeze(0))  # (n,3,3)
        matrix = row_map.transpose(1, 2)  # column-vector convention: L' = matrix @ L
        bias = _LOG_ADJUST * (beta.unsqueeze(1) @ rgb).transpose(1, 2) + math.log(255.0)
        return matrix, bias

    @torch.no_grad()
    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Jitter (B,3,H,W) or (3,H,W) uint8 (or float 0-255) images -> uint8, same shape."""
        batch, added = as_batch(images)
        return self._apply(batch, *self.maps(batch.shape[0], generator), added)

    @torch.no_grad()
    def keyed(self, images: Tensor, seed: int, epoch: int, index: Any) -> Tensor:
        """Jitter each patch by draws keyed on (seed, epoch, its dataset index): a patch gets
        the same colours in the workers or on the GPU, on any rank, in any batch."""
        batch, added = as_batch(images)
        u = torch.from_numpy(keyed_uniform(seed, epoch, index, 6)).view(-1, 2, 3)
        if u.shape[0] != batch.shape[0]:
            raise ValueError(f"{u.shape[0]} dataset indices for a batch of {batch.shape[0]}")
        return self._apply(batch, *self.maps_from(u), added)

    @staticmethod
    def _apply(batch: Tensor, matrix: Tensor, bias: Tensor, added: bool) -> Tensor:
        # The maps are drawn on the host; only the per-pixel work runs where the batch is. To a
        # GPU they travel from pinned memory without blocking: a pageable copy would wait.
        if batch.device.type == "cuda" and matrix.device.type == "cpu":
            matrix = matrix.pin_memory().to(batch.device, non_blocking=True)
            bias = bias.pin_memory().to(batch.device, non_blocking=True)
        out = apply_log_affine(batch, "log255", matrix.to(batch.device), bias.to(batch.device))
        return out.squeeze(0) if added else out

    def __repr__(self) -> str:
        return f"HedJitter(sigma={self.sigma}, shift_sigma={self.shift_sigma})"
