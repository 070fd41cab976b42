"""Stain normalisation and augmentation: agreement with the field, known-answer recovery, safety.

Real tissue is scikit-image's bundled IHC sample (no download); known answers come from patches
rendered by Beer-Lambert with a chosen stain matrix (the physics of her2exp.data.synthetic).
Every speed shortcut of the batched Macenko is compared with the exact path it replaces.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from her2exp.bench.stain import ihc_patches
from her2exp.data.synthetic import SITES, generate
from her2exp.stain import HedJitter, MacenkoNormalizer
from her2exp.stain.hed import HED_FROM_RGB, RGB_FROM_HED
from her2exp.stain.macenko import masked_percentile, optical_density


def _chw(images: np.ndarray) -> torch.Tensor:
    """(N,H,W,3) or (H,W,3) numpy uint8 -> channels-first torch."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    return t.permute(0, 3, 1, 2).contiguous() if t.dim() == 4 else t.permute(2, 0, 1).contiguous()


def _angle_deg(u: torch.Tensor, v: torch.Tensor) -> float:
    cos = torch.dot(u.double(), v.double()) / (u.double().norm() * v.double().norm())
    return math.degrees(math.acos(float(cos.clamp(-1.0, 1.0))))


@pytest.fixture(scope="module")
def ihc() -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """48 crops of skimage's IHC sample (torch and numpy) and a reference region from elsewhere."""
    crops, reference = ihc_patches(n=48, size=128, seed=1)
    return _chw(crops), _chw(reference), crops, reference


@pytest.fixture(scope="module")
def fitted(ihc) -> MacenkoNormalizer:
    return MacenkoNormalizer().fit(ihc[1])


@pytest.fixture(scope="module")
def exact_out(ihc, fitted) -> torch.Tensor:
    exact = MacenkoNormalizer(exact=True).load_state_dict(fitted.state_dict())
    return exact.normalize(ihc[0])[0]


