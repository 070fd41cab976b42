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

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from her2exp import checkpoint, data, reports
from her2exp.config import ConfigError
from her2exp.stain import pipeline as stain_pipeline


def prepare(cfg: DictConfig, out: Path) -> dict:
    """Normalise every patch of `cfg.data` with a Macenko reference fitted as training fits it
    (`cfg`: a validated training config, schemas.check_prepare); returns prepare.json's record."""
    try:
        bundle = data.build_cohort(cfg.data, cfg.seed)
        stain = stain_pipeline.build(cfg.stain, bundle.images, cfg.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    out.mkdir(parents=True, exist_ok=True)
    images = torch.from_numpy(bundle.images).permute(0, 3, 1, 2)
    manifest = bundle.manifest.drop(columns=["split", "latent_score"], errors="ignore").copy()
    paths, skipped = [], 0
    for start in range(0, len(images), 256):
        normed, info = stain.normalizer.normalize(images[start : start + 256])
        skipped += info.n_skipped
        for j, patch in enumerate(normed.permute(0, 2, 3, 1).numpy()):
            i = start + j
            rel = Path("images") / f"{i:06d}_{manifest.iloc[i]['patient_id']}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(patch).save(out / rel)
            paths.append(str(rel))
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
    reports.atomic_write_text(out / "prepare.json", json.dumps(record, indent=2) + "\n")
    return record
