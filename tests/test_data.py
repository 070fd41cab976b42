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


def test_split_depends_on_seed_only(bundle: data.DataBundle) -> None:
    again = data.build(compose_train().data, seed=3)
    assert again.fingerprint == bundle.fingerprint
    assert (again.manifest["split"] == bundle.manifest["split"]).all()
    other = data.build(compose_train().data, seed=4)
    assert other.fingerprint != bundle.fingerprint


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
