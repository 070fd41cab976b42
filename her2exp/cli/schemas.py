"""Schemas of the commands besides `her2exp-train`: what each accepts, typed, with its checks.

Each dataclass is the structured base of one entry config, `conf/<command>.yaml`, so an unknown
key or a wrong type fails at compose time (one `her2exp: ...` line, see common.py); the
`check_*` function beside it rejects values that would fail later, naming the key. Training's own
groups (data, stain, tracking, evaluation) are reused from her2exp/config.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from her2exp.cli.common import UserError
from her2exp.config import (
    AGGREGATION_CHOICES,
    AMP_CHOICES,
    CALIBRATION_CHOICES,
    LEVEL_CHOICES,
    SEED_MAX,
    TTA_CHOICES,
    ConfigError,
    DataConfig,
    SplitConfig,
    StainConfig,
    TrackingConfig,
    TrainConfig,
    check_ranges,
    ranged,
    register_configs,
    validate,
)

DEFAULT_URI = "sqlite:///mlflow.db"


def _fail(key: str, value: Any, allowed: str) -> None:
    """The message shape of config.validate: the key, the value and what is allowed."""
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


@dataclass
class UriConfig:
    """`tracking.uri` alone, for the commands that only read or replay MLflow runs."""

    uri: str | None = DEFAULT_URI


#: The keys that name what a command evaluates or predicts with: exactly one is given
#: (model_uri: predict only, resolved to a run id by registry.resolve_model_uri).
SOURCES = ("run_id", "checkpoint", "sweep_run_id", "model_uri")


def check_one_source(source: Any) -> None:
    """Exactly one of run_id / checkpoint / sweep_run_id / model_uri (a command without
    sweep_run_id or model_uri, or a member's own load, has that key absent)."""
    given = [k for k in SOURCES if source.get(k)]
    if len(given) != 1:
        got = f" (got {' and '.join(given)})" if given else ""
        uri = ", model_uri=<models:/NAME@ALIAS>" if "model_uri" in source else ""
        raise ConfigError(
            f"give exactly one of run_id=<MLflow run id>, checkpoint=<best.pt path>{uri} or "
            f"sweep_run_id=<MLflow run id of a sweep's parent>{got}"
        )


def _one_source(cfg: Any) -> None:
    """Exactly one of run_id / checkpoint / sweep_run_id, and the checkpoint must exist."""
    check_one_source(cfg)
    if cfg.checkpoint and not Path(cfg.checkpoint).is_file():
        raise ConfigError(f"checkpoint={cfg.checkpoint}: no such file")


# -- her2exp-eval --------------------------------------------------------------------------------
@dataclass
class EvaluationOverrides:
    """`evaluation.*` of her2exp-eval: null keeps the training run's own setting."""

    target_sensitivity: float | None = ranged(None, gt=0, lt=1)
    n_boot: int | None = ranged(None, ge=0)
    slide_aggregation: str | None = None
    patient_aggregation: str | None = None
    topk: int | None = ranged(None, ge=1)
    decision_level: str | None = None
    operating_point: str | None = None
    gallery_max: int | None = ranged(None, ge=0)
    tta: str | None = None  # none | d4; the run's thresholds were chosen on its own setting
    calibration: str | None = None  # frozen in best.pt: only the run's own is accepted
    explain: bool | None = None  # Grad-CAM / token maps over the galleries (her2exp/explain.py)
    figures: bool | None = None  # the report's PNG figures (a smoke run's own: off)


@dataclass
class EvalTrainerOverrides:
    """`trainer.amp` of her2exp-eval: null scores with the run's own AMP setting."""

    amp: str | None = None


@dataclass
class EvalCommand:
    """`her2exp-eval`: a trained run (MLflow run id or best.pt) scored at its frozen thresholds,
    on a new cohort (`data.*`) or on the run's own val/test split (`split=test`)."""

    run_id: str | None = None
    checkpoint: str | None = None
    sweep_run_id: str | None = None  # a sweep's parent run: its finished children as an ensemble
    split: str | None = None  # null: the cohort `data` describes | val | test: the run's own
    cohort_name: str | None = None  # null: "external", or the split's name
    # A different seed from training (42) for a new cohort: new patients, not re-rendered ones.
    seed: int = ranged(2026, ge=0, le=SEED_MAX)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluation: EvaluationOverrides = field(default_factory=EvaluationOverrides)
    trainer: EvalTrainerOverrides = field(default_factory=EvalTrainerOverrides)
    output_dir: str = MISSING


EVAL_SPLITS = ("val", "test")


def check_eval(cfg: Any) -> None:
    check_ranges(cfg, EvalCommand)
    _one_source(cfg)
    if cfg.split is not None and cfg.split not in EVAL_SPLITS:
        _fail("split", cfg.split, "null (the cohort data.* describes), val or test")
    if cfg.trainer.amp is not None and cfg.trainer.amp not in AMP_CHOICES:
        _fail("trainer.amp", cfg.trainer.amp, f"null (the run's own) or {', '.join(AMP_CHOICES)}")
    e = cfg.evaluation
    choices = {
        "slide_aggregation": AGGREGATION_CHOICES,
        "patient_aggregation": AGGREGATION_CHOICES,
        "decision_level": LEVEL_CHOICES,
        "tta": TTA_CHOICES,
        "calibration": CALIBRATION_CHOICES,
    }
    for key, allowed in choices.items():
        if e[key] is not None and e[key] not in allowed:
            _fail(f"evaluation.{key}", e[key], f"null (the run's own) or {', '.join(allowed)}")


# -- her2exp-predict -----------------------------------------------------------------------------
@dataclass
class PredictCommand:
    """`her2exp-predict`: a trained run applied to a folder of patches."""

    checkpoint: str | None = None
    run_id: str | None = None
    sweep_run_id: str | None = None  # a sweep's parent run: its finished children as an ensemble
    # models:/NAME@ALIAS | models:/NAME/VERSION | runs:/ID/model: the training run behind it
    model_uri: str | None = None
    input: str | None = None  # a folder of patches (searched recursively), or a tiles.parquet
    out: str = "predictions.csv"
    # Slides (input= a tile manifest of her2exp-tile): one PNG per slide; null: <out>_heatmaps/.
    heatmaps: str | None = None
    num_workers: int = ranged(0, ge=0)  # DataLoader workers reading tiles from the slides
    output: str | None = None  # deprecated spelling of `out`
    batch_size: int = ranged(64, ge=1)
    overwrite: bool = False  # replace an existing `out` table (and its errors list)
    # CSV with columns path (relative to input, or absolute), slide_id, patient_id: needed when
    # the decision level is slide or patient (then <out>.slides.csv / .patients.csv too)
    groups: str | None = None
    decision_level: str | None = None  # null: the run's own
    tta: str | None = None  # null: the run's own evaluation.tta | none | d4 (8 views a patch)
    tracking: UriConfig = field(default_factory=UriConfig)


def predict_out(cfg: Any) -> Path:
    """The table `her2exp-predict` writes (`output=` is the deprecated spelling of `out=`)."""
    return Path(cfg.output or cfg.out)


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
    if not slides and not Path(cfg.input).is_dir():
        raise ConfigError(
            f"input={cfg.input} is not a folder (or a tile manifest .parquet/.csv of her2exp-tile)"
        )
    _one_source(cfg)
    if cfg.model_uri:
        from her2exp.registry import parse_model_uri

        parse_model_uri(cfg.model_uri)  # its form now; the store is read when it is resolved
    if cfg.decision_level is not None and cfg.decision_level not in LEVEL_CHOICES:
        _fail("decision_level", cfg.decision_level, f"null or {', '.join(LEVEL_CHOICES)}")
    if cfg.tta is not None and cfg.tta not in TTA_CHOICES:
        _fail("tta", cfg.tta, f"null (the run's own) or {', '.join(TTA_CHOICES)}")
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
    maps = heatmap_dir(cfg)
    if slides and maps.exists() and any(maps.iterdir()) and not cfg.overwrite:
        raise UserError(
            f"heatmaps={maps} holds an earlier run's heatmaps: give another heatmaps=, or "
            "overwrite=true to replace them"
        )


# -- her2exp-compare -----------------------------------------------------------------------------
@dataclass
class CompareCommand:
    """`her2exp-compare`: the runs of an experiment or a sweep, best first."""

    experiment: str = "her2exp"
    sweep: str = "latest"  # latest | all | <parent run id>
    out: str = "compare.csv"
    tracking: UriConfig = field(default_factory=UriConfig)
    leaderboard: bool = False  # the sweep parent's backbone x protocol leaderboard instead


def check_compare(cfg: Any) -> None:
    if not cfg.tracking.uri:
        _fail("tracking.uri", cfg.tracking.uri, "an MLflow tracking URI")


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
    return _label_rules(cfg, data)


def _label_rules(cfg: Any, data: dict[str, Any]) -> DictConfig:
    """`data` over training's defaults with the command's label_map/score_map, validated as
    training validates it (manifest and tile commands)."""
    full = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"data": data, "output_dir": "."})
    for key in ("label_map", "score_map"):
        if cfg[key] is not None:  # replaces the default map (a merge would keep its names)
            if not OmegaConf.is_dict(cfg[key]):
                _fail(key, cfg[key], "a map of names to 0 (HER2-) or 1 (HER2+), e.g. {neg:0,pos:1}")
            full.data[key] = {str(k): v for k, v in cfg[key].items()}
    validate(full)
    return full.data


