"""Tests for the embedded HER2 IHC patch generator."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from her2exp.data import synthetic
from her2exp.data.synthetic import (
    SITES,
    SyntheticData,
    bayes_posterior,
    ceiling_auc,
    generate,
    montage,
    stain_concentrations,
)

COLUMNS = ["patient_id", "slide_id", "site", "label", "her2_score", "latent_score"]


@pytest.fixture(scope="module")
def default_set() -> tuple[SyntheticData, float]:
    """The default 100 x 20 = 2,000 patch cohort, with its generation time."""
    start = time.perf_counter()
    data = generate(seed=0)
    return data, time.perf_counter() - start


def _mean_dab(data: SyntheticData) -> np.ndarray:
    """Hand-crafted feature: mean DAB concentration by colour deconvolution with the site matrix."""
    feat = np.empty(len(data.frame))
    for site, idx in data.frame.groupby("site").indices.items():
        style = SITES[site]
        conc = stain_concentrations(data.images[idx], style.matrix, style.i0)
        feat[idx] = conc[..., 1].mean(axis=(1, 2))
    return feat


def test_same_seed_is_byte_identical_and_other_seed_differs() -> None:
    kwargs = dict(n_patients=6, patches_per_patient=3, image_size=32)
    a, b = generate(seed=3, **kwargs), generate(seed=3, **kwargs)
    c = generate(seed=4, **kwargs)
    assert a.images.tobytes() == b.images.tobytes()
    assert a.frame.equals(b.frame)
    assert a.images.tobytes() != c.images.tobytes()


def test_shapes_dtypes_and_columns(default_set: tuple[SyntheticData, float]) -> None:
    data, _ = default_set
    assert data.images.shape == (2000, 64, 64, 3)
    assert data.images.dtype == np.uint8
    assert list(data.frame.columns) == COLUMNS
    assert len(data.frame) == 2000
    f = data.frame
    assert f["patient_id"].str.fullmatch(r"P\d{4}").all()
    assert (f["slide_id"] == f["patient_id"] + "-S0").all()
    assert set(f["label"].unique()) == {0, 1}
    assert set(f["her2_score"].unique()) <= {"0", "1+", "2+", "3+"}
    assert set(f["site"].unique()) == {"site_a", "site_b"}
    assert f["latent_score"].dtype == np.float64
    # images are not degenerate: real dynamic range, some near-white lumen/background
    assert data.images.min() < 80 and data.images.max() > 230


def test_small_odd_image_size_works() -> None:
    data = generate(n_patients=4, patches_per_patient=2, image_size=17, seed=1)
    assert data.images.shape == (8, 17, 17, 3)


def test_patient_level_structure(default_set: tuple[SyntheticData, float]) -> None:
    f = default_set[0].frame
    per_patient = f.groupby("patient_id").agg(
        labels=("label", "nunique"), sites=("site", "nunique"), label=("label", "first")
    )
    assert len(per_patient) == 100
    assert (per_patient["labels"] == 1).all()
    assert (per_patient["sites"] == 1).all()
    assert per_patient["label"].sum() == 25  # round(0.25 * 100), exact
    # scores are consistent with status: 3+ only positive, 0/1+ only negative
    assert set(f.loc[f.label == 1, "her2_score"]) <= {"2+", "3+"}
    assert set(f.loc[f.label == 0, "her2_score"]) <= {"0", "1+", "2+"}
    # sites are not confounded with the label
    pos_by_site = f.groupby("site")["label"].mean()
    assert pos_by_site.max() - pos_by_site.min() < 0.1


@pytest.mark.parametrize("n_patients,fraction,expected", [(2, 0.01, 1), (10, 0.99, 9), (7, 0.5, 4)])
def test_at_least_one_patient_per_class(n_patients: int, fraction: float, expected: int) -> None:
    f = generate(n_patients, 1, 16, positive_fraction=fraction, seed=0).frame
    assert f["label"].sum() == expected


def test_ceiling_auc_is_high_but_below_one(default_set: tuple[SyntheticData, float]) -> None:
    f = default_set[0].frame
    auc = ceiling_auc(f["label"].to_numpy(), f["latent_score"].to_numpy())
    assert 0.9 < auc < 1.0


def test_bayes_posterior_is_a_monotone_probability() -> None:
    x = np.linspace(-2.0, 5.0, 701)
    p = bayes_posterior(x)
    assert np.all((p >= 0.0) & (p <= 1.0))
    assert p[0] < 1e-6 and p[-1] > 0.999
    assert np.all(np.diff(p) >= -1e-12)
    # prior shifts the posterior the right way
    assert bayes_posterior(np.array([2.2]), 0.5)[0] > bayes_posterior(np.array([2.2]), 0.1)[0]


def test_bayes_posterior_matches_empirical_frequency() -> None:
    # large latent-only cohort: in a latent bin, the label frequency equals the posterior
    rng = np.random.default_rng(0)
    n = 200_000
    y = (rng.random(n) < 0.25).astype(int)
    neg = rng.choice([0.0, 1.0, 2.0], size=n, p=[0.45, 0.40, 0.15])
    pos = rng.choice([2.3, 3.0], size=n, p=[0.3, 0.7])
    sd = np.hypot(synthetic.SIGMA_PATIENT, synthetic.SIGMA_PATCH)
    x = np.where(y == 1, pos, neg) + rng.normal(0.0, sd, size=n)
    in_bin = (x > 2.0) & (x < 2.2)
    assert abs(y[in_bin].mean() - bayes_posterior(np.array([2.1]))[0]) < 0.03


def test_label_is_visible_in_pixels(default_set: tuple[SyntheticData, float]) -> None:
    data, _ = default_set
    feat = _mean_dab(data)
    assert roc_auc_score(data.frame["label"], feat) > 0.8
    # DAB tracks the latent expression, not just the label
    assert np.corrcoef(feat, data.frame["latent_score"])[0, 1] > 0.8


def test_sites_differ_in_mean_colour() -> None:
    data = generate(n_patients=8, patches_per_patient=10, sites=list(SITES), seed=2)
    means = {
        site: data.images[idx].reshape(-1, 3).mean(axis=0)
        for site, idx in data.frame.groupby("site").indices.items()
    }
    assert set(means) == set(SITES)
    names = sorted(means)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.linalg.norm(means[a] - means[b]) > 3.0, (a, b)


def test_site_styles_are_physical() -> None:
    assert {"site_a", "site_b", "external"} <= set(SITES)
    for style in SITES.values():
        m = style.matrix
        assert m.shape == (3, 3)
        np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-5)
        assert np.all(m >= 0.0)
        assert abs(np.linalg.det(m)) > 1e-3  # invertible, so deconvolution is defined
        assert 230.0 <= style.i0 <= 255.0


def test_generation_speed(default_set: tuple[SyntheticData, float]) -> None:
    # target is < 5 s on 2 cores; generous bound against noisy CI machines
    assert default_set[1] < 15.0


def test_montage_layout(default_set: tuple[SyntheticData, float]) -> None:
    grid = montage(default_set[0], per_group=3)
    assert grid.dtype == np.uint8
    # 2 sites x 2 labels rows, 3 columns, 2 px gaps
    assert grid.shape == (4 * 64 + 3 * 2, 3 * 64 + 2 * 2, 3)
    assert (grid[64:66] == 255).all()


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(n_patients=1), "n_patients"),
        (dict(patches_per_patient=0), "patches_per_patient"),
        (dict(image_size=8), "image_size"),
        (dict(positive_fraction=0.0), "positive_fraction"),
        (dict(positive_fraction=1.0), "positive_fraction"),
        (dict(sites=()), "sites"),
        (dict(sites="site_a"), "sites"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate(**kwargs)


def test_unknown_site_names_site_and_allowed() -> None:
    with pytest.raises(ValueError, match="mars") as err:
        generate(sites=("site_a", "mars"))
    assert "site_a" in str(err.value) and "external" in str(err.value)
