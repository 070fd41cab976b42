"""The data-side groups of a training config: `data.*` (source, loaders, labels, splits and
cross-validation folds) and `stain.*` (Macenko, HED jitter), each with the check of its values.

Other commands reuse these groups (her2exp-eval's cohort, her2exp-prepare, the manifest and tile
label rules), so a value is refused the same way wherever it is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from her2exp.config.choices import (
    DATA_SOURCES,
    EQUIVOCAL_CHOICES,
    PATIENT_LABEL_CHOICES,
    SEED_MAX,
    SPLIT_BY_CHOICES,
    STAIN_CHOICES,
    VERIFY_CHOICES,
)
from her2exp.config.fields import ranged, refuse


@dataclass
class SplitConfig:
    train: float = ranged(0.7, gt=0, lt=1)
    val: float = ranged(0.15, gt=0, lt=1)
    # Not used under cross-validation (folds set): fold k is the test split, and validation takes
    # val / (train + val) of the other patients.
    test: float = ranged(0.15, gt=0, lt=1)
    # Cross-validation (her2exp/data/splits.py): K folds, fold k the test split of this run
    # (`-m data.split.folds=5 'data.split.fold=range(5)'`); by patient (stratified, grouped) or
    # by site (leave-one-site-out: K = the number of sites).
    folds: int | None = ranged(None, ge=2)
    fold: int | None = ranged(None, ge=0)
    by: str = "patient"
    # A manifest's own split column is refused under CV unless this says to ignore it.
    ignore_column: bool = False


@dataclass
class DataConfig:
    source: str = "synthetic"
    n_patients: int = ranged(100, ge=1)
    patches_per_patient: int = ranged(20, ge=1)
    positive_fraction: float = ranged(0.25, gt=0, lt=1)
    sites: list[str] = field(default_factory=lambda: ["site_a", "site_b"])
    image_size: int = ranged(64, ge=1)
    batch_size: int = ranged(64, ge=1)
    eval_batch_size: int = ranged(256, ge=1)
    num_workers: int = ranged(0, ge=0)
    prefetch_factor: int | None = ranged(None, ge=1)
    persistent_workers: bool = False
    pin_memory: bool = False
    augment: bool = True
    split: SplitConfig = field(default_factory=SplitConfig)
    # null: the model's own normalisation (timm.data.resolve_data_config), filled in at start.
    mean: list[float] | None = None
    std: list[float] | None = None
    # The user's own patches (data=folder | data=manifest; her2exp/data/sources/).
    root: str | None = None  # data=folder: class (or HER2 score) sub-folders of patches
    path: str | None = (
        None  # data=manifest: a .csv or .parquet manifest; data=slides: tiles.parquet
    )
    # data=slides: slide handles each reading process keeps open (least recently used closed).
    max_open_slides: int = ranged(16, ge=1)
    label_map: dict[str, int] = field(default_factory=lambda: {"her2_neg": 0, "her2_pos": 1})
    # IHC score -> label; 2+ (equivocal without ISH) is decided by `equivocal`.
    score_map: dict[str, int] = field(default_factory=lambda: {"0": 0, "1+": 0, "3+": 1})
    equivocal: str = "exclude"  # exclude | positive | negative
    # A patient whose patches carry both labels: error (listed before training) | max (HER2+ if
    # any patch is) | majority (the more common label; a tie is HER2+). Patches take its label.
    patient_label: str = "error"
    patient_regex: str | None = None  # patient id from the file name: named group or group 1
    on_bad_file: str = "error"  # error: list every problem and stop | skip: drop bad files
    cache: bool = True  # decode every patch once, up front, and keep them in memory
    # data.cache=false (patches decoded in the DataLoader workers): how the files are checked
    # before training. header: format, mode and size of each (a truncated file fails when read);
    # full: decode each once. data.cache=true always decodes (it keeps the pixels).
    verify: str = "header"
    # null: the run's `seed`. Fix them in a seed sweep so only the initialisation varies.
    data_seed: int | None = ranged(None, ge=0, le=SEED_MAX)  # renders the embedded data set
    split_seed: int | None = ranged(None, ge=0, le=SEED_MAX)  # assigns patients to train/val/test
    # data=synthetic: the fraction of a HER2+ patient's patches that carry its HER2 expression,
    # the rest drawn like HER2- patches but keeping the label (a bag task); null: all of them.
    positive_patch_fraction: float | None = ranged(None, gt=0, le=1)
    # mil != none: the bag of tiles one prediction is made for (her2exp/data/bags.py).
    bag_by: str = "patient"  # patient | slide


def _validate_folds(sp: Any) -> None:
    """data.split.folds/fold/by: a fold needs its folds and lies in [0, folds); by=site is CV."""
    if sp.by not in SPLIT_BY_CHOICES:
        refuse("data.split.by", sp.by, f"one of {', '.join(SPLIT_BY_CHOICES)}")
    if sp.folds is None:
        if sp.fold is not None:
            refuse("data.split.fold", sp.fold, "null unless data.split.folds is set (>= 2)")
        if sp.by == "site":
            refuse("data.split.by", sp.by, "patient unless data.split.folds is set (one per site)")
        return
    if sp.fold is None or not 0 <= sp.fold < sp.folds:
        refuse(
            "data.split.fold",
            sp.fold,
            f"an integer in [0, {sp.folds}) with data.split.folds={sp.folds} "
            f"(a sweep: 'data.split.fold=range({sp.folds})')",
        )


def validate_data(d: Any, m: Any) -> None:
    """data.*: loaders, file sources, labels, splits (the image size against the model's minimum)."""
    if d.prefetch_factor is not None and (d.num_workers == 0 or d.prefetch_factor < 1):
        refuse(
            "data.prefetch_factor",
            d.prefetch_factor,
            "null, or an integer >= 1 together with data.num_workers > 0",
        )
    if d.persistent_workers and d.num_workers == 0:
        refuse("data.persistent_workers", True, "false unless data.num_workers > 0")
    if d.source not in DATA_SOURCES:
        refuse("data.source", d.source, f"one of {', '.join(DATA_SOURCES)}")
    if d.equivocal not in EQUIVOCAL_CHOICES:
        refuse("data.equivocal", d.equivocal, f"one of {', '.join(EQUIVOCAL_CHOICES)} (for 2+)")
    if d.patient_label not in PATIENT_LABEL_CHOICES:
        refuse(
            "data.patient_label",
            d.patient_label,
            f"one of {', '.join(PATIENT_LABEL_CHOICES)} (a patient with patches of both labels)",
        )
    if d.on_bad_file not in ("error", "skip"):
        refuse("data.on_bad_file", d.on_bad_file, "error or skip")
    if d.get("positive_patch_fraction") is not None and d.source != "synthetic":
        refuse(
            "data.positive_patch_fraction",
            d.positive_patch_fraction,
            "null unless data=synthetic (it shapes the embedded generator only)",
        )
    if not d.cache and d.source == "synthetic":
        refuse(
            "data.cache",
            d.cache,
            "true with data=synthetic (it is generated in memory: there are no files to stream)",
        )
    if d.verify not in VERIFY_CHOICES:
        refuse("data.verify", d.verify, f"one of {', '.join(VERIFY_CHOICES)}")
    for key in ("label_map", "score_map"):
        mapping = dict(d[key])
        if not mapping or not set(mapping.values()) <= {0, 1}:
            refuse(
                f"data.{key}", mapping, "a non-empty map of names to labels 0 (HER2-) or 1 (HER2+)"
            )
    if "2+" in d.score_map:
        refuse("data.score_map", dict(d.score_map), "no 2+ entry: data.equivocal decides 2+")
    if d.patient_regex is not None:
        try:
            pattern = re.compile(d.patient_regex)
        except re.error as exc:
            refuse("data.patient_regex", d.patient_regex, f"a valid regular expression ({exc})")
        if pattern.groups == 0:
            refuse("data.patient_regex", d.patient_regex, "a pattern with a (named) group")
    if d.path is not None and not str(d.path).lower().endswith((".csv", ".parquet", ".pq")):
        refuse("data.path", d.path, "a .csv or .parquet manifest")
    if d.image_size < m.min_image_size:
        refuse(
            "data.image_size",
            d.image_size,
            f"at least {m.min_image_size} px for model.name={m.name} (model.min_image_size)",
        )
    fractions = (d.split.train, d.split.val, d.split.test)
    if min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        refuse(
            "data.split",
            dict(zip(("train", "val", "test"), fractions, strict=True)),
            "three fractions > 0 that sum to 1",
        )
    _validate_folds(d.split)
    for key in ("mean", "std"):
        v = d[key]
        if v is not None and (len(v) != 3 or (key == "std" and min(v) <= 0)):
            refuse(f"data.{key}", list(v), "null (the model's own) or three values (std > 0)")


@dataclass
class StainConfig:
    """Macenko normalisation (all splits) and/or HED jitter (train only); her2exp/stain/."""

    name: str = "none"  # none | macenko | hed_jitter | macenko_jitter
    io: float = ranged(240.0, gt=0, le=255)  # background (white) intensity
    alpha: float = ranged(1.0, gt=0, lt=50)  # robust extremes: percentiles alpha, 100 - alpha
    beta: float = ranged(0.15, ge=0)  # optical density below which a pixel is background
    min_tissue_fraction: float = ranged(0.05, ge=0, lt=1)
    n_sample: int | None = ranged(4096, ge=1)
    percentile_method: str = "topk"
    exact: bool = False
    rescale: str = "hematoxylin"  # all (classic Macenko) | hematoxylin | none; see macenko.py
    on_device: bool = False  # true: per batch on the training device; false: in the workers
    reference: str | None = None  # a reference image; null: fit on training patches
    fit_patches: int = ranged(512, ge=1)
    sigma: float = ranged(0.05, ge=0, lt=1)
    shift_sigma: float | None = ranged(None, ge=0, lt=1)


def validate_stain(st: Any) -> None:
    """stain.*: the Macenko and HED settings."""
    if st.name not in STAIN_CHOICES:
        refuse("stain.name", st.name, f"one of {', '.join(STAIN_CHOICES)}")
    if st.rescale not in ("all", "hematoxylin", "none"):
        refuse("stain.rescale", st.rescale, "all, hematoxylin (keeps DAB intensity) or none")
    if st.percentile_method not in ("topk", "sort"):
        refuse("stain.percentile_method", st.percentile_method, "topk or sort")