def manifest_out(cfg: Any) -> Path:
    """Where `her2exp-manifest root=...` writes: `out`, or <root>/manifest.csv."""
    return Path(cfg.out) if cfg.out else Path(cfg.root) / "manifest.csv"


def _replaceable(out: Any, key: str, overwrite: bool, own_file: str) -> None:
    from her2exp.fileio import check_replaceable

    try:
        check_replaceable(out, key, overwrite, own_file)
    except FileExistsError as exc:
        raise UserError(str(exc)) from None


def check_manifest(cfg: Any) -> None:
    """Values, then the user's files: an existing manifest is replaced only with overwrite=true."""
    check_ranges(cfg, ManifestCommand)
    if cfg.layout not in ("labels", "scores"):
        _fail("layout", cfg.layout, "labels or scores")
    if cfg.export_synthetic:
        _replaceable(cfg.export_synthetic, "export_synthetic", cfg.overwrite, "manifest.csv")
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
        _fail("stain", full.stain.name, "macenko: her2exp-prepare normalises with Macenko")
    _replaceable(cfg.out, "out", cfg.overwrite, "prepare.json")
    return full


_PORT = "a TCP port (1-65535; pg_port 0: a free one)"


# -- her2exp-server ------------------------------------------------------------------------------
@dataclass
class ServerCommand:
    """`her2exp-server`: an MLflow tracking server on PostgreSQL (a private cluster in `dir`)."""

    dir: str = ".mlflow-server"
    backend_store_uri: str | None = None  # an existing database; null: private PostgreSQL
    artifacts_destination: str | None = None  # null: <dir>/artifacts
    host: str = "127.0.0.1"
    port: int = ranged(5000, ge=1, le=65535, allowed=_PORT)
    pg_port: int = ranged(0, ge=0, le=65535, allowed=_PORT)  # 0: a free port
    workers: int = ranged(1, ge=1)


