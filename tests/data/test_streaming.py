"""data.cache=false (issue 17, item 1): patches decoded in the DataLoader workers, never all at
once. The same model inputs and fingerprint as data.cache=true, every bad file still listed
before training (a header check, or data.verify=full), a file that goes bad later named when it
is read, and peak RSS that does not grow with the number of patches."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO, compose_train
from her2exp import data
from her2exp.config import ConfigError, DataConfig, validate
from her2exp.data.sources import DataValidationError, FilePatches, PatchReadError
from her2exp.runtime.distributed import DistContext
from her2exp.training import builders

CPU = torch.device("cpu")
SIZE = 32
REGEX = "^(p[0-9]+)_"  # the patient of "p03_0001.png"
ENTRY = Path(__file__).with_name("stream_rss_entry.py")


def write_patches(
    root: Path, per_patient: int, size: int = SIZE, patients: int = 20, distinct: int = 0
) -> list[Path]:
    """her2_pos/ (the first quarter of the patients) and her2_neg/ PNGs `p<patient>_<k>.png`:
    noisy pink patches, `distinct` of them (0: every file its own) encoded once (PNG,
    compress_level=1) and written as bytes, so a large folder takes a fraction of a second."""
    rng = np.random.default_rng(0)
    n = patients * per_patient
    pool = []
    for _ in range(distinct or n):
        noise = rng.integers(-40, 40, (size, size, 3))
        image = np.clip(np.array([200, 120, 180]) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG", compress_level=1)
        pool.append(buf.getvalue())
    files = []
    for p in range(patients):
        folder = root / ("her2_pos" if p < patients // 4 else "her2_neg")
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_patient):
            file = folder / f"p{p:02d}_{k:04d}.png"
            file.write_bytes(pool[(p * per_patient + k) % len(pool)])
            files.append(file)
    return files


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream") / "patches"
    write_patches(root, per_patient=5)
    return root


def data_cfg(source: str, **overrides: object) -> OmegaConf:
    cfg = OmegaConf.structured(DataConfig)
    cfg.source, cfg.image_size = source, SIZE
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def model_inputs(root: Path, cache: bool, workers: int, epoch: int = 1) -> tuple:
    """(DataParts, dataset index -> the float row the model sees) for one training epoch through
    build_data's real loaders, with the stain (Macenko + HED jitter) in the workers' collate."""
    cfg = compose_train(
        ["experiment=smoke", "tracking=off", "data=folder", f"data.root={root}",
         f"data.image_size={SIZE}", f"data.patient_regex='{REGEX}'", f"data.cache={cache}",
         f"data.num_workers={workers}", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
         "stain=macenko_jitter", "stain.on_device=false", "stain.sigma=0.2"]
    )  # fmt: skip
    parts = builders.build_data(cfg, DistContext(0, 0, 1, CPU, None))
    loader = parts.loaders["train"]
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    out = {}
    for x, _, idx in loader:
        for i, row in zip(idx.tolist(), parts.preprocess(x, True, epoch, idx), strict=True):
            out[i] = row
    return parts, out


def test_cache_false_feeds_the_model_what_cache_true_does(folder: Path) -> None:
    cached_parts, cached = model_inputs(folder, cache=True, workers=0)
    assert isinstance(cached_parts.bundle.patches, data.InMemoryPatches)
    n_train = len(cached_parts.loaders["train"].dataset)
    assert len(cached) >= n_train - 1 > 50  # drop_last drops at most a lone last sample
    reference = cached_parts.stain.state_dict()["normalizer"]
    for workers in (0, 2):
        parts, streamed = model_inputs(folder, cache=False, workers=workers)
        assert isinstance(parts.bundle.patches, FilePatches)
        assert parts.bundle.fingerprint == cached_parts.bundle.fingerprint
        fitted = parts.stain.state_dict()["normalizer"]
        assert all(
            torch.equal(torch.as_tensor(fitted[k]), torch.as_tensor(v))
            for k, v in reference.items()
        )
        assert set(streamed) == set(cached)
        for i, row in cached.items():
            assert torch.equal(streamed[i], row), (workers, i)


@pytest.mark.parametrize("verify", ["header", "full"])
def test_manifest_source_same_pixels_and_fingerprint(
    folder: Path, tmp_path: Path, verify: str
) -> None:
    files = sorted(folder.rglob("*.png"))
    manifest = tmp_path / "m.csv"
    pd.DataFrame(
        {
            "path": [str(f) for f in files],
            "label": [int(f.parent.name == "her2_pos") for f in files],
            "patient_id": [f.name.split("_")[0] for f in files],
        }
    ).to_csv(manifest, index=False)
    cached = data.build(data_cfg("manifest", path=str(manifest)), seed=3)
    lazy = data.build(data_cfg("manifest", path=str(manifest), cache=False, verify=verify), seed=3)
    assert lazy.fingerprint == cached.fingerprint
    pd.testing.assert_frame_equal(lazy.manifest, cached.manifest)
    view = lazy.view("test")
    rows = cached.indices("test")
    assert view.shape == (len(rows), SIZE, SIZE, 3) and view.ndim == 4
    np.testing.assert_array_equal(view[[0, -1]], cached.images[rows[[0, -1]]])
    np.testing.assert_array_equal(view[1], cached.images[rows[1]])
    np.testing.assert_array_equal(lazy.patches.read(5).permute(1, 2, 0), cached.images[5])
    with pytest.raises(TypeError, match="bundle.view"):
        lazy.images  # noqa: B018 - the property is what is tested


def bad_manifest(folder: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The good patches plus a missing file, a text file, a 16-bit PNG and a truncated PNG."""
    good = sorted(folder.rglob("*.png"))
    (tmp_path / "notes.png").write_text("not an image")
    Image.fromarray(np.full((SIZE, SIZE), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    whole = good[0].read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    bad = {
        "gone.png": "missing file",
        "notes.png": "not a PNG, JPEG or TIFF",
        "deep.png": "not an 8-bit image",
        "cut.png": "truncated",
    }
    rows = [(str(f), int(f.parent.name == "her2_pos"), f.name.split("_")[0]) for f in good]
    rows += [(str(tmp_path / name), 0, name) for name in bad]
    path = tmp_path / "m.csv"
    pd.DataFrame(rows, columns=["path", "label", "patient_id"]).to_csv(path, index=False)
    return path, bad


@pytest.mark.parametrize(
    ("cache", "verify"), [(False, "header"), (False, "full"), (True, "header")]
)
def test_every_bad_file_is_listed_before_training(
    folder: Path, tmp_path: Path, cache: bool, verify: str
) -> None:
    path, bad = bad_manifest(folder, tmp_path)
    cfg = data_cfg("manifest", path=str(path), cache=cache, verify=verify)
    with pytest.raises(DataValidationError) as info:
        data.build(cfg, seed=0)
    problems = info.value.problems
    listed = dict(
        zip(problems["path"].map(lambda p: Path(p).name), problems["problem"], strict=True)
    )
    # A header check reads no pixels: the truncated file passes it (and fails when read);
    # data.verify=full, and data.cache=true (which decodes anyway), list it too.
    expected = {k: v for k, v in bad.items() if k != "cut.png" or cache or verify == "full"}
    assert set(listed) == set(expected)
    for name, problem in expected.items():
        assert problem in listed[name], name
        assert re.search(rf"{re.escape(name)}: .*{problem}", str(info.value)), name


def test_a_file_deleted_after_validation_fails_when_read_naming_it(tmp_path: Path) -> None:
    write_patches(tmp_path / "p", per_patient=4)
    cfg = data_cfg("folder", root=str(tmp_path / "p"), patient_regex=REGEX, cache=False)
    cfg.num_workers = 2
    bundle = data.build(cfg, seed=0)
    row = int(bundle.indices("train")[3])
    victim = str(bundle.manifest["path"][row])
    Path(victim).unlink()
    with pytest.raises(PatchReadError, match=f"^her2exp: {re.escape(victim)}: missing file"):
        bundle.patches.read(row)
    train = data.make_dataset(bundle, "train", cfg, 0)
    loader = data.train_loader(train, cfg, 0, 0, 1, CPU)
    with pytest.raises(PatchReadError) as info:  # raised in a worker, re-raised here
        list(loader)
    # The worker's traceback, ending in the one line that names the file.
    assert (
        str(info.value)
        .splitlines()[-1]
        .startswith(f"{PatchReadError.__module__}.PatchReadError: her2exp: {victim}: missing file")
    )


def test_cache_false_is_for_file_sources_and_verify_is_checked(folder: Path) -> None:
    validate(compose_train(["data=folder", "data.cache=false", "data.verify=full"]))
    validate(compose_train(["data=manifest", "data.cache=false"]))
    with pytest.raises(
        ConfigError, match=r"^data.cache=False .*data=synthetic \(it is generated in memory"
    ):
        validate(compose_train(["data.cache=false"]))
    with pytest.raises(ConfigError, match="^data.verify='quick' .*one of header, full"):
        validate(compose_train(["data=folder", "data.cache=false", "data.verify=quick"]))


# --- memory ---------------------------------------------------------------------------------------


def peak_rss(folders: list[Path], cache: bool) -> list[dict]:
    """stream_rss_entry.py on each folder, all at once, each in a fresh interpreter (its peak RSS
    is its own): what each reports."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(ENTRY), str(f), str(cache).lower()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for f in folders
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.fixture(scope="module")
def small_and_large(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """200 and 2,000 patches of 128 px (about 10 and 100 MB decoded)."""
    base = tmp_path_factory.mktemp("rss")
    for name, per_patient in (("small", 10), ("large", 100)):
        write_patches(base / name, per_patient, size=128, distinct=16)
    return [base / "small", base / "large"]


def test_peak_rss_with_cache_false_does_not_grow_with_the_number_of_patches(
    small_and_large: list[Path],
) -> None:
    small, large = peak_rss(small_and_large, cache=False)
    assert large["seen"] >= 9 * small["seen"] > 0  # a full epoch of 10x the patches
    assert small["fit"] and small["galleries"] == large["galleries"] == 2
    assert large["peak"] < 1.10 * small["peak"], (small, large)


@pytest.mark.slow
def test_peak_rss_with_cache_true_does_grow(small_and_large: list[Path]) -> None:
    """The control: the same bound fails with every patch decoded up front."""
    small, large = peak_rss(small_and_large, cache=True)
    assert large["peak"] > 1.10 * small["peak"], (small, large)
