"""Embedded, physically based generator of HER2 IHC-like patches.

Why it exists: tests and demos need HER2 data without downloading slides. Patches are rendered
in optical-density space and turned into RGB with Beer-Lambert, so stain normalisation, colour
deconvolution and stain augmentation act on them as they would on real IHC. Each patch carries
the latent HER2 expression it was drawn from, and the generative mixture is known exactly, so
tests can compare a model's AUC with the Bayes ceiling (which is below 1 because 2+ amplified
and 2+ non-amplified tumours overlap).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "NEG_SCORE_PROBS",
    "POS_SCORE_PROBS",
    "SCORE_MEANS",
    "SIGMA_PATCH",
    "SIGMA_PATIENT",
    "SITES",
    "SiteStyle",
    "SyntheticData",
    "bayes_posterior",
    "ceiling_auc",
    "dab_level",
    "generate",
    "montage",
    "stain_concentrations",
]

# --- clinical / statistical model -------------------------------------------------------------

#: IHC score distribution of HER2- patients (score, latent mean, probability).
NEG_SCORE_PROBS: dict[str, float] = {"0": 0.45, "1+": 0.40, "2+": 0.15}
#: IHC score distribution of HER2+ patients ("2+" here means 2+ with ISH amplification).
POS_SCORE_PROBS: dict[str, float] = {"3+": 0.70, "2+": 0.30}
#: Latent expression mean per (status, score); 2+ amplified sits only slightly above 2+ negative.
SCORE_MEANS: dict[tuple[int, str], float] = {
    (0, "0"): 0.0,
    (0, "1+"): 1.0,
    (0, "2+"): 2.0,
    (1, "2+"): 2.3,
    (1, "3+"): 3.0,
}
#: Between-patient spread of the latent expression around the score mean.
SIGMA_PATIENT = 0.35
#: Within-patient (patch-to-patch) heterogeneity.
SIGMA_PATCH = 0.45

_H_REF = (0.65, 0.70, 0.29)
_DAB_REF = (0.27, 0.57, 0.78)


def _stain_matrix(h: Sequence[float], dab: Sequence[float]) -> tuple[tuple[float, ...], ...]:
    """Row-normalised 3x3 stain matrix (hematoxylin, DAB, residual = |h x dab|)."""
    hv = np.asarray(h, dtype=np.float64)
    dv = np.asarray(dab, dtype=np.float64)
    hv /= np.linalg.norm(hv)
    dv /= np.linalg.norm(dv)
    rv = np.abs(np.cross(hv, dv))
    rv /= np.linalg.norm(rv)
    return tuple(tuple(round(float(x), 6) for x in row) for row in (hv, dv, rv))


@dataclass(frozen=True)
class SiteStyle:
    """Scanner/lab appearance of one site: the reason stain normalisation is needed."""

    stain_matrix: tuple[tuple[float, ...], ...]  # rows: unit OD vectors of H, DAB, residual
    intensity: float  # multiplies all stain concentrations (section thickness, protocol)
    i0: float  # background (illumination) intensity

    @property
    def matrix(self) -> np.ndarray:
        """Stain matrix as a float32 (3, 3) array."""
        return np.asarray(self.stain_matrix, dtype=np.float32)


SITES: dict[str, SiteStyle] = {
    "site_a": SiteStyle(_stain_matrix(_H_REF, _DAB_REF), intensity=1.00, i0=245.0),
    "site_b": SiteStyle(
        _stain_matrix((0.76, 0.61, 0.22), (0.31, 0.61, 0.73)), intensity=1.15, i0=238.0
    ),
    "site_c": SiteStyle(
        _stain_matrix((0.62, 0.72, 0.31), (0.25, 0.53, 0.81)), intensity=0.95, i0=250.0
    ),
    "external": SiteStyle(
        _stain_matrix((0.55, 0.76, 0.35), (0.22, 0.60, 0.77)), intensity=0.88, i0=250.0
    ),
}


@dataclass(frozen=True, eq=False)  # eq on arrays/DataFrames is ambiguous; compare fields
class SyntheticData:
    """Images plus per-image metadata (same order); ``latent_score`` is the true expression."""

    images: np.ndarray  # (N, H, W, 3) uint8 RGB
    frame: pd.DataFrame  # patient_id, slide_id, site, label, her2_score, latent_score


def _components(positive_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mixture components (means, weights, labels) of the marginal patch latent."""
    means, weights, labels = [], [], []
    for status, probs, prior in (
        (0, NEG_SCORE_PROBS, 1.0 - positive_fraction),
        (1, POS_SCORE_PROBS, positive_fraction),
    ):
        for score, p in probs.items():
            means.append(SCORE_MEANS[(status, score)])
            weights.append(prior * p)
            labels.append(status)
    return np.array(means), np.array(weights), np.array(labels)