def check_server(cfg: Any) -> None:
    check_ranges(cfg, ServerCommand)


# -- her2exp-sync --------------------------------------------------------------------------------
@dataclass
class SyncCommand:
    """`her2exp-sync`: replay the MLflow calls a run deferred while its server was away."""

    run_dir: str | None = None
    tracking: UriConfig = field(default_factory=lambda: UriConfig(uri=None))  # null: the run's


def check_sync(cfg: Any) -> None:
    if not cfg.run_dir:
        raise ConfigError("run_dir=<run directory> is required")
    if not Path(cfg.run_dir).is_dir():
        raise ConfigError(f"run_dir={cfg.run_dir} is not a folder")


# -- her2exp-rerun -------------------------------------------------------------------------------
@dataclass
class RerunCommand:
    """`her2exp-rerun`: train a logged run again from what MLflow holds."""

    run_id: str | None = None
    output_dir: str | None = None  # null: outputs/rerun/<run id>/<time>
    tracking: UriConfig = field(default_factory=UriConfig)


def check_rerun(cfg: Any) -> None:
    if not cfg.run_id:
        raise ConfigError("run_id=<MLflow run id> is required")


# -- her2exp-promote ----------------------------------------------------------------------------
@dataclass
class PromoteCommand:
    """`her2exp-promote`: a registered model's alias set to a version that passed its checklist."""

    name: str | None = None  # the registered model (tracking.registered_model_name of training)
    version: int | None = ranged(None, ge=1)
    alias: str = "champion"
    force: bool = False  # promote a version that fails its checklist (recorded on the version)
    reason: str | None = None  # why, with force=true (tag her2exp.force_reason)
    tracking: UriConfig = field(default_factory=UriConfig)


