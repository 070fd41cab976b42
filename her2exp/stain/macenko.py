"""Batched Macenko stain normalisation in torch (Macenko et al., ISBI 2009).

Why it exists: sites differ in stain colour (see ``her2exp.data.synthetic.SITES``) and a classifier
should learn HER2 membrane staining, not the scanner. The algorithm follows torchstain's numpy
normaliser (the field's reference port of the original code: ``Io=240``, ``alpha=1``,
``beta=0.15``, red-channel ordering heuristic, 99th-percentile concentrations over all pixels,
output clipped at 255), but runs on a whole batch (B, 3, H, W) on the batch's device, with no
Python loop over images.

This module is the normaliser (fit a reference, map batches onto it, save and restore it); the
stain-vector fit is :mod:`her2exp.stain.estimate`, the log-space colour map it shares with HED
augmentation :mod:`her2exp.stain.log_affine`. Their names stay importable from here.

What makes it fast (docs/architecture.md, "Performance"); each shortcut can be switched off for the
exact path and its accuracy cost is bounded in ``tests/stain/test_stain.py``:

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
from typing import Any

import torch
from torch import Tensor

from her2exp.stain.estimate import (
    PercentileMethod,
    StainEstimate,
    estimate_stains,
    masked_percentile,
    od_lut,
    optical_density,
)
from her2exp.stain.log_affine import apply_log_affine, as_batch, to_uint8

__all__ = [
    "MacenkoInfo",
    "MacenkoNormalizer",
    "PercentileMethod",
    "StainEstimate",
    "apply_log_affine",
    "estimate_stains",
    "masked_percentile",
    "optical_density",
]


def _pinv_2(stains: Tensor) -> Tensor:
    """Batched pseudo-inverse of (B,3,2) stain matrices, (S^T S)^-1 S^T, in closed form."""
    gram = stains.transpose(1, 2) @ stains  # (B,2,2)
    a, b, d = gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 1]
    det = (a * d - b * b).clamp(min=1e-12)
    inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-b, a], -1)], -2) / det[:, None, None]
    return inv @ stains.transpose(1, 2)  # (B,2,3)


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
            lut = od_lut(images.device, self.io)
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
        images, _ = as_batch(reference)
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
        batch, added = as_batch(images)
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
        out = to_uint8(batch)
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
        return torch.where(ok[:, None, None, None], out, to_uint8(batch))

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
