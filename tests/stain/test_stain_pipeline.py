"""Stain handling wired into training, evaluation and preparation (her2exp/stain/pipeline.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_train
from her2exp.core import checkpoint
from her2exp.data import synthetic
from her2exp.stain import pipeline as stain_pipeline
from her2exp.stain.macenko import MacenkoNormalizer
from her2exp.training import run as train_mod

SMOKE = ["experiment=smoke", "tracking=off", "trainer.epochs=1"]


def _train(tmp: Path, *extra: str) -> dict:
    return train_mod.train(compose_train([*SMOKE, *extra], tmp))


def _key(summary: dict) -> tuple:
    flat = summary["test_evaluation"].as_flat_dict("test_")
    return summary["best_val_auc"], summary["threshold_youden_val"], flat["test_auc"]


@pytest.fixture(scope="module")
def macenko_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("macenko")
    return _train(tmp, "stain=macenko"), tmp


def test_macenko_reference_is_saved_with_the_run(macenko_run) -> None:
    _, run_dir = macenko_run
    saved = checkpoint.load(run_dir / "checkpoints" / "stain_reference.pt")
    best = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    torch.testing.assert_close(
        best["stain"]["normalizer"]["stain_matrix"], saved["normalizer"]["stain_matrix"]
    )
    # Evaluation rebuilds the identical normaliser from the saved state (no refitting).
    cfg = compose_train([*SMOKE, "stain=macenko"])
    again = stain_pipeline.from_state(cfg.stain, best["stain"], 0)
    data = synthetic.generate(n_patients=4, patches_per_patient=4, image_size=32, seed=9)
    batch = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()
    fresh = MacenkoNormalizer(rescale=cfg.stain.rescale).load_state_dict(saved["normalizer"])
    assert torch.equal(again(batch, False), fresh.normalize(batch)[0])


def test_on_device_and_in_worker_normalisation_agree(macenko_run, tmp_path: Path) -> None:
    summary, _ = macenko_run
    on_device = _train(tmp_path, "stain=macenko", "stain.on_device=true")
    assert _key(on_device) == _key(summary)


def test_hed_jitter_is_reproducible_across_worker_counts(tmp_path: Path) -> None:
    a = _train(tmp_path / "a", "stain=hed_jitter", "stain.sigma=0.2")
    b = _train(tmp_path / "b", "stain=hed_jitter", "stain.sigma=0.2", "data.num_workers=2")
    plain = _train(tmp_path / "c")
    assert _key(a) == _key(b)
    assert _key(a) != _key(plain)  # the augmentation really changed the training batches


def test_rescale_modes() -> None:
    """Colour-only normalisation of a patch already in the reference's stains is the identity;
    classic Macenko ("all") also rescales DAB, so it is not."""
    data = synthetic.generate(n_patients=4, patches_per_patient=4, image_size=48, seed=1)
    batch = torch.from_numpy(data.images[data.frame["site"].to_numpy() == "site_a"])
    batch = batch.permute(0, 3, 1, 2).contiguous()[:1]
    for rescale, identity in (("none", True), ("all", False)):
        norm = MacenkoNormalizer(rescale=rescale, exact=True).fit(batch[0])
        norm.max_concentrations = norm.max_concentrations * torch.tensor([1.0, 2.0])
        out = norm.normalize(batch)[0]
        diff = (out.float() - batch.float()).abs().mean().item()
        assert (diff < 1.5) == identity, (rescale, diff)


def test_prepare_writes_a_normalised_manifest_that_trains(tmp_path: Path) -> None:
    """her2exp-manifest's export and her2exp-prepare through their mains in this process (an
    interpreter start each cost seconds; test_reliability_files runs both as processes)."""
    from her2exp.cli import manifest, prepare
    from her2exp.cli.common import compose

    src, out = tmp_path / "src", tmp_path / "prepared"
    export = [f"export_synthetic={src}", "n_patients=16", "patches_per_patient=6", "image_size=32"]
    manifest.main(compose("manifest", export))
    folder = ["data=folder", f"data.root={src}", 'data.patient_regex="^([^-]+)-"']
    prepare.main(compose("prepare", [f"out={out}", *folder, "data.image_size=32"]))
    manifest = pd.read_csv(out / "manifest.csv")
    assert len(manifest) == 16 * 6 and (out / manifest["path"]).map(Path.is_file).all()
    record = json.loads((out / "prepare.json").read_text())
    assert record["stain"]["name"] == "macenko" and len(record["reference_stain_matrix"]) == 3
    assert record["n_patches"] == 16 * 6
    summary = _train(tmp_path / "run", "data=manifest", f"data.path={out / 'manifest.csv'}")
    assert np.isfinite(summary["best_val_auc"])
