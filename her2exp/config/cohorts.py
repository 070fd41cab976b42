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
from her2exp.config.fields import check_ranges, ranged, refuse
from her2exp.config.train import TrainConfig, validate
from her2exp.core.errors import ConfigError, UserError


# -- her2exp-manifest ----------------------------------------------------------------------------
@dataclass
class ManifestCommand:
    """`her2exp-manifest`: a folder of patches -> manifest CSV, or the embedded data exported."""

    root: str | None = None  # class (or HER2 score) sub-folders, read as data=folder reads them
    out: str | None = None  # null: <root>/manifest.csv
    # null: data=folder's maps; given, a map replaces it (names -> 0 or 1). Typed Any: Hydra
    # parses keys like 0 as numbers (score_map={0:0,1+:0,3+:1}); manifest_data_config checks.
    label_map: Any = None  # null: her2_neg -> 0, her2_pos -> 1
    score_map: Any = None  # null: 0, 1+ -> 0 and 3+ -> 1
    equivocal: str = "exclude"
    patient_label: str = "error"  # a patient with patches of both labels: error | max | majority
    patient_regex: str | None = None
    seed: int = ranged(42, ge=0, le=SEED_MAX)  # the split seed: training's default
    split: SplitConfig = field(default_factory=SplitConfig)
    image_size: int = ranged(64, ge=1)  # decode check size (and the export's patch size)
    on_bad_file: str = "error"  # error | skip: leave bad files out, listed
    export_synthetic: str | None = None  # write the embedded data as PNGs + manifest here
    n_patients: int = ranged(40, ge=1)
    patches_per_patient: int = ranged(12, ge=1)
    layout: str = "labels"  # labels | scores (export sub-folders)
    overwrite: bool = False  # replace an existing manifest / an earlier export


def manifest_data_config(cfg: Any) -> DictConfig:
    """The `data=folder` config a manifest command stands for, validated as training would."""
    data = {
        "source": "folder",
        "root": cfg.root,
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
    return Path(cfg.out) if cfg.out else Path(cfg.root) / "manifest.csv"


def check_manifest(cfg: Any) -> None:
    """Values, then the user's files: an existing manifest is replaced only with overwrite=true."""
    check_ranges(cfg, ManifestCommand)
    if cfg.layout not in ("labels", "scores"):
        refuse("layout", cfg.layout, "labels or scores")
    if cfg.export_synthetic:
        replaceable(cfg.export_synthetic, "export_synthetic", cfg.overwrite, "manifest.csv")
        return
    if not cfg.root:
        raise ConfigError("give root=<folder of patches> or export_synthetic=<output folder>")
    if not Path(cfg.root).is_dir():
        raise ConfigError(f"root={cfg.root} is not a folder")
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

    out: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    stain: StainConfig = field(default_factory=StainConfig)
    seed: int = ranged(42, ge=0, le=SEED_MAX)
    overwrite: bool = False  # replace an earlier her2exp-prepare output in `out`


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
