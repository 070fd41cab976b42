"""The one input path: uint8 host batch -> normalised float batch on the device, shared by
training, scoring, the feature cache and `her2exp-predict`, so every path sees the same pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Preprocess:
    """uint8 NCHW batch -> device -> (stain on the device) -> float normalised by mean/std.

    Normalising on the device keeps host-to-device copies 4x smaller and lets stain
    normalisation act on uint8 batches in between. A batch that is already float (cached
    features) only moves to the device.
    """

    device: torch.device
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channels_last: bool = False
    # Stain pipeline applied on the device (stain.on_device=true); None: done in the workers.
    stain: Callable[..., torch.Tensor] | None = None

    def __post_init__(self) -> None:
        # Built once on the device, not per batch (a host-to-device copy each on a GPU).
        scale = dict(device=self.device, dtype=torch.float32)
        mean = torch.tensor(self.mean, **scale).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, **scale).view(1, 3, 1, 1) * 255.0
        object.__setattr__(self, "_mean255", mean)
        object.__setattr__(self, "_std255", std)

    def __call__(
        self,
        x: torch.Tensor,
        train: bool = False,
        epoch: int = 0,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`index`: the samples' dataset indices (host tensor), which key the stain jitter."""
        x = x.to(self.device, non_blocking=True)
        if self.stain is not None:
            x = self.stain(x, train, epoch, index)
        if x.dtype == torch.uint8:
            x = (x.float() - self._mean255) / self._std255
        fmt = torch.channels_last if self.channels_last and x.ndim == 4 else None
        return x.contiguous(memory_format=fmt or torch.contiguous_format)
