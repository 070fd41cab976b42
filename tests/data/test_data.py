"""Patient-grouped stratified splits and the loaders built on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_train
from her2exp import data
from her2exp.data import splits


@pytest.fixture(scope="module")
def bundle() -> data.DataBundle:
    return data.build(compose_train().data, seed=3)


def test_no_patient_in_two_splits(bundle: data.DataBundle) -> None:
    per_patient = bundle.manifest.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all()


def test_splits_are_stratified_and_sized(bundle: data.DataBundle) -> None:
    m = bundle.manifest
    patients = m.groupby("patient_id").agg(label=("label", "max"), split=("split", "first"))
    share = patients.groupby("split").size() / len(patients)
    assert share["train"] == pytest.approx(0.7, abs=0.03)
    assert share["val"] == pytest.approx(0.15, abs=0.03)
    prevalence = patients.groupby("split")["label"].mean()
    assert (prevalence - patients["label"].mean()).abs().max() < 0.05
    counts = bundle.counts()
    assert sum(c["her2_pos"] + c["her2_neg"] for c in counts.values()) == len(m)


def test_split_depends_on_seed_only() -> None:
    """On 24 x 4 patches of 32 px (building the default 100 x 20 of 64 px costs ~3 s a time; the
    split's code is the same for any size)."""
    cfg = compose_train(["data.n_patients=24", "data.patches_per_patient=4", "data.image_size=32"])
    first = data.build(cfg.data, seed=3)
    again = data.build(cfg.data, seed=3)
    assert again.fingerprint == first.fingerprint
    assert (again.manifest["split"] == first.manifest["split"]).all()
    other = data.build(cfg.data, seed=4)
    assert other.fingerprint != first.fingerprint


def test_check_names_the_split_missing_a_class(bundle: data.DataBundle) -> None:
    m = bundle.manifest.copy()
    m.loc[(m["split"] == "val") & (m["label"] == 1), "split"] = "train"
    with pytest.raises(ValueError, match="split 'val' has no HER2\\+"):
        splits.check(m)
    m = bundle.manifest.copy()
    m.loc[m.index[0], "split"] = "test" if m.loc[m.index[0], "split"] != "test" else "val"
    with pytest.raises(ValueError, match="patients in more than one split"):
        splits.check(m)


def test_train_loader_epochs_shuffle_reproducibly(bundle: data.DataBundle) -> None:
    cfg = compose_train().data
    ds = data.make_dataset(bundle, "train", cfg, seed=0)
    loader = data.train_loader(ds, cfg, 0, 0, 1, torch.device("cpu"))

    def first_batch(epoch: int) -> torch.Tensor:
        loader.sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        return next(iter(loader))[0]

    torch.testing.assert_close(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_eval_loader_keeps_dataset_order(bundle: data.DataBundle) -> None:
    cfg = compose_train().data
    ds = data.make_dataset(bundle, "val", cfg, seed=0)
    labels = torch.cat([y for _, y, _ in data.eval_loader(ds, cfg, torch.device("cpu"))]).numpy()
    assert np.array_equal(labels, bundle.labels("val"))


def test_global_batch_must_divide_by_world_size(bundle: data.DataBundle) -> None:
    cfg = OmegaConf.merge(compose_train().data, {"batch_size": 63})
    ds = data.make_dataset(bundle, "train", cfg, seed=0)
    with pytest.raises(ValueError, match="data.batch_size=63 is the global batch"):
        data.train_loader(ds, cfg, 0, 0, 2, torch.device("cpu"))


def test_augmentation_is_a_dihedral_transform(bundle: data.DataBundle) -> None:
    cfg = compose_train().data
    plain = data.make_dataset(bundle, "train", OmegaConf.merge(cfg, {"augment": False}), 0)
    aug = data.make_dataset(bundle, "train", cfg, 0)
    x, _, _ = plain[5]
    variants = [torch.rot90(x, k, (1, 2)) for k in range(4)]
    variants += [torch.flip(v, (2,)) for v in variants]
    seen = set()
    for epoch in range(8):
        aug.set_epoch(epoch)
        y, _, _ = aug[5]
        matches = [i for i, v in enumerate(variants) if torch.equal(v, y)]
        assert matches, "augmented patch is not a rotation/flip of the original"
        seen.add(matches[0])
    assert len(seen) > 1


# -- data.split_seed / data.data_seed (issue 14, part 2, item 4) ----------------------------------
def _data_cfg(*overrides: str):
    return compose_train(["data.n_patients=30", "data.patches_per_patient=4", *overrides]).data


def test_a_seed_sweep_with_fixed_split_and_data_seeds_keeps_every_patient_in_place() -> None:
    """Only the initialisation varies across `-m seed=1,2` once the split and data seeds are fixed:
    the same patients, patches and splits (same fingerprint); without them the split moves."""
    fixed = [data.build(_data_cfg("data.split_seed=7", "data.data_seed=7"), seed=s) for s in (1, 2)]
    assert fixed[0].fingerprint == fixed[1].fingerprint
    assert (fixed[0].manifest["split"] == fixed[1].manifest["split"]).all()
    np.testing.assert_array_equal(fixed[0].images, fixed[1].images)
    moving = [data.build(_data_cfg(), seed=s) for s in (1, 2)]
    assert not (moving[0].manifest["split"] == moving[1].manifest["split"]).all()


def test_split_seed_alone_moves_patients_but_not_pixels() -> None:
    a = data.build(_data_cfg("data.split_seed=1"), seed=5)
    b = data.build(_data_cfg("data.split_seed=2"), seed=5)
    np.testing.assert_array_equal(a.images, b.images)  # same patients rendered
    assert not (a.manifest["split"] == b.manifest["split"]).all()


def test_null_seeds_are_the_run_seed_so_old_runs_are_unchanged() -> None:
    """Default null == the run's seed: the fingerprint (and so `her2exp-rerun`) is unchanged."""
    default = data.build(_data_cfg(), seed=9)
    explicit = data.build(_data_cfg("data.split_seed=9", "data.data_seed=9"), seed=9)
    assert default.fingerprint == explicit.fingerprint
    assert data.seeds(_data_cfg(), 9) == (9, 9)


# -- patch stores: the dataset reads pixels only through PatchStore -----------------------------
class LazyPatches:
    """A store that decodes on demand (as a worker-decoding or slide store would): PNG bytes."""

    def __init__(self, images: np.ndarray) -> None:
        import io

        from PIL import Image

        self.files = []
        for img in images:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            self.files.append(buf.getvalue())
        self.reads = 0

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, row: int) -> np.ndarray:
        import io

        from PIL import Image

        self.reads += 1
        return np.array(Image.open(io.BytesIO(self.files[int(row)])).convert("RGB"))

    def read(self, row: int) -> torch.Tensor:
        return torch.from_numpy(self._decode(row)).permute(2, 0, 1)

    def read_many(self, rows: np.ndarray) -> np.ndarray:
        return np.stack([self._decode(r) for r in rows])


def test_a_lazy_store_plugs_in_without_changing_a_sample(bundle: data.DataBundle) -> None:
    cfg = compose_train().data
    lazy = data.DataBundle(bundle.manifest, LazyPatches(bundle.images), bundle.fingerprint)
    assert isinstance(lazy.patches, data.PatchStore)
    eager_ds = data.make_dataset(bundle, "train", cfg, seed=3)
    lazy_ds = data.make_dataset(lazy, "train", cfg, seed=3)
    eager_ds.set_epoch(2)
    lazy_ds.set_epoch(2)
    for i in (0, 5, len(eager_ds) - 1):  # augmented (train, epoch 2): same draw, same pixels
        (xa, ya, ia), (xb, yb, ib) = eager_ds[i], lazy_ds[i]
        assert torch.equal(xa, xb) and ya == yb and ia == ib
    assert lazy.patches.reads == 3  # read on demand, nothing decoded up front
    np.testing.assert_array_equal(lazy.read("val"), bundle.read("val"))
    with pytest.raises(TypeError, match="read lazily"):
        _ = lazy.images


# -- data.positive_patch_fraction (issue 19): a bag task from the embedded generator ------------
def test_positive_patch_fraction_null_keeps_todays_pixels_and_fingerprint() -> None:
    """Unset, the generator and the fingerprint are those of before the knob existed."""
    small = "data.image_size=16"
    cfg = _data_cfg(small)
    assert cfg.positive_patch_fraction is None
    today = data.build(cfg, seed=4)
    assert "signal" not in today.manifest
    old = OmegaConf.create(OmegaConf.to_container(cfg))
    del old["positive_patch_fraction"]  # the schema before the knob
    assert today.fingerprint == data._fingerprint(old, 4, today.manifest)
    again = data.build(_data_cfg(small, "data.positive_patch_fraction=null"), seed=4)
    np.testing.assert_array_equal(today.images, again.images)
    diluted = data.build(_data_cfg(small, "data.positive_patch_fraction=0.5"), seed=4)
    assert diluted.fingerprint != today.fingerprint


def test_positive_patch_fraction_sets_the_signal_patches_of_each_positive_patient() -> None:
    """0.2 of 20 patches: exactly 4 of each HER2+ patient carry the signal (the generator's own
    truth column), the rest and every HER2- patient look negative; labels stay the patient's."""
    from her2exp.data import synthetic

    kwargs = dict(n_patients=24, patches_per_patient=20, image_size=16, seed=2)
    plain = synthetic.generate(**kwargs)
    focal = synthetic.generate(**kwargs, positive_patch_fraction=0.2)
    f = focal.frame
    assert (f["label"] == plain.frame["label"]).all()
    per_patient = f[f["label"] == 1].groupby("patient_id")["signal"].mean()
    assert len(per_patient) > 0 and (per_patient == 0.2).all()
    assert not f.loc[f["label"] == 0, "signal"].any()
    # Signal patches keep their expression; decoys fall to the HER2- range.
    sig = f["signal"].to_numpy()
    np.testing.assert_array_equal(f["latent_score"][sig], plain.frame["latent_score"][sig])
    decoy = (f["label"] == 1) & ~f["signal"]
    assert f.loc[decoy, "latent_score"].mean() < f.loc[f["signal"], "latent_score"].mean() - 1.0
    neg = (f["label"] == 0).to_numpy()
    np.testing.assert_array_equal(focal.images[neg], plain.images[neg])  # negatives unchanged


def test_positive_patch_fraction_is_refused_outside_the_generator() -> None:
    from her2exp.config import ConfigError, validate_data

    cfg = _data_cfg("data.positive_patch_fraction=0.2")
    cfg.source, cfg.root, cfg.cache = "folder", "/nowhere", True
    with pytest.raises(ConfigError, match="data.positive_patch_fraction=0.2 is not allowed"):
        validate_data(cfg, None)
