"""Macenko's stain-vector fit (Macenko et al., ISBI 2009), vectorised over a batch.

The algorithm follows torchstain's numpy normaliser (the field's reference port of the original
code: ``Io=240``, ``alpha=1``, ``beta=0.15``, red-channel ordering heuristic, 99th-percentile
concentrations over all pixels), on a whole batch of optical densities (B, 3, N) on the batch's
device, with no Python loop over images. ``masked_percentile`` reads only the tail a percentile
needs (``method="topk"``) instead of sorting every row; ``optical_density`` can go through a
256-entry look-up table for uint8 input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

PercentileMethod = Literal["sort", "topk"]

#: Relative eigenvalue floor: below it the OD cloud is (numerically) a line, not a plane.
_EIG_REL_FLOOR = 1e-6
#: Smallest sin^2 of the angle between the two stain vectors before the 3x2 stain matrix is
#: treated as singular (about 0.6 degrees).
_MIN_STAIN_SIN2 = 1e-4


def od_lut(device: torch.device, io: float = 240.0) -> Tensor:
    """256-entry float32 table of the optical density -log((v+1)/io) of each uint8 value."""
    v = torch.arange(256, dtype=torch.float64, device=device)
    return (-torch.log((v + 1.0) / io)).to(torch.float32)


def optical_density(images: Tensor, io: float = 240.0, use_lut: bool = True) -> Tensor:
    """Optical density -log((I+1)/io) as float32, same shape (torchstain's +1 avoids log(0)).

    uint8 input goes through a 256-entry table when ``use_lut`` (one gather instead of a
    convert, add, divide and log pass); float input (0-255) is computed directly.
    """
    if images.dtype == torch.uint8 and use_lut:
        lut = od_lut(images.device, io)
        return lut.index_select(0, images.reshape(-1).to(torch.int32)).view(images.shape)
    return -torch.log((images.to(torch.float32) + 1.0) / io)


def masked_percentile(
    values: Tensor,
    mask: Tensor | None,
    q: float,
    method: PercentileMethod = "sort",
    counts: Tensor | None = None,
) -> Tensor:
    """Per-row ``np.percentile(values[b][mask[b]], q)`` (linear interpolation), vectorised.

    ``values``/``mask``: (B, N). Rows with an empty mask give garbage (callers flag them).
    ``method="topk"`` reads only the ~q% tail that the percentile needs instead of sorting
    every row: O(N) rather than O(N log N), exactly the same value. ``counts`` (B,) int64 may
    pass ``mask.sum(1)`` when the caller has it already.
    """
    b, n_total = values.shape
    if mask is None:
        counts = torch.full((b,), n_total, device=values.device, dtype=torch.int64)
    elif counts is None:
        counts = mask.sum(dim=1)
    pos = (counts.clamp(min=1) - 1).to(torch.float64) * (q / 100.0)
    lo = pos.floor()
    frac = (pos - lo).to(values.dtype).unsqueeze(1)
    lo = lo.to(torch.int64)
    hi = torch.minimum(lo + 1, counts.clamp(min=1) - 1)
    if method == "sort" or q == 50.0:
        filled = values if mask is None else torch.where(mask, values, math.inf)
        ordered = torch.sort(filled, dim=1).values
        v_lo = ordered.gather(1, lo.unsqueeze(1))
        v_hi = ordered.gather(1, hi.unsqueeze(1))
    elif method == "topk":
        lower_tail = q < 50.0
        tail = q if lower_tail else 100.0 - q
        k = min(n_total, int(math.ceil((n_total - 1) * tail / 100.0)) + 2)
        if mask is None:
            filled = values
        else:
            filled = torch.where(mask, values, math.inf if lower_tail else -math.inf)
        part = torch.topk(filled, k, dim=1, largest=not lower_tail, sorted=True).values
        if lower_tail:
            i_lo, i_hi = lo, hi
        else:  # descending order: ascending index i sits at n-1-i
            last = counts.clamp(min=1) - 1
            i_lo, i_hi = last - lo, last - hi
        v_lo = part.gather(1, i_lo.clamp(0, k - 1).unsqueeze(1))
        v_hi = part.gather(1, i_hi.clamp(0, k - 1).unsqueeze(1))
    else:
        raise ValueError(f"percentile method must be 'sort' or 'topk', got {method!r}")
    return (v_lo + frac * (v_hi - v_lo)).squeeze(1)


@dataclass
class StainEstimate:
    """Per-patch Macenko estimate: stain matrices (B,3,2), H first; max concentrations (B,2)."""

    stains: Tensor
    max_conc: Tensor
    ok: Tensor  # (B,) bool: enough tissue and a well-posed eigen/least-squares problem
    tissue_fraction: Tensor  # (B,) over the pixels the estimate used


def estimate_stains(
    od: Tensor,
    beta: float = 0.15,
    alpha: float = 1.0,
    min_tissue_fraction: float = 0.05,
    percentile_method: PercentileMethod = "sort",
) -> StainEstimate:
    """Macenko stain matrix and 99th-percentile concentrations of each patch of od (B,3,N).

    Vectorised over the batch: tissue mask (every channel OD >= beta), covariance of the tissue
    OD, ``eigh`` on (B,3,3), extreme angles (alpha, 100-alpha percentiles) in the plane of the two
    largest eigenvectors, and least-squares concentrations over all pixels, as torchstain does.
    """
    b, _, n = od.shape
    mask = od.amin(dim=1) >= beta  # (B,N): every channel absorbs (torchstain's ODhat)
    maskf = mask.to(od.dtype)  # float arithmetic: bool*float promotion is a slow path on CPU
    count = maskf.sum(dim=1).round().to(torch.int64)
    tissue_fraction = count.to(torch.float32) / n
    ok = count >= max(3, math.ceil(min_tissue_fraction * n))

    # Covariance of the tissue OD from masked moments: one masked pass and one bmm over pixels.
    masked = od * maskf.unsqueeze(1)
    n_t = count.clamp(min=2).to(torch.float64)[:, None, None]
    mean = masked.sum(dim=2, keepdim=True).to(torch.float64) / n_t  # (B,3,1)
    second = (masked @ masked.transpose(1, 2)).to(torch.float64)  # (B,3,3)
    cov = (second - n_t * (mean @ mean.transpose(1, 2))) / (n_t - 1)
    ok &= torch.isfinite(cov).all(2).all(1)
    eye = torch.eye(3, dtype=cov.dtype, device=cov.device).expand_as(cov)
    cov = torch.where(ok[:, None, None], cov, eye)  # keep eigh well-posed for skipped patches
    evals, evecs = torch.linalg.eigh(cov)  # ascending, like numpy
    ok &= (evals[:, 1] > _EIG_REL_FLOOR * evals[:, 2]) & (evals[:, 2] > 0)
    plane = evecs[:, :, 1:3].to(od.dtype)  # (B,3,2): second largest, largest
    # The largest eigenvector's sign is arbitrary; point it into the positive OD octant so that
    # tissue projects to angles around +pi/2 and never straddles the atan2 branch cut.
    sign = torch.where(plane[:, :, 1].sum(dim=1) < 0, -1.0, 1.0).to(od.dtype)
    plane = torch.cat([plane[:, :, :1], plane[:, :, 1:] * sign[:, None, None]], dim=2)

    proj = plane.transpose(1, 2) @ od  # (B,2,N)
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    phi_min = masked_percentile(phi, mask, alpha, percentile_method, count)
    phi_max = masked_percentile(phi, mask, 100.0 - alpha, percentile_method, count)
    # Stain vectors in plane coordinates: columns (cos, sin) of the two extreme angles.
    ang_min = torch.stack([torch.cos(phi_min), torch.sin(phi_min)], dim=1)  # (B,2)
    ang_max = torch.stack([torch.cos(phi_max), torch.sin(phi_max)], dim=1)
    v_min, v_max = plane @ ang_min.unsqueeze(2), plane @ ang_max.unsqueeze(2)  # (B,3,1)
    # torchstain's heuristic: hematoxylin is the vector with the larger red OD component.
    h_first = (v_min[:, 0, 0] > v_max[:, 0, 0])[:, None, None]
    stains = torch.where(h_first, torch.cat([v_min, v_max], 2), torch.cat([v_max, v_min], 2))
    coords = torch.where(
        h_first, torch.stack([ang_min, ang_max], 2), torch.stack([ang_max, ang_min], 2)
    )
    cos_he = (stains[:, :, 0] * stains[:, :, 1]).sum(dim=1)
    ok &= (1.0 - cos_he * cos_he) > _MIN_STAIN_SIN2
    ok &= torch.isfinite(stains).all(2).all(1)

    # Least-squares concentrations: stains = plane @ coords with orthonormal plane, so
    # pinv(stains) @ od = coords^-1 @ (plane^T @ od) = coords^-1 @ proj: a 2x2 map of the
    # projections already at hand instead of another pass over the 3-channel OD.
    det = coords[:, 0, 0] * coords[:, 1, 1] - coords[:, 0, 1] * coords[:, 1, 0]
    det = torch.where(det.abs() > 1e-12, det, torch.ones_like(det))
    inv = (
        torch.stack(
            [
                torch.stack([coords[:, 1, 1], -coords[:, 0, 1]], -1),
                torch.stack([-coords[:, 1, 0], coords[:, 0, 0]], -1),
            ],
            -2,
        )
        / det[:, None, None]
    )
    conc = inv @ proj  # (B,2,N), only on the pixels the estimate uses
    flat = conc.reshape(b * 2, n)
    max_conc = masked_percentile(flat, None, 99.0, percentile_method).reshape(b, 2)
    ok &= torch.isfinite(max_conc).all(1) & (max_conc > 1e-6).all(1)
    return StainEstimate(stains, max_conc, ok, tissue_fraction)