def bayes_posterior(latent: np.ndarray, positive_fraction: float = 0.25) -> np.ndarray:
    """Exact P(label=1 | patch latent) under the generative mixture: the best any model can do."""
    x = np.asarray(latent, dtype=np.float64)[..., None]
    means, weights, labels = _components(positive_fraction)
    var = SIGMA_PATIENT**2 + SIGMA_PATCH**2
    # log-sum-exp per class for numerical safety far in the tails
    logp = np.log(weights) - 0.5 * (x - means) ** 2 / var
    pos = np.logaddexp.reduce(logp[..., labels == 1], axis=-1)
    neg = np.logaddexp.reduce(logp[..., labels == 0], axis=-1)
    return 1.0 / (1.0 + np.exp(neg - pos))


def ceiling_auc(labels: np.ndarray, latent: np.ndarray, positive_fraction: float = 0.25) -> float:
    """AUC of the Bayes posterior: the ceiling a pixel-based classifier can approach."""
    from sklearn.metrics import roc_auc_score  # here: importing sklearn costs every run ~2 s

    return float(roc_auc_score(np.asarray(labels), bayes_posterior(latent, positive_fraction)))


def dab_level(latent: np.ndarray) -> np.ndarray:
    """Membrane DAB concentration for a latent expression (strictly monotone above 0)."""
    return 0.03 + 0.5 * np.clip(latent, 0.0, 4.0)


def _membrane_completeness(latent: np.ndarray) -> np.ndarray:
    """Fraction of each cell's circumference stained: faint/partial at 1+, complete at 3+."""
    return np.clip(0.15 + 0.30 * latent, 0.05, 1.0)


def stain_concentrations(
    images: np.ndarray, stain_matrix: np.ndarray | Sequence, i0: float = 245.0
) -> np.ndarray:
    """Colour deconvolution (inverse Beer-Lambert): RGB uint8 -> (..., 3) concentrations."""
    img = np.asarray(images, dtype=np.float32)
    od = -np.log(np.clip(img, 1.0, None) / np.float32(i0))
    inv = np.linalg.inv(np.asarray(stain_matrix, dtype=np.float32))
    return od @ inv


# --- rendering ---------------------------------------------------------------------------------

_CELL_AREA = 64 * 64 / 18.0  # mean pixels per cell: ~18 cells in a 64x64 patch
_SPACING = (0.85, 1.2)  # per-patch range of grid spacing relative to sqrt(_CELL_AREA)
_JITTER = 0.36  # seed jitter (fraction of spacing): irregular cells, no near-coincident seeds
_NUC_RADIUS = 3.6
_MEMBRANE_WIDTH = 1.5  # in units of d2 - d1 (about twice the distance to the border)


def _grid_size(size: int) -> int:
    """Seed grid side so the smallest spacing still covers the patch plus a half-cell margin."""
    return int(math.ceil(size / (_SPACING[0] * math.sqrt(_CELL_AREA)))) + 1


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free logistic (soft masks)."""
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _interp_matrix(size: int, grid: int) -> np.ndarray:
    """(size, grid) linear interpolation matrix, for smooth low-frequency texture fields."""
    pos = np.linspace(0.0, grid - 1.0, size)
    lo = np.clip(np.floor(pos).astype(int), 0, grid - 2)
    frac = pos - lo
    m = np.zeros((size, grid), dtype=np.float32)
    m[np.arange(size), lo] = 1.0 - frac
    m[np.arange(size), lo + 1] = frac
    return m


def _cells(rng: np.random.Generator, b: int, size: int) -> tuple:
    """Voronoi cells of b patches: seeds, each pixel's cell and its two nearest seed distances."""
    f32 = np.float32
    # Cell seeds on a randomly offset, jittered grid (spacing varies per patch); seeds falling
    # outside the patch plus a half-cell margin, and a few random drop-outs, are parked far away.
    g = _grid_size(size)
    k = g * g
    spacing = np.sqrt(_CELL_AREA) * rng.uniform(*_SPACING, size=(b, 1, 1))
    origin = -rng.uniform(0.0, 1.0, size=(b, 1, 2)) * spacing
    gi, gj = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    lattice = np.stack([gi.ravel(), gj.ravel()], axis=-1)[None] + 0.5  # (1, K, 2)
    jitter = rng.uniform(-_JITTER, _JITTER, size=(b, k, 2))
    seeds = origin + (lattice + jitter) * spacing
    outside = ((seeds < -0.5 * spacing) | (seeds > size + 0.5 * spacing)).any(axis=-1)
    outside |= rng.random((b, k)) < 0.05
    seeds[outside] = 1e4
    sy, sx = seeds[..., 0].astype(f32), seeds[..., 1].astype(f32)

    yy, xx = np.meshgrid(np.arange(size, dtype=f32), np.arange(size, dtype=f32), indexing="ij")
    py, px = yy.reshape(1, -1), xx.reshape(1, -1)
    d = py[..., None] - sy[:, None, :]  # (B, P, K) squared distances, built in place
    d *= d
    t = px[..., None] - sx[:, None, :]
    t *= t
    d += t
    del t
    cell = d.argmin(axis=-1)  # (B, P)
    d1 = np.sqrt(np.take_along_axis(d, cell[..., None], axis=-1)[..., 0])
    np.put_along_axis(d, cell[..., None], np.inf, axis=-1)
    d2 = np.sqrt(d.min(axis=-1))
    del d
    return k, py, px, sy, sx, cell, d1, d2