def _mad_per_channel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per channel of (B,3,H,W) images, in 0-255 levels."""
    return (a.double() - b.double()).abs().mean(dim=(0, 2, 3))


def _render(stains: np.ndarray, n: int, size: int = 96, i0: float = 240.0, seed: int = 0):
    """Beer-Lambert patches with pure-H nuclei, pure-DAB membranes, mixtures and background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = []
    for _ in range(n):
        conc = np.zeros((size, size, 3), np.float32)
        for _ in range(12):  # hematoxylin nuclei
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(4, 9)
            conc[..., 0] += rng.uniform(0.4, 1.4) * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
        for _ in range(10):  # DAB membrane rings
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(8, 16)
            ring = np.abs(np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - r) < 1.5
            conc[..., 1] += rng.uniform(0.3, 1.2) * ring
        conc += rng.uniform(0.0, 0.03, size=conc.shape).astype(np.float32)
        rgb = i0 * np.exp(-(conc @ stains)) + rng.normal(0, 1.0, size=conc.shape)
        images.append(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    return np.stack(images)


# --- agreement with the field ------------------------------------------------------------------


def test_ihc_sample_is_bundled():
    from skimage.data import immunohistochemistry

    image = immunohistochemistry()  # bundled with scikit-image: must not need the network
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8


def test_matches_torchstain_numpy_on_real_tissue(ihc, fitted, exact_out):
    torchstain = pytest.importorskip("torchstain")
    batch, _, crops, reference = ihc
    ts = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ts.fit(reference)  # same conventions: Io=240, alpha=1, beta=0.15
    theirs = _chw(np.stack([ts.normalize(c, stains=False)[0] for c in crops]))
    assert torch.allclose(fitted.stain_matrix.double(), torch.from_numpy(ts.HERef), atol=1e-4)
    assert torch.allclose(
        fitted.max_concentrations.double(), torch.from_numpy(ts.maxCRef), rtol=1e-4
    )

    ours, info = fitted.normalize(batch)
    assert info.n_skipped == 0
    mad = _mad_per_channel(ours, theirs)
    assert (mad <= 2.0).all(), f"fast path vs torchstain MAD per channel {mad.tolist()}"
    # The exact path differs from torchstain only by rounding (torchstain truncates to uint8).
    mad_exact = _mad_per_channel(exact_out, theirs)
    assert (mad_exact <= 0.6).all(), f"exact path vs torchstain MAD {mad_exact.tolist()}"


# --- known answers -----------------------------------------------------------------------------


@pytest.mark.parametrize("site", ["site_b", "external"])
def test_recovers_known_stain_vectors(site):
    stains = SITES[site].matrix  # rows: H, DAB, residual (unit OD vectors)
    images = _chw(_render(stains, n=6, seed=len(site)))
    norm = MacenkoNormalizer()
    est = norm._estimate(images)
    assert bool(est.ok.all())
    for i in range(len(images)):
        assert _angle_deg(est.stains[i, :, 0], torch.from_numpy(stains[0])) < 3.0
        assert _angle_deg(est.stains[i, :, 1], torch.from_numpy(stains[1])) < 3.0
    norm.fit(images)  # median of the per-patch estimates
    assert _angle_deg(norm.stain_matrix[:, 0], torch.from_numpy(stains[0])) < 3.0
    assert _angle_deg(norm.stain_matrix[:, 1], torch.from_numpy(stains[1])) < 3.0


def test_recovers_site_stains_from_generator_patches():
    """On the embedded generator's strongly DAB-positive patches (DAB always sits on a
    hematoxylin background there, so DAB-negative patches have no DAB direction to find)."""
    data = generate(n_patients=6, patches_per_patient=6, image_size=96, sites=("site_b",), seed=3)
    strong = data.frame["latent_score"].to_numpy() > 2.5
    images = _chw(data.images[strong])
    truth = torch.from_numpy(SITES["site_b"].matrix)
    norm = MacenkoNormalizer().fit(images)
    assert _angle_deg(norm.stain_matrix[:, 0], truth[0]) < 3.0
    assert _angle_deg(norm.stain_matrix[:, 1], truth[1]) < 3.0


# --- safety ------------------------------------------------------------------------------------


def test_blank_and_tissue_poor_patches_are_returned_unchanged_and_counted(ihc, fitted):
    batch = ihc[0][:3]
    white = torch.full((3, 128, 128), 255, dtype=torch.uint8)
    black = torch.zeros((3, 128, 128), dtype=torch.uint8)  # all "tissue" but no colour: degenerate
    poor = white.clone()
    poor[:, :10, :10] = batch[0, :, :10, :10]  # < 1% tissue
    mixed = torch.stack([white, batch[0], poor, batch[1], black, batch[2]])
    out, info = fitted.normalize(mixed)
    assert out.shape == mixed.shape and out.dtype == torch.uint8
    assert info.skipped.tolist() == [True, False, True, False, True, False]
    assert info.n_skipped == 3
    for i in (0, 2, 4):
        assert torch.equal(out[i], mixed[i])
        assert torch.isnan(info.stains[i]).all()
    alone, _ = fitted.normalize(batch)
    # a patch's output does not depend on its batch neighbours
    assert (out[[1, 3, 5]].int() - alone.int()).abs().max() <= 1
    all_blank, info = fitted.normalize(torch.stack([white, white]))
    assert info.n_skipped == 2 and torch.equal(all_blank[0], white)


def test_the_gpu_path_maps_every_patch_like_the_cpu_path(ihc, fitted):
    """The sync-free path (GPU: map all, put skipped patches back by torch.where) gives the CPU
    path's output, skipped patches included; run here on the CPU, on the GPU by gpu-check."""
    batch = ihc[0][:3]
    white = torch.full((3, 128, 128), 255, dtype=torch.uint8)
    black = torch.zeros((3, 128, 128), dtype=torch.uint8)
    mixed = torch.stack([white, batch[0], black, batch[1], batch[2]])
    est = fitted._estimate(mixed)
    on_gpu, on_cpu = fitted._map_all(mixed, est), fitted._map_kept(mixed, est)
    assert est.ok.tolist() == [False, True, False, True, True]
    assert torch.equal(on_gpu, on_cpu)
    assert torch.equal(on_gpu[0], white) and torch.equal(on_gpu[2], black)


def test_output_is_deterministic_and_keeps_shape(ihc, fitted):
    batch = ihc[0][:8]
    a, _ = fitted.normalize(batch)
    b, _ = fitted.normalize(batch)
    assert torch.equal(a, b)
    single, _ = fitted.normalize(batch[0])  # (3,H,W) in, (3,H,W) out
    assert single.shape == batch[0].shape and torch.equal(single, a[0])
    assert not torch.equal(a, batch)


def test_float_and_uint8_input_agree(ihc, fitted):
    batch = ihc[0][:8]
    from_u8, _ = fitted.normalize(batch)
    from_float, info = fitted.normalize(batch.float())
    assert from_float.dtype == torch.uint8 and info.n_skipped == 0
    diff = (from_u8.int() - from_float.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01


def test_state_dict_round_trip(ihc, fitted):
    buffer = io.BytesIO()
    torch.save(fitted.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain tensors + floats
    restored = MacenkoNormalizer().load_state_dict(state).to("cpu")
    batch = ihc[0][:4]
    assert torch.equal(restored.normalize(batch)[0], fitted.normalize(batch)[0])
    assert set(state) >= {"stain_matrix", "max_concentrations", "io", "alpha", "beta"}


def test_fit_on_a_batch_is_the_median(ihc):
    regions = ihc[0][:5]
    singles = [MacenkoNormalizer().fit(r) for r in regions]
    stains = torch.stack([s.stain_matrix for s in singles])
    conc = torch.stack([s.max_concentrations for s in singles])
    batch_fit = MacenkoNormalizer().fit(regions)
    median = stains.median(dim=0).values  # odd count: the middle value
    assert torch.allclose(batch_fit.stain_matrix, median / median.norm(dim=0), atol=1e-6)
    assert torch.allclose(batch_fit.max_concentrations, conc.median(dim=0).values, atol=1e-6)


def test_misuse_raises_clearly():
    with pytest.raises(RuntimeError, match="not fitted"):
        MacenkoNormalizer().normalize(torch.zeros((1, 3, 8, 8), dtype=torch.uint8))
    with pytest.raises(ValueError, match="enough tissue"):
        MacenkoNormalizer().fit(torch.full((3, 32, 32), 255, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        MacenkoNormalizer().fit(torch.zeros((2, 4, 8, 8), dtype=torch.uint8))


# --- accuracy cost of each speed shortcut -----------------------------------------------------


@pytest.mark.parametrize("method", ["sort", "topk"])
def test_masked_percentile_matches_numpy(method):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn((6, 500), generator=gen, dtype=torch.float64)
    mask = (
        torch.rand((6, 500), generator=gen) < torch.tensor([1.0, 0.5, 0.1, 0.02, 0.9, 0.3])[:, None]
    )
    for q in (1.0, 50.0, 99.0, 0.0, 100.0):
        got = masked_percentile(values, mask, q, method)
        want = [np.percentile(v[m].numpy(), q) for v, m in zip(values, mask, strict=True)]
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    got = masked_percentile(values, None, 99.0, method)
    np.testing.assert_allclose(got.numpy(), np.percentile(values.numpy(), 99.0, axis=1), atol=1e-12)


def test_lut_shortcut_costs_at_most_rounding(ihc, fitted, exact_out):
    x = torch.arange(256, dtype=torch.uint8)
    lut, direct = optical_density(x, use_lut=True), optical_density(x, use_lut=False)
    assert torch.allclose(lut, direct, rtol=0, atol=1e-6)
    lut_only = MacenkoNormalizer(n_sample=None, percentile_method="sort", use_lut=True)
    out = lut_only.load_state_dict(fitted.state_dict()).normalize(ihc[0])[0]
    diff = (out.int() - exact_out.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01


def test_topk_percentiles_cost_nothing(ihc, fitted, exact_out):
    topk_only = MacenkoNormalizer(n_sample=None, percentile_method="topk", use_lut=False)
    out = topk_only.load_state_dict(fitted.state_dict()).normalize(ihc[0])[0]
    diff = (out.int() - exact_out.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01


def test_pixel_subsample_costs_little(ihc, fitted, exact_out):
    """Estimating on a 4096-pixel grid (of 16384): measured MAD ~0.4-0.6 levels on this tissue."""
    out = fitted.normalize(ihc[0])[0]  # all shortcuts on: the default path
    mad = _mad_per_channel(out, exact_out)
    assert (mad <= 1.0).all(), f"subsample MAD per channel {mad.tolist()}"
    worst = (out.double() - exact_out.double()).abs().mean(dim=(1, 2, 3)).max()
    assert worst <= 3.0, f"worst patch MAD {float(worst)}"


def test_pixel_subsample_cost_on_three_sites():
    data = generate(
        n_patients=8,
        patches_per_patient=4,
        image_size=128,
        sites=("site_a", "site_b", "site_c"),
        seed=1,
    )
    images = _chw(data.images)
    exact = MacenkoNormalizer(exact=True).fit(images[:16])
    fast = MacenkoNormalizer().load_state_dict(exact.state_dict())
    want, info_exact = exact.normalize(images)
    got, info_fast = fast.normalize(images)
    ok = ~(info_exact.skipped | info_fast.skipped)
    assert ok.sum() >= len(images) - 2
    mad = _mad_per_channel(got[ok], want[ok])
    assert (mad <= 1.5).all(), f"subsample MAD per channel {mad.tolist()}"


# --- HED jitter ----------------------------------------------------------------------------------


def test_hed_matrices_are_skimages():
    from skimage.color import hed_from_rgb, rgb_from_hed

    np.testing.assert_allclose(RGB_FROM_HED.numpy(), rgb_from_hed, atol=1e-12)
    np.testing.assert_allclose(HED_FROM_RGB.numpy(), hed_from_rgb, atol=1e-12)


def test_hed_sigma_zero_is_identity(ihc):
    batch = torch.cat([ihc[0][:4], torch.zeros((1, 3, 128, 128), dtype=torch.uint8)])
    out = HedJitter(sigma=0.0)(batch, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert (out.int() - batch.int()).abs().max() <= 1


def test_hed_jitter_is_seeded_and_changes_colour(ihc):
    batch = ihc[0][:4]
    jitter = HedJitter(sigma=0.05)
    a = jitter(batch, torch.Generator().manual_seed(7))
    b = jitter(batch, torch.Generator().manual_seed(7))
    c = jitter(batch, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == batch.shape and a.dtype == torch.uint8
    assert (a.float() - batch.float()).abs().mean() > 1.0
    single = jitter(batch[0], torch.Generator().manual_seed(7))
    assert single.shape == batch[0].shape


def test_hed_jitter_matches_skimage_deconvolution(ihc):
    """The per-patch log-space map equals skimage's separate -> scale/shift -> combine."""
    batch = ihc[0][:2]
    jitter = HedJitter(sigma=0.1)
    gen = torch.Generator().manual_seed(3)
    out = jitter(batch, gen)
    u = torch.rand((2, 2, 3), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    alpha, beta = 1.0 + 0.1 * (2 * u[:, 0] - 1), 0.1 * (2 * u[:, 1] - 1)
    rgb = np.maximum(batch.permute(0, 2, 3, 1).double().numpy() / 255.0, 1e-6)
    log_adjust = np.log(1e-6)
    stains = (np.log(rgb) / log_adjust) @ HED_FROM_RGB.numpy()  # skimage.color.separate_stains
    stains = stains * alpha.numpy()[:, None, None] + beta.numpy()[:, None, None]
    want = np.exp((stains * log_adjust) @ RGB_FROM_HED.numpy())  # skimage.color.combine_stains
    want = np.clip(np.rint(want * 255.0), 0, 255)
    got = out.permute(0, 2, 3, 1).numpy()
    assert np.abs(got - want).max() <= 1