def check_promote(cfg: Any) -> None:
    """Values only (the registry is read by the command): name, version and an alias MLflow
    accepts (letters, digits, _ and -)."""
    from her2exp.registry import ALIAS_RE

    check_ranges(cfg, PromoteCommand)
    if not cfg.name:
        raise ConfigError("name=<registered model name> is required")
    if cfg.version is None:
        raise ConfigError("version=<the version number to promote> is required")
    if not ALIAS_RE.match(str(cfg.alias)):
        _fail("alias", cfg.alias, "letters, digits, _ and - (e.g. champion)")
    if not cfg.tracking.uri:
        _fail("tracking.uri", cfg.tracking.uri, "an MLflow tracking URI")


# -- her2exp-tile --------------------------------------------------------------------------------
@dataclass
class TilesConfig:
    """tiles.*: the physical tile and what counts as tissue."""

    mpp: float = ranged(0.5, gt=0, le=100)  # um per pixel of a tile
    size: int = ranged(224, ge=16, le=8192)  # tile side in pixels (at `mpp`)
    min_tissue: float = ranged(0.5, ge=0, le=1)  # fraction of a tile the tissue mask must cover
    assume_mpp: float | None = ranged(None, gt=0, le=100)  # for slides whose file has none
    mask_mpp: float = ranged(8.0, gt=0, le=1000)  # um per pixel of the tissue mask's thumbnail
    workers: int = ranged(1, ge=1, le=256)  # slides tiled in parallel processes
    # auto (tiffslide for OME-TIFF, else OpenSlide, else tiffslide) | openslide | tiffslide
    reader: str = "auto"
    shard: str | None = None  # i/n: this machine's share of the slides (SLURM arrays)
    # QuPath classes whose regions are excluded (pen, artefacts); any other class includes.
    exclude_classes: list[str] = field(
        default_factory=lambda: ["Ignore*", "Ignore", "Exclude", "Pen", "Artefact", "Artifact"]
    )


@dataclass
class TileCommand:
    """`her2exp-tile`: a slide table -> tiles.parquet (coordinates), QC thumbnails, summary."""

    slide_table: str | None = None  # CSV or Parquet: path, label or score, [patient_id, site, ...]
    out: str | None = None
    tiles: TilesConfig = field(default_factory=TilesConfig)
    label_map: Any = None  # null: her2_neg -> 0, her2_pos -> 1 (as data=manifest)
    score_map: Any = None  # null: 0, 1+ -> 0 and 3+ -> 1
    equivocal: str = "exclude"
    on_bad_file: str = "error"  # error | skip: leave unusable slides out, listed in summary.csv
    overwrite: bool = False  # tile an earlier output again with other settings


def tile_data_config(cfg: Any) -> DictConfig:
    """The label rules of a slide table: data=manifest's, with this command's maps."""
    return _label_rules(cfg, {"equivocal": cfg.equivocal})


def check_tile(cfg: Any) -> None:
    """Values, the table, the output folder: all before a slide is opened."""
    from her2exp.slides.reader import READERS
    from her2exp.slides.tile import check_out

    check_ranges(cfg, TileCommand)
    if cfg.on_bad_file not in ("error", "skip"):
        _fail("on_bad_file", cfg.on_bad_file, "error or skip")
    if cfg.tiles.reader not in READERS:
        _fail("tiles.reader", cfg.tiles.reader, ", ".join(READERS))
    shard = cfg.tiles.shard
    if shard is not None:
        parts = str(shard).split("/")
        if (
            len(parts) != 2
            or not all(p.isdigit() for p in parts)
            or not 0 <= int(parts[0]) < int(parts[1])
        ):
            _fail("tiles.shard", shard, "i/n with 0 <= i < n (e.g. 0/4)")
    if not cfg.slide_table:
        raise ConfigError("slide_table=<CSV or Parquet of slides> is required")
    if not Path(cfg.slide_table).is_file():
        raise ConfigError(f"slide_table={cfg.slide_table}: no such file")
    if not cfg.out:
        raise ConfigError("out=<folder for the tile manifest> is required")
    tile_data_config(cfg)
    try:
        check_out(Path(cfg.out), cfg.tiles, cfg.overwrite)
    except FileExistsError as exc:
        raise UserError(str(exc)) from None