def _beer_lambert(
    rng: np.random.Generator,
    hema: np.ndarray,
    dab: np.ndarray,
    keep: np.ndarray,
    stain: np.ndarray,
    i0: np.ndarray,
    size: int,
) -> np.ndarray:
    """Stain concentrations -> uint8 RGB by Beer-Lambert, with camera noise."""
    f32 = np.float32
    b = hema.shape[0]
    # Beer-Lambert per RGB channel: I = I0 * exp(-(c_h * S_h + c_dab * S_dab + c_res * S_res)).
    hema *= keep
    dab *= keep
    res = 0.04 * keep
    st = stain.astype(f32)
    rgb = np.empty((b, size * size, 3), dtype=f32)
    for ch in range(3):
        od = (
            hema * st[:, 0, ch : ch + 1] + dab * st[:, 1, ch : ch + 1] + res * st[:, 2, ch : ch + 1]
        )
        rgb[..., ch] = np.exp(-od)
    rgb *= i0.astype(f32)[:, None, None]
    rgb += 1.5 * rng.standard_normal(size=rgb.shape, dtype=f32)  # camera noise
    np.rint(rgb, out=rgb)
    np.clip(rgb, 0, 255, out=rgb)
    return rgb.astype(np.uint8).reshape(b, size, size, 3)


