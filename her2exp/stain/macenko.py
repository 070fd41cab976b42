"""Batched Macenko stain normalisation in torch (Macenko et al., ISBI 2009).

Why it exists: sites differ in stain colour (see ``her2exp.data.synthetic.SITES``) and a classifier
should learn HER2 membrane staining, not the scanner. The algorithm follows torchstain's numpy
normaliser (the field's reference port of the original code: ``Io=240``, ``alpha=1``,
``beta=0.15``, red-channel ordering heuristic, 99th-percentile concentrations over all pixels,
output clipped at 255), but runs on a whole batch (B, 3, H, W) on the batch's device, with no
Python loop over images.

What makes it fast (docs/architecture.md, "Performance"); each shortcut can be switched off for the
exact path and its accuracy cost is bounded in ``tests/test_stain.py``:

* logarithms of uint8 input are taken in float32 in place (copy, ``add_(1)``, ``log_``): with
  torch 2.15 on this CPU that is 1.7x faster than a 256-entry look-up table (an int32 copy plus a
  gather), which stays available as ``use_lut=True`` because the winner depends on torch's kernels;
* stain vectors, tissue mask and percentiles are estimated on a fixed regular pixel grid of each
  patch (at least ``n_sample`` pixels: every 2nd row and column of a 128 px patch), with ``topk``
  instead of a full sort (``percentile_method``);
* the normalisation of a patch is one 3x3 linear map in OD space
  (reference stains x concentration scale x pseudo-inverse of the patch's stains), applied in
  cache-sized chunks, so per-pixel concentrations are never materialised for the output.

Patches with too little tissue or a degenerate stain estimate are returned unchanged and counted,
never raised on: a white patch in a training batch is data, not an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "MacenkoInfo",
    "MacenkoNormalizer",
    "apply_log_affine",
    "estimate_stains",
    "masked_percentile",
    "optical_density",
]

PercentileMethod = Literal["sort", "topk"]

#: Pixels per chunk when applying the per-patch colour map on the CPU: keeps the float
#: intermediates of one chunk (~1.5 MB) in cache instead of streaming the whole batch per pass.
_CPU_CHUNK_PIXELS = 1 << 17
#: Relative eigenvalue floor: below it the OD cloud is (numerically) a line, not a plane.
_EIG_REL_FLOOR = 1e-6
#: Smallest sin^2 of the angle between the two stain vectors before the 3x2 stain matrix is
#: treated as singular (about 0.6 degrees).
_MIN_STAIN_SIN2 = 1e-4


def _as_batch(images: Tensor) -> tuple[Tensor, bool]:
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


def _od_lut(device: torch.device, io: float = 240.0) -> Tensor:
    """256-entry float32 table of the optical density -log((v+1)/io) of each uint8 value."""
    v = torch.arange(256, dtype=torch.float64, device=device)
    return (-torch.log((v + 1.0) / io)).to(torch.float32)


def optical_density(images: Tensor, io: float = 240.0, use_lut: bool = True) -> Tensor:
    """Optical density -log((I+1)/io) as float32, same shape (torchstain's +1 avoids log(0)).

    uint8 input goes through a 256-entry table when ``use_lut`` (one gather instead of a
    convert, add, divide and log pass); float input (0-255) is computed directly.
    """
    if images.dtype == torch.uint8 and use_lut:
        lut = _od_lut(images.device, io)
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


def _pinv_2(stains: Tensor) -> Tensor:
    """Batched pseudo-inverse of (B,3,2) stain matrices, (S^T S)^-1 S^T, in closed form."""
    gram = stains.transpose(1, 2) @ stains  # (B,2,2)
    a, b, d = gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 1]
    det = (a * d - b * b).clamp(min=1e-12)
    inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-b, a], -1)], -2) / det[:, None, None]
    return inv @ stains.transpose(1, 2)  # (B,2,3)


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


def _to_uint8(images: Tensor) -> Tensor:
    """Unchanged pixels as uint8 (float input is rounded and clipped to 0-255)."""
    if images.dtype == torch.uint8:
        return images.clone()
    return images.round().clamp(0, 255).to(torch.uint8)


@dataclass
class MacenkoInfo:
    """What happened to each patch of a batch: logged, and used to audit skipped patches."""

    skipped: Tensor  # (B,) bool: returned unchanged (too little tissue / degenerate estimate)
    tissue_fraction: Tensor  # (B,) fraction of (sampled) pixels with OD >= beta in every channel
    stains: Tensor  # (B,3,2) each patch's stain vectors, hematoxylin first
    max_concentrations: Tensor  # (B,2) 99th-percentile concentrations

    @property
    def n_skipped(self) -> int:
        """Read on demand: on a GPU each read waits for the batch (a host sync)."""
        return int(self.skipped.sum())


class MacenkoNormalizer:
    """Macenko normalisation of batches to a fitted reference (stain matrix + max concentrations).

    ``fit`` on one reference image, or on a batch of training patches (then the element-wise
    median of their stain matrices and max concentrations). ``normalize`` maps a batch to the
    reference and returns uint8 images plus a :class:`MacenkoInfo`. Shortcuts (``n_sample``,
    ``percentile_method``) default to the fast path; ``exact=True`` turns all off.
    Output is rounded to nearest (torchstain truncates: a 0.5-level difference on average).

    CPU note: torch's intra-op threads stall badly when the other cores are busy (measured 10x
    slower with 2 threads on a loaded 2-core machine); in DataLoader workers torch already runs
    one thread each, which is the recommended place for CPU normalisation.
    """

    def __init__(
        self,
        io: float = 240.0,
        alpha: float = 1.0,
        beta: float = 0.15,
        min_tissue_fraction: float = 0.05,
        n_sample: int | None = 4096,
        percentile_method: PercentileMethod = "topk",
        use_lut: bool = False,
        exact: bool = False,
        rescale: str = "all",
    ) -> None:
        if rescale not in ("all", "hematoxylin", "none"):
            raise ValueError(f"rescale must be 'all', 'hematoxylin' or 'none', not {rescale!r}")
        # Classic Macenko ("all") maps each patch's 99th-percentile concentrations to the
        # reference's. For HER2 IHC that erases the DAB intensity that *is* the HER2 score;
        # "hematoxylin" rescales only the counterstain, "none" normalises colour alone.
        self.rescale = rescale
        if io <= 0 or not 0 <= alpha < 50 or beta < 0 or not 0 <= min_tissue_fraction <= 1:
            raise ValueError(
                f"invalid Macenko parameters io={io}, alpha={alpha}, beta={beta}, "
                f"min_tissue_fraction={min_tissue_fraction}"
            )
        if percentile_method not in ("sort", "topk"):
            raise ValueError(
                f"percentile_method must be 'sort' or 'topk', not {percentile_method!r}"
            )
        if n_sample is not None and n_sample < 16:
            raise ValueError(f"n_sample must be None (all pixels) or >= 16, got {n_sample}")
        self.io = float(io)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.min_tissue_fraction = float(min_tissue_fraction)
        self.n_sample = None if exact else n_sample
        self.percentile_method: PercentileMethod = "sort" if exact else percentile_method
        self.use_lut = False if exact else use_lut
        self.stain_matrix: Tensor | None = None  # (3,2) reference, hematoxylin first
        self.max_concentrations: Tensor | None = None  # (2,)

    # -- estimation ---------------------------------------------------------------------------
    def _sample_stride(self, h: int, w: int) -> int:
        """Largest grid stride that still keeps >= n_sample pixels (1 = every pixel).

        A regular grid (not random pixels) because stain tails are spatially clustered (nuclei,
        membranes): stratifying in space halves the percentile error of a random sample of the
        same size (measured on skimage's IHC sample and the synthetic sites).
        """
        if self.n_sample is None or h * w <= self.n_sample:
            return 1
        return max(1, math.floor(math.sqrt(h * w / self.n_sample)))

    def _estimate(self, images: Tensor, full: bool = False) -> StainEstimate:
        b, c, h, w = images.shape
        stride = 1 if full else self._sample_stride(h, w)
        if stride > 1:
            off = stride // 2
            images = images[:, :, off::stride, off::stride]
        if images.dtype == torch.uint8 and self.use_lut and not full:
            # gather the grid and widen to an index in one copy, then one table look-up
            idx = torch.empty(images.shape, dtype=torch.int32, device=images.device)
            idx.copy_(images)
            lut = _od_lut(images.device, self.io)
            od = lut.index_select(0, idx.view(-1)).view(b, c, -1)
        elif not full:
            # gather the grid and widen to float in one copy; OD = -log((I+1)/io) in place
            od = torch.empty(images.shape, dtype=torch.float32, device=images.device)
            od.copy_(images)
            od.clamp_(min=0.0).add_(1.0).mul_(1.0 / self.io).log_().neg_()
            od = od.view(b, c, -1)
        else:
            od = optical_density(images.reshape(b, c, -1), self.io, self.use_lut and not full)
        method: PercentileMethod = "sort" if full else self.percentile_method
        return estimate_stains(od, self.beta, self.alpha, self.min_tissue_fraction, method)

    # -- public API -----------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, reference: Tensor, chunk: int = 64) -> MacenkoNormalizer:
        """Fit the reference on one image (3,H,W)/(1,3,H,W) or a batch (median over patches).

        Fitting is a one-off, so it always uses every pixel and exact percentiles. Raises
        ValueError if no image of ``reference`` has enough tissue: a bad reference is a
        configuration error, unlike a blank patch at normalisation time.
        """
        images, _ = _as_batch(reference)
        parts = [
            self._estimate(images[s : s + chunk], full=True) for s in range(0, len(images), chunk)
        ]
        stains = torch.cat([p.stains for p in parts])
        max_conc = torch.cat([p.max_conc for p in parts])
        ok = torch.cat([p.ok for p in parts])
        if not bool(ok.any()):
            raise ValueError(
                "no reference image has enough tissue for a Macenko fit "
                f"(min_tissue_fraction={self.min_tissue_fraction}, beta={self.beta})"
            )
        stains, max_conc = stains[ok], max_conc[ok]
        if stains.shape[0] == 1:
            ref_stains, ref_conc = stains[0], max_conc[0]
        else:
            ref_stains = torch.quantile(stains, 0.5, dim=0)
            ref_stains = ref_stains / ref_stains.norm(dim=0, keepdim=True)
            ref_conc = torch.quantile(max_conc, 0.5, dim=0)
        self.stain_matrix = ref_stains.to(torch.float32)
        self.max_concentrations = ref_conc.to(torch.float32)
        return self

    @property
    def fitted(self) -> bool:
        """Whether a reference is set (by fit or load_state_dict)."""
        return self.stain_matrix is not None and self.max_concentrations is not None

    @torch.no_grad()
    def normalize(self, images: Tensor) -> tuple[Tensor, MacenkoInfo]:
        """Normalise (B,3,H,W) or (3,H,W) uint8/float 0-255 images to the reference -> uint8.

        Each patch becomes out = Io * exp(-M @ OD) with M = S_ref diag(c_ref / c) pinv(S), a 3x3
        map, computed in log space as exp(M @ log(I+1) + log(Io) (1 - M 1)). Skipped patches are
        copied through unchanged.
        """
        if not self.fitted:
            raise RuntimeError("MacenkoNormalizer is not fitted: call fit() or load_state_dict()")
        batch, added = _as_batch(images)
        est = self._estimate(batch)
        ok = est.ok
        if batch.device.type == "cpu":
            out = self._map_kept(batch, est)
        else:
            out = self._map_all(batch, est)
        info = MacenkoInfo(
            skipped=~ok,
            tissue_fraction=est.tissue_fraction,
            stains=torch.where(ok[:, None, None], est.stains, math.nan),
            max_concentrations=torch.where(ok[:, None], est.max_conc, math.nan),
        )
        return (out.squeeze(0) if added else out), info

    def _maps(self, stains: Tensor, max_conc: Tensor) -> tuple[Tensor, Tensor]:
        """Per-patch log-space map (K,3,3) and bias (K,3,1) onto the reference."""
        dev = stains.device
        ref_s, ref_c = self.stain_matrix.to(dev), self.max_concentrations.to(dev)
        scale = ref_c / max_conc  # (K,2)
        if self.rescale != "all":
            keep_cols = 1 if self.rescale == "hematoxylin" else 0
            scale[:, keep_cols:] = 1.0
        mat = (ref_s.unsqueeze(0) * scale.unsqueeze(1)) @ _pinv_2(stains)  # (K,3,3)
        return mat, (math.log(self.io) * (1.0 - mat.sum(dim=2))).unsqueeze(2)

    def _map_kept(self, batch: Tensor, est: StainEstimate) -> Tensor:
        """CPU: map only the patches kept (finding them reads `ok`: free on the host)."""
        keep = est.ok.nonzero().squeeze(1)
        if keep.numel() == batch.shape[0]:  # the common case: no copies, no scatter
            return apply_log_affine(batch, "log1p", *self._maps(est.stains, est.max_conc))
        out = _to_uint8(batch)
        if keep.numel() > 0:
            mat, bias = self._maps(est.stains[keep], est.max_conc[keep])
            out[keep] = apply_log_affine(batch[keep], "log1p", mat, bias)
        return out

    def _map_all(self, batch: Tensor, est: StainEstimate) -> Tensor:
        """GPU: map every patch and put the skipped ones back by `torch.where`: no host sync
        (finding the kept patches would wait for the GPU on every batch). A skipped patch's
        map is built from the reference itself, so it stays finite."""
        ok = est.ok
        stains = torch.where(ok[:, None, None], est.stains, self.stain_matrix.to(batch.device))
        max_conc = torch.where(ok[:, None], est.max_conc, self.max_concentrations.to(batch.device))
        out = apply_log_affine(batch, "log1p", *self._maps(stains, max_conc))
        return torch.where(ok[:, None, None, None], out, _to_uint8(batch))

    __call__ = normalize

    def state_dict(self) -> dict[str, Any]:
        """Reference and parameters as plain tensors/floats: saved with a run and logged."""
        if not self.fitted:
            raise RuntimeError("MacenkoNormalizer is not fitted: nothing to save")
        return {
            "stain_matrix": self.stain_matrix.detach().cpu().clone(),
            "max_concentrations": self.max_concentrations.detach().cpu().clone(),
            "io": self.io,
            "alpha": self.alpha,
            "beta": self.beta,
            "min_tissue_fraction": self.min_tissue_fraction,
        }

    def load_state_dict(self, state: dict[str, Any]) -> MacenkoNormalizer:
        """Restore a reference saved by state_dict (parameters included, so outputs match)."""
        stains = torch.as_tensor(state["stain_matrix"], dtype=torch.float32)
        conc = torch.as_tensor(state["max_concentrations"], dtype=torch.float32)
        if stains.shape != (3, 2) or conc.shape != (2,):
            raise ValueError(
                f"bad Macenko state: stain_matrix {tuple(stains.shape)} (want (3, 2)), "
                f"max_concentrations {tuple(conc.shape)} (want (2,))"
            )
        device = self.stain_matrix.device if self.stain_matrix is not None else stains.device
        self.stain_matrix = stains.to(device)
        self.max_concentrations = conc.to(device)
        for key in ("io", "alpha", "beta", "min_tissue_fraction"):
            if key in state:
                setattr(self, key, float(state[key]))
        return self

    def to(self, device: torch.device | str) -> MacenkoNormalizer:
        """Move the reference to device (normalize also follows the batch's device by itself)."""
        if self.stain_matrix is not None:
            self.stain_matrix = self.stain_matrix.to(device)
        if self.max_concentrations is not None:
            self.max_concentrations = self.max_concentrations.to(device)
        return self

    def __repr__(self) -> str:
        return (
            f"MacenkoNormalizer(io={self.io}, alpha={self.alpha}, beta={self.beta}, "
            f"min_tissue_fraction={self.min_tissue_fraction}, n_sample={self.n_sample}, "
            f"percentile_method={self.percentile_method!r}, use_lut={self.use_lut}, "
            f"fitted={self.fitted})"
        )
