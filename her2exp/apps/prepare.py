"""Stain-normalise a data set once, so training pays nothing per epoch (the library part of
`her2exp-prepare`, her2exp/cli/prepare.py). Writes PNGs, a manifest that `data=manifest`
reads, the fitted reference and the parameters used (prepare.json), so the prepared set records
how it was made.

    her2exp-prepare out=DIR data=folder data.root=/path/patches [stain.reference=ref.png]
    her2exp-prepare out=DIR data=manifest data.path=cohort.csv stain.rescale=all
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from her2exp import data, reports
from her2exp.config import ConfigError
from her2exp.core import checkpoint, fileio
from her2exp.stain import pipeline as stain_pipeline

OWN_FILE = "prepare.json"  # what marks a folder as an earlier her2exp-prepare output


def _write_images(
    stain: stain_pipeline.StainPipeline,
    images: np.ndarray | data.RowView,
    patients: list[str],
    out: Path,
) -> tuple[list[str], int]:
    """Normalise in batches of 256 and write `images/{i:06d}_{patient}.png` under `out`; the
    patient id is the manifest's, so it goes through `fileio.safe_name` (an id `../../x` or
    `a/b` must not leave `out` or share a file). Returns (relative paths, patches skipped)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths, skipped = [], 0
    for start in range(0, len(images), 256):  # 256 patches read at a time (data.cache=false)
        chunk = torch.from_numpy(images[start : start + 256]).permute(0, 3, 1, 2)
        normed, info = stain.normalizer.normalize(chunk)
        skipped += info.n_skipped
        for j, patch in enumerate(normed.permute(0, 2, 3, 1).numpy()):
            i = start + j
            rel = f"images/{i:06d}_{fileio.safe_name(patients[i])}.png"
            Image.fromarray(patch).save(fileio.inside(out, rel))
            paths.append(rel)
    return paths, skipped


def prepare(cfg: DictConfig, out: Path, overwrite: bool = False) -> dict:
    """Normalise every patch of `cfg.data` with a Macenko reference fitted as training fits it
    (`cfg`: a validated training config, schemas.check_prepare); returns prepare.json's record.

    `out` must be new or empty, or with `overwrite` an earlier output (FileExistsError). The set
    is built in a temporary sibling folder and moved into place at the end: a failure leaves an
    old `out` as it was, and images of a larger earlier set never linger."""
    out = Path(out)
    fileio.check_replaceable(out, "out", overwrite, OWN_FILE)
    try:
        bundle = data.build_cohort(cfg.data, cfg.seed)
        stain = stain_pipeline.build(cfg.stain, bundle.view(), cfg.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    manifest = bundle.manifest.drop(columns=["split", "latent_score"], errors="ignore").copy()
    with fileio.staged_dir(out) as tmp:
        paths, skipped = _write_images(stain, bundle.view(), list(manifest["patient_id"]), tmp)
        record = _write_records(cfg, bundle, stain, manifest, paths, skipped, tmp)
    return record


def _write_records(
    cfg: DictConfig,
    bundle: data.DataBundle,
    stain: stain_pipeline.StainPipeline,
    manifest: pd.DataFrame,
    paths: list[str],
    skipped: int,
    out: Path,
) -> dict:
    """manifest.csv (paths relative to it), the fitted reference and prepare.json."""
    if "path" in manifest:
        manifest = manifest.rename(columns={"path": "source_path"})
    manifest.insert(0, "path", paths)
    reports.atomic_write_text(out / "manifest.csv", manifest.to_csv(index=False))
    state = stain.state_dict()
    checkpoint.save(state, out / "stain_reference.pt")
    record = {
        "stain": OmegaConf.to_container(cfg.stain, resolve=True),
        "reference_stain_matrix": state["normalizer"]["stain_matrix"].tolist(),
        "reference_max_concentrations": state["normalizer"]["max_concentrations"].tolist(),
        "source": OmegaConf.to_container(cfg.data, resolve=True),
        "source_fingerprint": bundle.fingerprint,
        "n_patches": len(paths),
        "n_left_unchanged": skipped,
        "seed": cfg.seed,
    }
    reports.atomic_write_text(out / OWN_FILE, json.dumps(record, indent=2) + "\n")
    return record
