"""`her2exp-eval` and `her2exp-predict`: a trained run scored on a cohort, or applied to
patches or slides; their schemas, checks and where predict writes its tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from her2exp.config.choices import (
    AGGREGATION_CHOICES,
    AMP_CHOICES,
    CALIBRATION_CHOICES,
    LEVEL_CHOICES,
    SEED_MAX,
    TTA_CHOICES,
)
from her2exp.config.common import UriConfig, one_source
from her2exp.config.data import DataConfig
from her2exp.config.fields import check_ranges, option, ranged, refuse
from her2exp.config.model_uri import parse_model_uri
from her2exp.config.train import TrackingConfig
from her2exp.core.errors import ConfigError, UserError
from her2exp.core.fileio import check_writable


# -- her2exp-eval --------------------------------------------------------------------------------
@dataclass
class EvaluationOverrides:
    """`evaluation.*` of her2exp-eval: null keeps the training run's own setting."""

    target_sensitivity: float | None = ranged(
        None, gt=0, lt=1, help="null: the run's own evaluation.target_sensitivity"
    )
    n_boot: int | None = ranged(
        None, ge=0, help="bootstrap resamples of the AUC interval; null: the run's own"
    )
    slide_aggregation: str | None = option(None, help="mean | max | topk_mean; null: the run's own")
    patient_aggregation: str | None = option(
        None, help="mean | max | topk_mean; null: the run's own"
    )
    topk: int | None = ranged(None, ge=1, help="topk_mean's k; null: the run's own")
    decision_level: str | None = option(None, help="tile | slide | patient; null: the run's own")
    operating_point: str | None = option(
        None, help="youden | sens{N} | sens{N}_lcb | p50; null: the run's own"
    )
    gallery_max: int | None = ranged(None, ge=0, help="patches per gallery; null: the run's own")
    calibration: str | None = option(None, help="frozen in best.pt: only the run's own is accepted")
    explain: bool | None = option(
        None, help="Grad-CAM / token maps over the galleries; null: the run's own"
    )
    figures: bool | None = option(None, help="the report's PNG figures; null: the run's own")


@dataclass
class EvalTrainerOverrides:
    """`trainer.amp` of her2exp-eval: null scores with the run's own AMP setting."""

    amp: str | None = option(None, help="auto | bf16 | fp16 | off; null: the run's own")


@dataclass
class EvalCommand:
    """`her2exp-eval`: a trained run (MLflow run id or best.pt) scored at its frozen thresholds,
    on a new cohort (`data.*`) or on the run's own val/test split (`split=test`)."""

    run_id: str | None = option(None, help="the MLflow run of the trained model")
    checkpoint: str | None = option(None, help="a best.pt of the trained model")
    sweep_run_id: str | None = option(
        None, help="a sweep's parent run: its finished children as an ensemble"
    )
    model_uri: str | None = option(
        None, help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model (the registry)"
    )
    split: str | None = option(
        None, help="null: the cohort data.* describes | val | test: the run's own split"
    )
    cohort_name: str | None = option(
        None, help="the cohort's name in the report; null: external, or the split's name"
    )
    seed: int = ranged(
        2026,
        ge=0,
        le=SEED_MAX,
        help="renders a new embedded cohort (another seed than training's: new patients)",
    )
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluation: EvaluationOverrides = field(default_factory=EvaluationOverrides)
    trainer: EvalTrainerOverrides = field(default_factory=EvalTrainerOverrides)
    tta: str | None = option(
        None,
        help="none | d4: the views averaged; null: the run's own (its thresholds were chosen "
        "on it); the key her2exp-predict and her2exp-export take",
    )
    output_dir: str = option(
        MISSING, help="the report's directory (set by Hydra: outputs/eval/<date>/<time>)"
    )


def evaluation_overrides(cfg: Any) -> Any:
    """her2exp-eval's `evaluation.*` overrides with its `tta=` among them: what is merged over
    the run's own evaluation settings (`tta=` is top-level, as in predict and export)."""
    given = OmegaConf.to_container(cfg.evaluation) if cfg.get("evaluation") else {}
    return OmegaConf.create({**given, "tta": cfg.get("tta")})


EVAL_SPLITS = ("val", "test")


def check_eval(cfg: Any) -> None:
    check_ranges(cfg, EvalCommand)
    one_source(cfg)
    if cfg.split is not None and cfg.split not in EVAL_SPLITS:
        refuse("split", cfg.split, "null (the cohort data.* describes), val or test")
    if cfg.trainer.amp is not None and cfg.trainer.amp not in AMP_CHOICES:
        refuse("trainer.amp", cfg.trainer.amp, f"null (the run's own) or {', '.join(AMP_CHOICES)}")
    e = cfg.evaluation
    choices = {
        "slide_aggregation": AGGREGATION_CHOICES,
        "patient_aggregation": AGGREGATION_CHOICES,
        "decision_level": LEVEL_CHOICES,
        "calibration": CALIBRATION_CHOICES,
    }
    for key, allowed in choices.items():
        if e[key] is not None and e[key] not in allowed:
            refuse(f"evaluation.{key}", e[key], f"null (the run's own) or {', '.join(allowed)}")
    if cfg.tta is not None and cfg.tta not in TTA_CHOICES:
        refuse("tta", cfg.tta, f"null (the run's own) or {', '.join(TTA_CHOICES)}")
    if cfg.model_uri:
        parse_model_uri(cfg.model_uri)  # its form now; the store is read when it is resolved


