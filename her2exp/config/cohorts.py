"""`her2exp-manifest` and `her2exp-prepare`: the commands that write a data set (a manifest of
the user's patches, the embedded data exported, a stain-normalised copy), checked as training
would check the same `data.*` and `stain.*`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from her2exp.config.choices import SEED_MAX
from her2exp.config.common import label_rules, replaceable
from her2exp.config.data import DataConfig, SplitConfig, StainConfig
from her2exp.config.fields import check_ranges, option, ranged, refuse
from her2exp.config.train import TrainConfig, validate
from her2exp.core.errors import ConfigError, UserError


# -- her2exp-manifest ----------------------------------------------------------------------------
@dataclass
class ManifestCommand:
    """`her2exp-manifest`: a folder of patches -> manifest CSV, or the embedded data exported."""

    input: str | None = option(
        None, help="class (or HER2 score) sub-folders of patches, read as data=folder reads them"
    )
    out: str | None = option(None, help="the manifest CSV; null: <input>/manifest.csv")
    # Typed Any: Hydra parses keys like 0 as numbers (score_map={0:0,1+:0,3+:1});
    # manifest_data_config checks the maps.
    label_map: Any = option(
        None,
        help="folder name -> 0 or 1, replacing the default; null: her2_neg -> 0, her2_pos -> 1",
    )
    score_map: Any = option(
        None, help="score folder -> 0 or 1, replacing the default; null: 0, 1+ -> 0 and 3+ -> 1"
    )
    equivocal: str = option("exclude", help="IHC 2+ without ISH: exclude | positive | negative")
    patient_label: str = option(
        "error", help="a patient with patches of both labels: error | max | majority"
    )
    patient_regex: str | None = option(
        None, help="patient id from the file name: its named group or group 1"
    )
    seed: int = ranged(42, ge=0, le=SEED_MAX, help="the split seed (training's default)")
    split: SplitConfig = field(default_factory=SplitConfig)
    image_size: int = ranged(64, ge=1, help="decode check size (and the export's patch size)")
    on_bad_file: str = option("error", help="error | skip: leave bad files out, listed")
    export_synthetic: str | None = option(
        None, help="write the embedded data as PNGs + manifest in this folder instead"
    )
    n_patients: int = ranged(40, ge=1, help="export_synthetic: patients")
    patches_per_patient: int = ranged(12, ge=1, help="export_synthetic: patches per patient")
    layout: str = option("labels", help="export_synthetic's sub-folders: labels | scores")
    overwrite: bool = option(False, help="replace an existing manifest or an earlier export")


def manifest_data_config(cfg: Any) -> DictConfig:
    """The `data=folder` config a manifest command stands for, validated as training would."""
    data = {
        "source": "folder",
        "root": cfg.input,
        "equivocal": cfg.equivocal,
        "patient_label": cfg.patient_label,
        "patient_regex": cfg.patient_regex,
        "image_size": cfg.image_size,
        "on_bad_file": cfg.on_bad_file,
        "split": cfg.split,
    }
    return label_rules(cfg, data)


def manifest_out(cfg: Any) -> Path:
    """Where `her2exp-manifest root=...` writes: `out`, or <root>/manifest.csv."""
    return Path(cfg.out) if cfg.out else Path(cfg.input) / "manifest.csv"


def check_manifest(cfg: Any) -> None:
    """Values, then the user's files: an existing manifest is replaced only with overwrite=true."""
    check_ranges(cfg, ManifestCommand)
    if cfg.layout not in ("labels", "scores"):
        refuse("layout", cfg.layout, "labels or scores")
    if cfg.export_synthetic:
        replaceable(cfg.export_synthetic, "export_synthetic", cfg.overwrite, "manifest.csv")
        return
    if not cfg.input:
        raise ConfigError("give input=<folder of patches> or export_synthetic=<output folder>")
    if not Path(cfg.input).is_dir():
        raise ConfigError(f"input={cfg.input} is not a folder")
    out = manifest_out(cfg)
    if out.is_dir():
        raise UserError(f"out={out} is a folder: give the manifest's file name (cohort.csv)")
    if out.exists() and not cfg.overwrite:
        raise UserError(
            f"{out} exists (a manifest you may have edited): give another out=, or "
            "overwrite=true to replace it"
        )


# -- her2exp-prepare -----------------------------------------------------------------------------
@dataclass
class PrepareCommand:
    """`her2exp-prepare`: stain-normalise a data set once, written as PNGs + manifest."""

    out: str | None = option(None, help="the output folder (new or empty)")
    data: DataConfig = field(default_factory=DataConfig)
    stain: StainConfig = field(default_factory=StainConfig)
    seed: int = ranged(42, ge=0, le=SEED_MAX, help="the run seed the split and data follow")
    overwrite: bool = option(False, help="replace an earlier her2exp-prepare output in out")


def check_prepare(cfg: Any) -> DictConfig:
    """Validated as training validates the same data and stain; returns that train config."""
    check_ranges(cfg, PrepareCommand)
    if not cfg.out:
        raise ConfigError("out=<output folder> is required")
    full = OmegaConf.merge(
        OmegaConf.structured(TrainConfig),
        {"data": cfg.data, "stain": cfg.stain, "seed": cfg.seed, "output_dir": str(cfg.out)},
    )
    validate(full)
    if full.stain.name not in ("macenko", "macenko_jitter"):
        refuse("stain", full.stain.name, "macenko: her2exp-prepare normalises with Macenko")
    replaceable(cfg.out, "out", cfg.overwrite, "prepare.json")
    return full