def _render_chunk(
    rng: np.random.Generator,
    latent: np.ndarray,
    stain: np.ndarray,
    intensity: np.ndarray,
    i0: np.ndarray,
    size: int,
) -> np.ndarray:
    """Render len(latent) patches; stain (B,3,3), intensity (B,), i0 (B,) are per patch."""
    f32 = np.float32
    b = latent.shape[0]

    k, py, px, sy, sx, cell, d1, d2 = _cells(rng, b, size)

    def per_cell(values: np.ndarray) -> np.ndarray:
        return np.take_along_axis(values.astype(f32), cell, axis=1)

    ody = py - per_cell(sy)  # offset of each pixel from its own seed
    odx = px - per_cell(sx)

    # Nuclei: noisy rotated ellipses around the seeds, with chromatin texture.
    rot = per_cell(rng.uniform(0.0, np.pi, size=(b, k)))
    ax_a = per_cell(_NUC_RADIUS * rng.uniform(0.9, 1.35, size=(b, k)))
    ax_b = per_cell(_NUC_RADIUS * rng.uniform(0.6, 0.95, size=(b, k)))
    cr, sr = np.cos(rot), np.sin(rot)
    u = (odx * cr + ody * sr) / ax_a
    v = (ody * cr - odx * sr) / ax_b
    r_ell = np.sqrt(u * u + v * v)
    grain = rng.standard_normal(size=r_ell.shape, dtype=f32)
    nucleus = _sigmoid((1.0 - r_ell + 0.08 * grain) / 0.12)
    h_cell = per_cell(rng.uniform(0.9, 1.5, size=(b, k)))
    hema = 0.12 + nucleus * h_cell * (1.0 + 0.18 * grain)

    # Membranes: thin band where the two nearest seeds are nearly equidistant; the stained arc
    # of each cell's circumference (completeness) and the DAB intensity grow with the latent.
    membrane = np.exp(-(((d2 - d1) / _MEMBRANE_WIDTH) ** 2))
    lat = latent.astype(f32)[:, None]
    phase = per_cell(rng.uniform(0.0, 2 * np.pi, size=(b, k)))
    angle = np.mod(np.arctan2(ody, odx) - phase, f32(2 * np.pi)) / f32(2 * np.pi)
    arc = _sigmoid((_membrane_completeness(lat) - angle) / 0.03)
    level = dab_level(lat) * per_cell(rng.lognormal(0.0, 0.15, size=(b, k)))
    dab = level * (membrane * arc + 0.06 * (1.0 - nucleus))

    # Smooth tissue texture (section thickness), plus lumen / white background in some patches.
    grid = max(4, size // 8)
    im = _interp_matrix(size, grid)
    coarse = rng.standard_normal(size=(b, grid, grid), dtype=f32)
    texture = (im @ coarse @ im.T).reshape(b, -1)
    has_lumen = rng.random(b) < 0.3
    centre = rng.uniform(0.0, size, size=(b, 2)).astype(f32)
    radius = (rng.uniform(0.15, 0.4, size=b) * size).astype(f32)
    rl = np.sqrt((py - centre[:, 0:1]) ** 2 + (px - centre[:, 1:2]) ** 2)
    lumen = has_lumen[:, None] * _sigmoid((1.0 - (rl + 2.5 * texture) / radius[:, None]) / 0.05)
    keep = (1.0 - 0.96 * lumen) * (1.0 + 0.12 * texture) * intensity[:, None].astype(f32)

    return _beer_lambert(rng, hema, dab, keep, stain, i0, size)


def _exact_counts(probs: dict[str, float], n: int) -> list[str]:
    """n score names whose counts follow probs as closely as integers allow."""
    names = list(probs)
    expected = np.array([probs[k] for k in names]) * n / sum(probs.values())
    counts = np.floor(expected).astype(int)
    for i in np.argsort(-(expected - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return [name for name, c in zip(names, counts, strict=True) for _ in range(c)]


def _check_args(
    n_patients: int,
    patches_per_patient: int,
    image_size: int,
    sites: Sequence[str],
    positive_fraction: float,
    positive_patch_fraction: float | None = None,
) -> None:
    if positive_patch_fraction is not None and not 0.0 < positive_patch_fraction <= 1.0:
        raise ValueError(
            f"positive_patch_fraction must be null or in (0, 1], got {positive_patch_fraction}"
        )
    if n_patients < 2:
        raise ValueError(f"n_patients must be >= 2 (one per class), got {n_patients}")
    if patches_per_patient < 1:
        raise ValueError(f"patches_per_patient must be >= 1, got {patches_per_patient}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if not 0.0 < positive_fraction < 1.0:
        raise ValueError(f"positive_fraction must be in (0, 1), got {positive_fraction}")
    if isinstance(sites, str) or len(sites) == 0:
        raise ValueError(f"sites must be a non-empty sequence of site names, got {sites!r}")
    for site in sites:
        if site not in SITES:
            raise ValueError(f"unknown site {site!r} in sites; allowed: {sorted(SITES)}")


def _dilute(
    latent: np.ndarray, label: np.ndarray, pid: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the expression of round(fraction x n) patches of each HER2+ patient (at least one)
    and give the others the latent of a HER2- background (a score drawn from NEG_SCORE_PROBS,
    its patient spread, then the patch spread): focal HER2 in an otherwise negative tumour.

    Its own generator (seeded from `seed`), so every other draw - sites, cells, stain, and so
    every HER2- patient's pixels - is the same as without the knob."""
    rng = np.random.default_rng([seed, 19])
    out = latent.copy()
    signal = np.zeros(latent.size, dtype=bool)
    neg_scores = list(NEG_SCORE_PROBS)
    neg_p = np.array([NEG_SCORE_PROBS[k] for k in neg_scores])
    for p in np.unique(pid[label == 1]):
        rows = np.flatnonzero(pid == p)
        keep = max(1, round(fraction * rows.size))
        carried = rng.permutation(rows)[:keep]
        signal[carried] = True
        decoy = rows[~signal[rows]]
        score = neg_scores[rng.choice(len(neg_scores), p=neg_p / neg_p.sum())]
        background = SCORE_MEANS[(0, score)] + rng.normal(0.0, SIGMA_PATIENT)
        out[decoy] = background + rng.normal(0.0, SIGMA_PATCH, size=decoy.size)
    return out, signal


def generate(
    n_patients: int = 100,
    patches_per_patient: int = 20,
    image_size: int = 64,
    sites: Sequence[str] = ("site_a", "site_b"),
    positive_fraction: float = 0.25,
    seed: int = 0,
    positive_patch_fraction: float | None = None,
) -> SyntheticData:
    """Draw a patient cohort and render its patches; byte-identical for identical arguments.

    Patients are assigned to ``sites`` round robin within each class (after a seeded shuffle),
    so site and label are not confounded. Patch label = patient status.
    ``positive_patch_fraction`` (None: every patch of a HER2+ patient carries its expression):
    only that fraction of a HER2+ patient's patches do, the rest look HER2- but keep the label
    (a bag task where finding the few signal patches matters; see `_dilute`). The frame then
    gains the per-patch truth column ``signal``.
    """
    _check_args(
        n_patients,
        patches_per_patient,
        image_size,
        sites,
        positive_fraction,
        positive_patch_fraction,
    )
    rng = np.random.default_rng(seed)
    sites = list(sites)

    n_pos = min(max(round(positive_fraction * n_patients), 1), n_patients - 1)
    status = np.zeros(n_patients, dtype=np.int64)
    status[rng.permutation(n_patients)[:n_pos]] = 1

    score = np.empty(n_patients, dtype=object)
    neg_idx, pos_idx = np.flatnonzero(status == 0), np.flatnonzero(status == 1)
    for idx, probs in ((neg_idx, NEG_SCORE_PROBS), (pos_idx, POS_SCORE_PROBS)):
        # Exact (largest-remainder) score counts: keeps small cohorts close to the mixture.
        score[rng.permutation(idx)] = _exact_counts(probs, idx.size)
    mean = np.array([SCORE_MEANS[(int(s), str(c))] for s, c in zip(status, score, strict=True)])
    patient_latent = mean + rng.normal(0.0, SIGMA_PATIENT, size=n_patients)

    site_of = np.empty(n_patients, dtype=object)
    for idx in (neg_idx, pos_idx):
        shuffled = rng.permutation(idx)
        site_of[shuffled] = [sites[i % len(sites)] for i in range(shuffled.size)]

    # Per-slide (= per-patient here) staining-run jitter on top of the site style.
    slide_gain = rng.lognormal(0.0, 0.04, size=n_patients)

    pid = np.repeat(np.arange(n_patients), patches_per_patient)
    n = pid.size
    latent = patient_latent[pid] + rng.normal(0.0, SIGMA_PATCH, size=n)
    signal = None
    if positive_patch_fraction is not None:
        latent, signal = _dilute(latent, status[pid], pid, positive_patch_fraction, seed)
    site_arr = site_of[pid]
    stain = np.stack([SITES[s].matrix for s in site_arr])
    intensity = np.array([SITES[s].intensity for s in site_arr]) * slide_gain[pid]
    i0 = np.array([SITES[s].i0 for s in site_arr]) + rng.uniform(-3.0, 3.0, size=n)

    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    chunk = max(1, int(3_000_000 // (image_size * image_size * _grid_size(image_size) ** 2)))
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        images[sl] = _render_chunk(rng, latent[sl], stain[sl], intensity[sl], i0[sl], image_size)

    patient_ids = [f"P{i:04d}" for i in range(n_patients)]
    frame = pd.DataFrame(
        {
            "patient_id": [patient_ids[i] for i in pid],
            "slide_id": [f"{patient_ids[i]}-S0" for i in pid],
            "site": [str(s) for s in site_arr],
            "label": status[pid].astype(int),
            "her2_score": [str(score[i]) for i in pid],
            "latent_score": latent.astype(float),
        }
    )
    if signal is not None:
        frame["signal"] = signal
    return SyntheticData(images=images, frame=frame)


def montage(data: SyntheticData, per_group: int = 4) -> np.ndarray:
    """Grid for eyeballing: one row per (site, label), patches from across the group's patients."""
    if per_group < 1:
        raise ValueError(f"per_group must be >= 1, got {per_group}")
    _, h, w, _ = data.images.shape
    gap = 2
    groups = data.frame.groupby(["site", "label"], sort=True).indices
    keys = sorted(groups)
    out = np.full(
        (len(keys) * (h + gap) - gap, per_group * (w + gap) - gap, 3), 255, dtype=np.uint8
    )
    for r, key in enumerate(keys):
        idx = np.asarray(groups[key])
        pick = idx[np.unique(np.linspace(0, idx.size - 1, per_group).round().astype(int))]
        for c, i in enumerate(pick):
            out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = data.images[
                i
            ]
    return out