# -- her2exp-predict -----------------------------------------------------------------------------
@dataclass
class PredictCommand:
    """`her2exp-predict`: a trained run applied to a folder of patches."""

    checkpoint: str | None = option(None, help="a best.pt of the trained model")
    run_id: str | None = option(None, help="the MLflow run of the trained model")
    sweep_run_id: str | None = option(
        None, help="a sweep's parent run: its finished children as an ensemble"
    )
    model_uri: str | None = option(
        None,
        help="models:/NAME@ALIAS | models:/NAME/VERSION | runs:/ID/model",
    )
    input: str | None = option(
        None, help="a folder of patches (searched recursively), or a tiles.parquet of her2exp-tile"
    )
    out: str = option("predictions.csv", help="the predictions table (CSV)")
    heatmaps: str | None = option(
        None,
        help="slides: the folder of one heatmap PNG per slide; null: <out>_heatmaps/",
    )
    num_workers: int = ranged(0, ge=0, help="DataLoader workers reading tiles from the slides")
    batch_size: int = ranged(64, ge=1, help="patches per scoring batch")
    overwrite: bool = option(False, help="replace an existing out table (and its errors list)")
    groups: str | None = option(
        None,
        help="a CSV of path, slide_id, patient_id: needed at the slide or patient decision level",
    )
    decision_level: str | None = option(None, help="tile | slide | patient; null: the run's own")
    tta: str | None = option(None, help="none | d4 (8 views a patch); null: the run's own")
    tracking: UriConfig = field(default_factory=UriConfig)


def predict_out(cfg: Any) -> Path:
    """The table `her2exp-predict` writes (`output=`, its old spelling: config.renames)."""
    return Path(cfg.out)


def predict_on_slides(cfg: Any) -> bool:
    """input= names a tile manifest (her2exp-tile's tiles.parquet), not a folder of patches."""
    return bool(cfg.input) and str(cfg.input).lower().endswith((".parquet", ".pq", ".csv"))


def heatmap_dir(cfg: Any) -> Path:
    out = predict_out(cfg)
    return Path(cfg.heatmaps) if cfg.heatmaps else out.with_name(f"{out.stem}_heatmaps")


def predict_level_out(out: Path, level: str) -> Path:
    """The per-slide or per-patient table beside `out` (predictions.slides.csv, ...)."""
    return out.with_suffix(f".{level}s.csv")


def check_predict(cfg: Any) -> None:
    """Values, the input, one model source, then the user's files: an existing table of
    predictions (perhaps a cohort's only record) or heatmap folder is replaced only with
    overwrite=true."""
    check_ranges(cfg, PredictCommand)
    if not cfg.input:
        raise ConfigError(
            "input=<folder of patches, or DIR/tiles.parquet of her2exp-tile> is required"
        )
    slides = predict_on_slides(cfg)
    if slides and not Path(cfg.input).is_file():
        raise ConfigError(f"input={cfg.input}: no such tile manifest (run her2exp-tile first)")
    if not slides and Path(cfg.input).is_file():  # a slide given as is, most likely
        raise ConfigError(
            f"input={cfg.input} is a file, not a folder of patches or a tile manifest "
            "(.parquet/.csv of her2exp-tile): a whole-slide image is tiled with her2exp-tile "
            "first, then predicted on its tiles.parquet"
        )
    if not slides and not Path(cfg.input).is_dir():
        raise ConfigError(
            f"input={cfg.input} is not a folder (or a tile manifest .parquet/.csv of her2exp-tile)"
        )
    one_source(cfg)
    if cfg.model_uri:
        parse_model_uri(cfg.model_uri)  # its form now; the store is read when it is resolved
    if cfg.decision_level is not None and cfg.decision_level not in LEVEL_CHOICES:
        refuse("decision_level", cfg.decision_level, f"null or {', '.join(LEVEL_CHOICES)}")
    if cfg.tta is not None and cfg.tta not in TTA_CHOICES:
        refuse("tta", cfg.tta, f"null (the run's own) or {', '.join(TTA_CHOICES)}")
    if cfg.groups is not None and not Path(cfg.groups).is_file():
        raise ConfigError(f"groups={cfg.groups}: no such file")
    out = predict_out(cfg)
    if out.is_dir():
        raise UserError(f"out={out} is a folder: give the table's file name (predictions.csv)")
    tables = [out, *(predict_level_out(out, lv) for lv in ("slide", "patient"))]
    grouped = cfg.groups is not None or slides
    for path in tables if grouped else tables[:1]:
        if path.exists() and not cfg.overwrite:
            raise UserError(
                f"out={path} exists (the predictions of an earlier run): give another out=, "
                "or overwrite=true to replace it"
            )
    check_writable(out, "out")
    maps = heatmap_dir(cfg)
    if slides:
        check_writable(maps, "heatmaps", folder=True)
    if slides and maps.exists() and any(maps.iterdir()) and not cfg.overwrite:
        raise UserError(
            f"heatmaps={maps} holds an earlier run's heatmaps: give another heatmaps=, or "
            "overwrite=true to replace them"
        )
