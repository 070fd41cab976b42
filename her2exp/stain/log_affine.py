"""The colour map Macenko and HED both reduce to: one 3x3 map plus a bias per patch in log
space, applied to a uint8 batch in cache-sized chunks; with the batch checks both share.

Why one kernel: normalisation and augmentation are each linear in log-RGB, so a single fast,
tested path serves both (docs/architecture.md, "Performance"): logarithms are taken in float32
in place (copy, ``add_(1)``, ``log_``) and per-pixel concentrations are never materialised.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Pixels per chunk when applying the per-patch colour map on the CPU: keeps the float
#: intermediates of one chunk (~1.5 MB) in cache instead of streaming the whole batch per pass.
_CPU_CHUNK_PIXELS = 1 << 17


def as_batch(images: Tensor) -> tuple[Tensor, bool]:
    """(3,H,W) or (B,3,H,W) -> (B,3,H,W), and whether a batch dim was added."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
        added = True
    elif images.dim() == 4:
        added = False
    else:
        raise ValueError(f"expected (3,H,W) or (B,3,H,W) images, got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels in dim 1, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"expected uint8 or float (0-255) images, got {images.dtype}")
    return images, added


def to_uint8(images: Tensor) -> Tensor:
    """Unchanged pixels as uint8 (float input is rounded and clipped to 0-255)."""
    if images.dtype == torch.uint8:
        return images.clone()
    return images.round().clamp(0, 255).to(torch.uint8)


def apply_log_affine(
    images: Tensor, lut_fn: str, matrix: Tensor, bias: Tensor, chunk_pixels: int | None = None
) -> Tensor:
    """uint8 out = round(clip(exp(matrix @ g(x) + bias), 0, 255)) per patch, with g = log1p.

    ``lut_fn`` names g ('log1p' for Macenko, 'log255' for HED: log(max(v/255, 1e-6))), computed
    in float32 in place. ``matrix`` (B,3,3), ``bias`` (B,3,1). On the CPU the batch is processed
    in chunks of about ``chunk_pixels`` pixels into reused buffers, so the elementwise passes run
    in cache.
    """
    b, c, h, w = images.shape
    hw = h * w
    flat = images.reshape(b, c, hw)
    out = torch.empty((b, c, hw), dtype=torch.uint8, device=images.device)
    if b == 0:
        return out.reshape(b, c, h, w)
    if chunk_pixels is None:
        chunk_pixels = _CPU_CHUNK_PIXELS if images.device.type == "cpu" else b * hw
    step = max(1, chunk_pixels // hw)
    step = min(step, b)
    matrix = matrix.to(torch.float32)
    bias = bias.to(torch.float32)
    dev = images.device
    gbuf = torch.empty((step, c, hw), dtype=torch.float32, device=dev)
    ybuf = torch.empty((step, c, hw), dtype=torch.float32, device=dev)
    for s in range(0, b, step):
        e = min(s + step, b)
        m = e - s
        g = gbuf[:m]
        g.copy_(flat[s:e])
        _log_inplace(g, lut_fn)
        y = ybuf[:m]
        torch.baddbmm(bias[s:e], matrix[s:e], g, out=y)
        y.exp_()
        y.clamp_(0.0, 255.0)
        y.round_()
        out[s:e].copy_(y)
    return out.reshape(b, c, h, w)


def _log_inplace(x: Tensor, lut_fn: str) -> Tensor:
    """g(x) in place on float32 values 0-255: 'log1p' = log(x+1), 'log255' = log(max(x/255, 1e-6)).

    ``add_`` + ``log_`` rather than ``log1p_``: torch's float log is vectorised, log1p is not.
    """
    if lut_fn == "log1p":
        return x.clamp_(min=0.0).add_(1.0).log_()
    if lut_fn == "log255":
        return x.mul_(1.0 / 255.0).clamp_(min=1e-6).log_()
    raise ValueError(f"unknown lut_fn {lut_fn!r}")
