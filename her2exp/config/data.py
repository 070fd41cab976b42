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
from her2exp.config.fields import option, ranged, refuse


@dataclass
class SplitConfig:
    train: float = ranged(0.7, gt=0, lt=1, help="fraction of patients in the train split")
    val: float = ranged(0.15, gt=0, lt=1, help="fraction of patients in the validation split")
    test: float = ranged(
        0.15,
        gt=0,
        lt=1,
        help="fraction of patients in the test split; under cross-validation fold k is the test split and validation takes val / (train + val) of the others",
    )
    folds: int | None = ranged(
        None,
        ge=2,
        help="cross-validation: K folds (patient-grouped and stratified, or by site); null: one split",
    )
    fold: int | None = ranged(
        None,
        ge=0,
        help="cross-validation: the fold that is this run's test split, e.g. -m 'data.split.fold=range(5)'",
    )
    by: str = option("patient", help="patient | site (leave-one-site-out: K = the number of sites)")
    ignore_column: bool = option(
        False,
        help="under cross-validation, ignore a manifest's own split column (refused otherwise)",
    )


@dataclass
class DataConfig:
    source: str = option(
        "synthetic", help="synthetic | folder | manifest | slides (the data group sets it)"
    )
    n_patients: int = ranged(100, ge=1, help="data=synthetic: patients generated")
    patches_per_patient: int = ranged(20, ge=1, help="data=synthetic: patches per patient")
    positive_fraction: float = ranged(
        0.25, gt=0, lt=1, help="data=synthetic: fraction of HER2+ patients"
    )
    sites: list[str] = option(
        factory=lambda: ["site_a", "site_b"],
        help="data=synthetic: the sites patients are drawn from (each with its own stain)",
    )
    image_size: int = ranged(64, ge=1, help="patch side in px the model sees")
    batch_size: int = ranged(64, ge=1, help="training patches per step (global under DDP)")
    eval_batch_size: int = ranged(256, ge=1, help="patches per scoring batch")
    num_workers: int = ranged(0, ge=0, help="DataLoader worker processes")
    prefetch_factor: int | None = ranged(
        None, ge=1, help="batches each worker loads ahead; null: PyTorch's default"
    )
    persistent_workers: bool = option(
        False, help="keep the workers between epochs (needs num_workers > 0)"
    )
    pin_memory: bool = option(False, help="pinned host memory for faster copies to the GPU")
    augment: bool = option(True, help="random flips and rotations of training patches")
    split: SplitConfig = field(default_factory=SplitConfig)
    mean: list[float] | None = option(
        None,
        help="normalisation mean (three values); null: the model's own",
    )
    std: list[float] | None = option(
        None, help="normalisation std (three values); null: the model's own"
    )
    root: str | None = option(
        None,
        help="data=folder: class (or HER2 score) sub-folders of patches",
    )
    path: str | None = option(
        None, help="data=manifest: a .csv or .parquet manifest; data=slides: tiles.parquet"
    )
    max_open_slides: int = ranged(
        16,
        ge=1,
        help="data=slides: slide handles each reading process keeps open (least recently used closed)",
    )
    label_map: dict[str, int] = option(
        factory=lambda: {"her2_neg": 0, "her2_pos": 1},
        help="folder or label name -> 0 (HER2-) or 1 (HER2+)",
    )
    score_map: dict[str, int] = option(
        factory=lambda: {"0": 0, "1+": 0, "3+": 1},
        help="IHC score -> label; 2+ is decided by equivocal",
    )
    equivocal: str = option("exclude", help="IHC 2+ without ISH: exclude | positive | negative")
    patient_label: str = option(
        "error",
        help="a patient whose patches carry both labels: error | max (HER2+ if any) | majority (a tie is HER2+)",
    )
    patient_regex: str | None = option(
        None, help="patient id from the file name: its named group or group 1"
    )
    on_bad_file: str = option(
        "error", help="error: list every problem and stop | skip: drop bad files"
    )
    cache: bool = option(True, help="decode every patch once, up front, and keep them in memory")
    verify: str = option(
        "header",
        help="data.cache=false: how files are checked before training: header (format, mode, size) | full (decode each once)",
    )
    data_seed: int | None = ranged(
        None,
        ge=0,
        le=SEED_MAX,
        help="seed that renders the embedded data set; null: the run's seed",
    )
    split_seed: int | None = ranged(
        None,
        ge=0,
        le=SEED_MAX,
        help="seed that assigns patients to train/val/test; null: the run's seed",
    )
    positive_patch_fraction: float | None = ranged(
        None,
        gt=0,
        le=1,
        help="data=synthetic: fraction of a HER2+ patient's patches that show HER2 (a bag task); null: all",
    )
    bag_by: str = option(
        "patient",
        help="mil != none: the bag one prediction is made for: patient | slide",
    )


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

    name: str = option(
        "none", help="none | macenko | hed_jitter | macenko_jitter (the stain group sets it)"
    )
    io: float = ranged(240.0, gt=0, le=255, help="Macenko: background (white) intensity")
    alpha: float = ranged(
        1.0, gt=0, lt=50, help="Macenko: robust extremes at percentiles alpha and 100 - alpha"
    )
    beta: float = ranged(
        0.15, ge=0, help="Macenko: optical density below which a pixel is background"
    )
    min_tissue_fraction: float = ranged(
        0.05,
        ge=0,
        lt=1,
        help="Macenko: tissue pixels a patch needs to be normalised (else left as is)",
    )
    n_sample: int | None = ranged(
        4096, ge=1, help="Macenko: pixels sampled per patch for the stain vectors; null: all"
    )
    percentile_method: str = option("topk", help="Macenko: topk (fast) | sort")
    exact: bool = option(False, help="Macenko: no shortcuts (all pixels, full sort)")
    rescale: str = option(
        "hematoxylin", help="Macenko: all (classic) | hematoxylin (keeps DAB intensity) | none"
    )
    on_device: bool = option(
        False, help="true: normalise per batch on the training device; false: in the workers"
    )
    reference: str | None = option(None, help="a reference image; null: fit on training patches")
    fit_patches: int = ranged(512, ge=1, help="training patches the reference is fitted on")
    sigma: float = ranged(0.05, ge=0, lt=1, help="HED jitter: scale of the random stain factors")
    shift_sigma: float | None = ranged(
        None, ge=0, lt=1, help="HED jitter: scale of the random shifts; null: sigma"
    )


def validate_stain(st: Any) -> None:
    """stain.*: the Macenko and HED settings."""
    if st.name not in STAIN_CHOICES:
        refuse("stain.name", st.name, f"one of {', '.join(STAIN_CHOICES)}")
    if st.rescale not in ("all", "hematoxylin", "none"):
        refuse("stain.rescale", st.rescale, "all, hematoxylin (keeps DAB intensity) or none")
    if st.percentile_method not in ("topk", "sort"):
        refuse("stain.percentile_method", st.percentile_method, "topk or sort")