# -- her2exp-export ------------------------------------------------------------------------------
@dataclass
class ExportCommand:
    """`her2exp-export`: a trained run as an ONNX or TorchScript graph (uint8 patches in,
    P(HER2+) out), checked against PyTorch and logged to the run (her2exp/export.py)."""

    run_id: str | None = None
    checkpoint: str | None = None
    format: str = "onnx"  # onnx | torchscript
    out: str | None = None  # null: <run dir>/export/model.onnx (model.ts)
    overwrite: bool = False  # replace an existing export file
    tta: str | None = None  # null: the run's own evaluation.tta, folded into the graph
    opset: int = ranged(18, ge=13, le=23)  # ONNX opset (onnx only)
    onnx_exporter: str = "legacy"  # legacy (TorchScript-based, fast) | dynamo (torch.export)
    check_patches: int = ranged(256, ge=1)  # test patches the export is checked on
    log: bool = True  # add the file, tags and metric to the run's MLflow run
    tracking: UriConfig = field(default_factory=UriConfig)


def check_export(cfg: Any) -> None:
    """Values, one source, then the user's file: an existing export is replaced only with
    overwrite=true (the default out= under the run directory is checked once the run is
    loaded, her2exp.export.export_run)."""
    from her2exp.export import FORMATS, ONNX_EXPORTERS

    check_ranges(cfg, ExportCommand)
    if cfg.format not in FORMATS:
        _fail("format", cfg.format, ", ".join(FORMATS))
    if cfg.onnx_exporter not in ONNX_EXPORTERS:
        _fail("onnx_exporter", cfg.onnx_exporter, ", ".join(ONNX_EXPORTERS))
    if cfg.tta is not None and cfg.tta not in TTA_CHOICES:
        _fail("tta", cfg.tta, f"null (the run's own) or {', '.join(TTA_CHOICES)}")
    _one_source(cfg)
    if cfg.out is not None:
        out = Path(cfg.out)
        if out.is_dir():
            raise UserError(f"out={out} is a folder: give the export's file name (model.onnx)")
        if out.exists() and not cfg.overwrite:
            raise UserError(
                f"out={out} exists (an earlier export): overwrite=true to replace it, or "
                "another out="
            )


SCHEMAS: dict[str, type] = {
    "eval": EvalCommand,
    "predict": PredictCommand,
    "compare": CompareCommand,
    "manifest": ManifestCommand,
    "prepare": PrepareCommand,
    "server": ServerCommand,
    "sync": SyncCommand,
    "rerun": RerunCommand,
    "tile": TileCommand,
    "promote": PromoteCommand,
    "export": ExportCommand,
}


def check_train(cfg: Any) -> None:
    """What her2exp-train checks of a config before it builds anything (builders.build_runtime
    adds the run directory's checks, rundir.plan)."""
    from her2exp import models

    validate(cfg)
    models.check_model_name(cfg.model.name)


CHECKS: dict[str, Callable[[Any], Any]] = {
    "train": check_train,
    "eval": check_eval,
    "predict": check_predict,
    "compare": check_compare,
    "manifest": check_manifest,
    "prepare": check_prepare,
    "server": check_server,
    "sync": check_sync,
    "rerun": check_rerun,
    "tile": check_tile,
    "promote": check_promote,
    "export": check_export,
}


def validate_only(command: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The validate-only entry: compose conf/<command>.yaml with `overrides` and run the checks
    the command runs before any work; raises what the command would print as one line."""
    from her2exp.cli.common import compose

    cfg = compose(command, overrides)
    CHECKS[command](cfg)
    return cfg


def register() -> None:
    """Store every command schema as `<command>_cli_schema` (entry configs list it first)."""
    register_configs()  # the training groups the entry configs compose (data, stain, ...)
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=f"{name}_cli_schema", node=node)


register()
