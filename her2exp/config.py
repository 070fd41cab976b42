"""Structured configs: Hydra validates keys and types at compose time; `validate` checks values.

Every option a user can set lives here once, with its type and default, so a typo in an override
fails at compose time instead of deep inside training.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any training starts."""


AMP_CHOICES = ("auto", "bf16", "fp16", "off")
LOSS_CHOICES = ("ce", "focal")
DATA_SOURCES = ("synthetic", "folder", "manifest", "slides")
EQUIVOCAL_CHOICES = ("exclude", "positive", "negative")
PATIENT_LABEL_CHOICES = ("error", "max", "majority")
VERIFY_CHOICES = ("header", "full")
FINETUNE_CHOICES = ("full", "frozen", "last_n_blocks")
HEAD_CHOICES = ("linear", "mlp", "knn")
EMBEDDING_CHOICES = ("pooled", "cls_mean")
AGGREGATION_CHOICES = ("mean", "max", "topk_mean")  # metrics.AGGREGATIONS
LEVEL_CHOICES = ("tile", "slide", "patient")  # metrics.LEVELS
STAIN_CHOICES = ("none", "macenko", "hed_jitter", "macenko_jitter")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
SEED_MAX = 2**32 - 1  # numpy's seeds


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class Range:
    """The values a numeric option allows, declared beside it with `ranged` so that every number
    a user can set has bounds (tests walk the schemas and try a value outside each)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    allowed: str | None = None  # the message's wording; null: built from the bounds

    def contains(self, value: float) -> bool:
        """Finite and within every bound (NaN fails every comparison, so it is refused)."""
        v = float(value)
        return (
            math.isfinite(v)
            and (self.ge is None or v >= self.ge)
            and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le)
            and (self.lt is None or v < self.lt)
        )

    def describe(self, integer: bool, optional: bool) -> str:
        """'an integer >= 1', 'a value in (0, 1)', 'null or a value > 0'."""
        if self.allowed is not None:
            return self.allowed
        kind = "an integer" if integer else "a value"
        lo = (
            f"[{_num(self.ge)}"
            if self.ge is not None
            else f"({_num(self.gt)}"
            if self.gt is not None
            else None
        )
        hi = (
            f"{_num(self.le)}]"
            if self.le is not None
            else f"{_num(self.lt)})"
            if self.lt is not None
            else None
        )
        if lo and hi:
            text = f"{kind} in {lo}, {hi}"
        else:
            ops = [(">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)]
            text = " and ".join(f"{kind} {op} {_num(b)}" for op, b in ops if b is not None)
        return f"null or {text}" if optional else text

    def outside(self, integer: bool) -> list[float]:
        """Values just past each bound (and NaN for floats): what the schema walk tries."""
        step = 1 if integer else 0.5
        values = [b - step for b in (self.ge,) if b is not None]
        values += [b for b in (self.gt, self.lt) if b is not None]
        values += [b + step for b in (self.le,) if b is not None]
        return [int(v) if integer else float(v) for v in values] + ([] if integer else [math.nan])


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def ranged(default: Any, **bounds: Any) -> Any:
    """A dataclass field with its allowed range (`ge`, `gt`, `le`, `lt`, `allowed`)."""
    return field(default=default, metadata={"range": Range(**bounds)})


def numeric_fields(schema: type, prefix: str = "") -> list[tuple[str, type, bool, Range | None]]:
    """(dotted key, int|float, optional, range) of every number in a schema, nested included."""
    hints = typing.get_type_hints(schema)
    found = []
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = (
            args[0]
            if typing.get_origin(hint) in (typing.Union, _UnionType) and len(args) == 1
            else hint
        )
        if dataclasses.is_dataclass(base):
            found += numeric_fields(base, f"{prefix}{f.name}.")
        elif base in (int, float):
            found.append((f"{prefix}{f.name}", base, base is not hint, f.metadata.get("range")))
    return found


_UnionType = type(int | None)


def check_ranges(node: Any, schema: type, prefix: str = "") -> None:
    """Every `ranged` number of `node` (a config of `schema`) within its bounds."""
    for key, kind, optional, bounds in numeric_fields(schema):
        value = OmegaConf.select(node, key) if isinstance(node, DictConfig) else _get(node, key)
        if bounds is None or value is None:
            continue
        if not bounds.contains(value):
            _fail(f"{prefix}{key}", value, bounds.describe(kind is int, optional))


def _get(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


#: Options that no longer do anything: still accepted (old runs' configs compose and rerun), with a
#: warning naming what replaced them.
DEPRECATED = {
    "trainer.monitor": "the best epoch is always the one with the highest validation AUC",
}


def warn_deprecated(cfg: Any) -> None:
    """One warning per deprecated option that is set (null is the unset default)."""
    for dotted, why in DEPRECATED.items():
        group, key = dotted.split(".")
        node = cfg.get(group) if isinstance(cfg, DictConfig) else getattr(cfg, group, None)
        value = None if node is None else node.get(key) if isinstance(node, DictConfig) else None
        if value is not None:
            # FutureWarning: shown to users by default (DeprecationWarning is not).
            msg = f"her2exp: {dotted}={value!r} is deprecated and ignored: {why}"
            warnings.warn(msg, FutureWarning, stacklevel=2)


@dataclass
class ModelConfig:
    """A timm backbone (built offline from `name` + `kwargs`) and the HER2 head on its embedding."""

    name: str = "resnet18"  # the timm architecture; hub names (hf-hub:...) go in hub_id
    pretrained: bool = False  # timm's own pretrained weights (a hub download unless cached)
    hub_id: str | None = None  # where pretrained=true loads from; null: timm's default for `name`
    weights: str | None = None  # a local .safetensors/.pth/.bin for the backbone (offline)
    # Extra timm.create_model kwargs (init_values, dynamic_img_size, pretrained_cfg_overlay, ...);
    # values with a _target_ are built by hydra.utils.instantiate (e.g. Virchow2's mlp_layer).
    kwargs: dict[str, Any] = field(default_factory=dict)
    embedding: str = "pooled"  # pooled: timm's global_pool | cls_mean: class token + mean patch
    head: str = "linear"  # linear | mlp (timm.layers.Mlp, head_hidden_dim wide) | knn (probe)
    head_hidden_dim: int = ranged(256, ge=1)
    knn_k: int = ranged(20, ge=1)  # head=knn: neighbours voting (probe=knn sets ${probe.k})
    finetune: str = "full"  # full | frozen (linear probe) | last_n_blocks
    n_last_blocks: int = ranged(
        1, ge=1
    )  # finetune=last_n_blocks: timm layer groups trained, from the top
    cache_features: bool = False  # frozen backbone: embed each image once, train the head on it
    feature_cache_dir: str | None = None  # null: <run dir>/features; shared: reused across runs
    num_classes: int = ranged(2, ge=2, le=2, allowed="2 (binary HER2-/HER2+)")
    drop_rate: float = ranged(0.0, ge=0, lt=1)
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_before_ddp: bool = False
    compile_backend: str = "inductor"
    min_image_size: int = ranged(32, ge=1)


def validate_model(m: Any) -> None:
    """model.*: weights source, fine-tuning mode, head, feature cache."""
    if m.finetune not in FINETUNE_CHOICES:
        _fail("model.finetune", m.finetune, f"one of {', '.join(FINETUNE_CHOICES)}")
    if m.head not in HEAD_CHOICES:
        _fail("model.head", m.head, f"one of {', '.join(HEAD_CHOICES)}")
    if m.embedding not in EMBEDDING_CHOICES:
        _fail("model.embedding", m.embedding, f"one of {', '.join(EMBEDDING_CHOICES)}")
    if m.pretrained and m.weights:
        _fail(
            "model.weights",
            m.weights,
            "null with model.pretrained=true (give one source: the hub or a local file)",
        )
    if m.weights and not str(m.weights).lower().endswith(WEIGHT_SUFFIXES):
        _fail("model.weights", m.weights, f"a {', '.join(WEIGHT_SUFFIXES)} file")
    for key in ("num_classes", "pretrained", "pretrained_cfg", "checkpoint_path"):
        if key in m.kwargs:
            _fail(f"model.kwargs.{key}", m.kwargs[key], f"not set here (her2exp sets {key})")
    if m.head == "knn" and not m.cache_features:
        _fail(
            "model.head",
            m.head,
            "linear or mlp unless model.cache_features=true (the kNN head is fitted on the "
            "cached training embeddings; probe=knn sets both)",
        )
    if m.cache_features and m.finetune != "frozen":
        _fail(
            "model.cache_features",
            True,
            "true only with model.finetune=frozen (a backbone that trains changes its "
            "features every step)",
        )


@dataclass
class LossConfig:
    name: str = "ce"
    gamma: float = ranged(2.0, ge=0)
    alpha: float | None = ranged(
        None, gt=0, lt=1, allowed="null or a value in (0, 1) weighting the HER2+ class"
    )
    use_class_weights: bool = False
    label_smoothing: float = ranged(0.0, ge=0, lt=1)


def validate_loss(loss: Any) -> None:
    """loss.*: the criterion and its class weighting."""
    if loss.name not in LOSS_CHOICES:
        _fail("loss.name", loss.name, f"one of {', '.join(LOSS_CHOICES)}")


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
    # The user's own patches (data=folder | data=manifest; her2exp/data/sources.py).
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
    # mil != none: the bag of tiles one prediction is made for (her2exp/mil/bags.py).
    bag_by: str = "patient"  # patient | slide


SPLIT_BY_CHOICES = ("patient", "site")


def _validate_folds(sp: Any) -> None:
    """data.split.folds/fold/by: a fold needs its folds and lies in [0, folds); by=site is CV."""
    if sp.by not in SPLIT_BY_CHOICES:
        _fail("data.split.by", sp.by, f"one of {', '.join(SPLIT_BY_CHOICES)}")
    if sp.folds is None:
        if sp.fold is not None:
            _fail("data.split.fold", sp.fold, "null unless data.split.folds is set (>= 2)")
        if sp.by == "site":
            _fail("data.split.by", sp.by, "patient unless data.split.folds is set (one per site)")
        return
    if sp.fold is None or not 0 <= sp.fold < sp.folds:
        _fail(
            "data.split.fold",
            sp.fold,
            f"an integer in [0, {sp.folds}) with data.split.folds={sp.folds} "
            f"(a sweep: 'data.split.fold=range({sp.folds})')",
        )


def validate_data(d: Any, m: Any) -> None:
    """data.*: loaders, file sources, labels, splits (the image size against the model's minimum)."""
    if d.prefetch_factor is not None and (d.num_workers == 0 or d.prefetch_factor < 1):
        _fail(
            "data.prefetch_factor",
            d.prefetch_factor,
            "null, or an integer >= 1 together with data.num_workers > 0",
        )
    if d.persistent_workers and d.num_workers == 0:
        _fail("data.persistent_workers", True, "false unless data.num_workers > 0")
    if d.source not in DATA_SOURCES:
        _fail("data.source", d.source, f"one of {', '.join(DATA_SOURCES)}")
    if d.equivocal not in EQUIVOCAL_CHOICES:
        _fail("data.equivocal", d.equivocal, f"one of {', '.join(EQUIVOCAL_CHOICES)} (for 2+)")
    if d.patient_label not in PATIENT_LABEL_CHOICES:
        _fail(
            "data.patient_label",
            d.patient_label,
            f"one of {', '.join(PATIENT_LABEL_CHOICES)} (a patient with patches of both labels)",
        )
    if d.on_bad_file not in ("error", "skip"):
        _fail("data.on_bad_file", d.on_bad_file, "error or skip")
    if d.get("positive_patch_fraction") is not None and d.source != "synthetic":
        _fail(
            "data.positive_patch_fraction",
            d.positive_patch_fraction,
            "null unless data=synthetic (it shapes the embedded generator only)",
        )
    if not d.cache and d.source == "synthetic":
        _fail(
            "data.cache",
            d.cache,
            "true with data=synthetic (it is generated in memory: there are no files to stream)",
        )
    if d.verify not in VERIFY_CHOICES:
        _fail("data.verify", d.verify, f"one of {', '.join(VERIFY_CHOICES)}")
    for key in ("label_map", "score_map"):
        mapping = dict(d[key])
        if not mapping or not set(mapping.values()) <= {0, 1}:
            _fail(
                f"data.{key}", mapping, "a non-empty map of names to labels 0 (HER2-) or 1 (HER2+)"
            )
    if "2+" in d.score_map:
        _fail("data.score_map", dict(d.score_map), "no 2+ entry: data.equivocal decides 2+")
    if d.patient_regex is not None:
        try:
            pattern = re.compile(d.patient_regex)
        except re.error as exc:
            _fail("data.patient_regex", d.patient_regex, f"a valid regular expression ({exc})")
        if pattern.groups == 0:
            _fail("data.patient_regex", d.patient_regex, "a pattern with a (named) group")
    if d.path is not None and not str(d.path).lower().endswith((".csv", ".parquet", ".pq")):
        _fail("data.path", d.path, "a .csv or .parquet manifest")
    if d.image_size < m.min_image_size:
        _fail(
            "data.image_size",
            d.image_size,
            f"at least {m.min_image_size} px for model.name={m.name} (model.min_image_size)",
        )
    fractions = (d.split.train, d.split.val, d.split.test)
    if min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        _fail(
            "data.split",
            dict(zip(("train", "val", "test"), fractions, strict=True)),
            "three fractions > 0 that sum to 1",
        )
    _validate_folds(d.split)
    for key in ("mean", "std"):
        v = d[key]
        if v is not None and (len(v) != 3 or (key == "std" and min(v) <= 0)):
            _fail(f"data.{key}", list(v), "null (the model's own) or three values (std > 0)")


@dataclass
class TrainerConfig:
    epochs: int = ranged(10, ge=1)
    lr: float = ranged(1e-3, gt=0)
    weight_decay: float = ranged(1e-4, ge=0)
    warmup_epochs: float = ranged(1.0, ge=0)
    # The cosine schedule's floor as a fraction of lr: 0 decays to zero, 1 is a constant lr.
    min_lr_ratio: float = ranged(0.01, ge=0, le=1)
    layer_decay: float | None = ranged(
        None, gt=0, le=1
    )  # ViT-style layer-wise lr decay (timm), e.g. 0.75; null: off
    accumulation_steps: int = ranged(1, ge=1)
    grad_clip_norm: float | None = ranged(1.0, gt=0, allowed="null (no clipping) or a value > 0")
    amp: str = "auto"
    early_stop_patience: int = ranged(5, ge=1)
    monitor: str | None = None  # deprecated (DEPRECATED): ignored, warns when set
    resume: str | None = None  # a last.pt, or auto: the run directory's own (her2exp/rundir.py)
    resume_force: bool = False  # resume even though the experiment changed (recorded in MLflow)
    overwrite: bool = False  # a run directory holding an earlier run's checkpoint: replace it
    stop_after_epoch: int | None = ranged(None, ge=1)
    deterministic: bool = False
    device: str = "auto"
    nproc_per_node: int = ranged(1, ge=1)
    sync_bn: bool = False
    dist_timeout_s: float = ranged(300.0, gt=0)
    progress: bool = True
    save_checkpoints: bool = True
    # A non-finite loss or gradient: stop (keep the last good checkpoint) or skip that optimizer
    # step, counting it, and stop once more than max_nonfinite_steps were skipped in the run.
    on_nonfinite: str = "stop"
    max_nonfinite_steps: int = ranged(10, ge=0)
    # Debugging: NaN inputs at this training batch (0-based, counted over the whole run), to
    # exercise on_nonfinite. Never set it for real training.
    debug_nan_at_step: int | None = ranged(None, ge=0)


def validate_trainer(t: Any) -> None:
    """trainer.*: the optimisation, precision and the process layout."""
    if t.amp not in AMP_CHOICES:
        _fail("trainer.amp", t.amp, f"one of {', '.join(AMP_CHOICES)}")
    if t.device not in ("auto", "cpu", "cuda") and not str(t.device).startswith("cuda:"):
        _fail("trainer.device", t.device, "auto, cpu, cuda or cuda:N")
    if t.on_nonfinite not in ("stop", "skip"):
        _fail("trainer.on_nonfinite", t.on_nonfinite, "stop or skip")


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
        _fail("stain.name", st.name, f"one of {', '.join(STAIN_CHOICES)}")
    if st.rescale not in ("all", "hematoxylin", "none"):
        _fail("stain.rescale", st.rescale, "all, hematoxylin (keeps DAB intensity) or none")
    if st.percentile_method not in ("topk", "sort"):
        _fail("stain.percentile_method", st.percentile_method, "topk or sort")


@dataclass
class TrackingConfig:
    backend: str = "mlflow"
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "her2exp"
    run_name: str | None = None
    artifact_location: str | None = None
    log_checkpoint: bool = True
    log_model: bool = True
    registered_model_name: str | None = None
    fallback: str = "none"


def validate_tracking(tr: Any) -> None:
    """tracking.*: where runs go and what happens when the server is away."""
    if tr.backend not in ("mlflow", "off"):
        _fail("tracking.backend", tr.backend, "mlflow or off")
    if tr.fallback not in ("none", "local"):
        _fail("tracking.fallback", tr.fallback, "none (stop) or local (./mlflow.db)")


@dataclass
class EvaluationConfig:
    """How runs are scored: operating points chosen on validation, CIs, and the three levels
    (tile, slide, patient). Slide and patient scores both aggregate the tile scores directly
    (a patient's score is not an aggregate of its slide scores), so a patient with one big and
    one small slide weighs every tile alike. `decision_level` is where the clinic decides: its
    thresholds, chosen on validation at that level, are the headline and what predict calls."""

    target_sensitivity: float = ranged(0.90, gt=0, lt=1)
    # sens{N}_lcb: the one-sided confidence of the lower bound on validation sensitivity.
    lcb_confidence: float = ranged(0.95, gt=0, lt=1)
    n_boot: int = ranged(1000, ge=0, allowed="0 (DeLong CI only) or a number of resamples")
    slide_aggregation: str = "mean"  # mean | max | topk_mean of the slide's tile scores
    patient_aggregation: str = "mean"  # mean | max | topk_mean of the patient's tile scores
    topk: int = ranged(8, ge=1)  # topk_mean: mean of the k highest tile scores (all if fewer)
    decision_level: str = "tile"  # tile | slide | patient
    operating_point: str = "youden"
    gallery_max: int = ranged(32, ge=0)
    # The PNG figures of a report (ROCs, PR, reliability, decision curve, confusion matrices,
    # galleries): ~6 s of matplotlib per run. Off in experiment=smoke (the tests); the numbers,
    # summary.md, best.json and predictions are written either way.
    figures: bool = True
    # Final evaluation, eval and predict (per-epoch validation stays one view): none | d4, the
    # mean HER2+ probability over the 8 rotations and flips of each patch.
    tta: str = "none"
    # none | temperature: one T fitted on validation by NLL, frozen in best.pt like the
    # thresholds (which are then chosen on the calibrated probabilities) and applied downstream.
    calibration: str = "none"
    # Grad-CAM (CNN) / token maps (ViT) over the false-negative and false-positive galleries
    # (her2exp/explain.py). Off in experiment=smoke, and in a multirun unless its command line
    # sets it (explain.resolve_sweep_default); skipped with model.cache_features=true.
    explain: bool = True


#: evaluation.tta and evaluation.calibration (engine.tta_views, metrics.fit_temperature).
TTA_CHOICES = ("none", "d4")
CALIBRATION_CHOICES = ("none", "temperature")


def validate_evaluation(e: Any) -> None:
    """evaluation.*: the operating points and confidence intervals."""
    check_ranges(e, EvaluationConfig, "evaluation.")  # her2exp-eval merges and calls this alone
    for level in ("slide", "patient"):
        how = getattr(e, f"{level}_aggregation")
        if how not in AGGREGATION_CHOICES:
            _fail(f"evaluation.{level}_aggregation", how, ", ".join(AGGREGATION_CHOICES))
    if e.decision_level not in LEVEL_CHOICES:
        _fail("evaluation.decision_level", e.decision_level, ", ".join(LEVEL_CHOICES))
    sens = f"sens{int(round(e.target_sensitivity * 100))}"
    points = ("youden", sens, f"{sens}_lcb", "p50")
    if e.operating_point not in points:
        _fail("evaluation.operating_point", e.operating_point, f"one of {', '.join(points)}")
    if e.tta not in TTA_CHOICES:
        _fail("evaluation.tta", e.tta, f"one of {', '.join(TTA_CHOICES)}")
    if e.calibration not in CALIBRATION_CHOICES:
        _fail("evaluation.calibration", e.calibration, f"one of {', '.join(CALIBRATION_CHOICES)}")


MIL_CHOICES = ("none", "mean_pool", "max_pool", "abmil")
BAG_BY_CHOICES = ("patient", "slide")


@dataclass
class MilConfig:
    """A head over bags of cached tile embeddings (`mil=abmil`, ...; her2exp/mil/), one bag per
    `data.bag_by`; `none` is the patch classifier. Named apart from `evaluation.*_aggregation`,
    which aggregates patch scores after the fact."""

    name: str = "none"  # none | mean_pool | max_pool | abmil
    hidden: int = ranged(128, ge=1)  # the instance embedding's width in the head
    attention_dim: int = ranged(128, ge=1)  # abmil: width of the attention network
    dropout: float = ranged(0.25, ge=0, lt=1)
    gated: bool = True  # abmil: gated attention (Ilse et al. 2018, eq. 9)
    batch_size: int = ranged(8, ge=1)  # bags per optimizer step (global) and per scoring batch


def validate_mil(mil: Any, cfg: Any) -> None:
    """mil.*: the head, and what bags need of the other groups (the group files set them)."""
    if mil.name not in MIL_CHOICES:
        _fail("mil.name", mil.name, f"one of {', '.join(MIL_CHOICES)}")
    d = cfg.data
    if d.bag_by not in BAG_BY_CHOICES:
        _fail("data.bag_by", d.bag_by, f"one of {', '.join(BAG_BY_CHOICES)}")
    if mil.name == "none":
        return
    why = f"mil={mil.name} trains on bags of cached tile embeddings"
    if not cfg.model.cache_features:
        _fail("model.cache_features", False, f"true with mil={mil.name} ({why})")
    levels = (d.bag_by, "patient") if d.bag_by == "slide" else (d.bag_by,)
    e = cfg.evaluation
    if e.decision_level not in levels:
        _fail(
            "evaluation.decision_level",
            e.decision_level,
            f"{' or '.join(levels)} with mil={mil.name} data.bag_by={d.bag_by} (a bag is "
            f"scored as a whole: there are no tile scores to decide on)",
        )


PROBE_CHOICES = ("none", "linear", "knn", "abmil")


@dataclass
class ProbeConfig:
    """A probing protocol of a frozen backbone on cached features (`probe=linear|knn|abmil`,
    experiment=fm_probe; her2exp/probe.py): the group files set the head, this records which
    protocol a run is, so a sweep's leaderboard can group its children by it."""

    name: str = "none"  # none | linear | knn | abmil
    k: int = ranged(20, ge=1)  # probe=knn: neighbours (cosine similarity), model.knn_k
    n_runs: int = ranged(5, ge=1)  # seeds per backbone x protocol in an fm_probe multirun


def validate_probe(p: Any, cfg: Any) -> None:
    """probe.*: the protocol matches the head (and MIL) its group file set."""
    if p.name not in PROBE_CHOICES:
        _fail("probe.name", p.name, f"one of {', '.join(PROBE_CHOICES)}")
    head = cfg.model.head
    if p.name == "knn" and head != "knn":
        _fail("model.head", head, "knn with probe=knn (the protocol is the kNN head)")
    if p.name == "linear" and head != "linear":
        _fail("model.head", head, "linear with probe=linear")
    mil = (
        OmegaConf.select(cfg, "mil.name", default="none") if isinstance(cfg, DictConfig) else "none"
    )
    if p.name == "abmil" and mil != "abmil":
        _fail("mil.name", mil, "abmil with probe=abmil (the protocol is patient-level ABMIL)")
    if p.name in ("linear", "knn") and mil != "none":
        _fail("mil.name", mil, f"none with probe={p.name} (bags: probe=abmil)")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stain: StainConfig = field(default_factory=StainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    mil: MilConfig = field(default_factory=MilConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    seed: int = ranged(42, ge=0, le=SEED_MAX)
    task_name: str = "train"
    output_dir: str = MISSING
    tags: dict[str, str] = field(default_factory=dict)


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore; the entry configs list them first in defaults."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


def _check_keys(node: DictConfig, schema: type, prefix: str = "") -> None:
    """`+key=value` overrides slip past Hydra's struct check; unknown keys are refused here."""
    known = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items_ex(resolve=False):
        if key == "hydra" and not prefix:
            continue
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(
                f"{prefix}{key}: not allowed by the schema; {prefix or 'top level'} "
                f"keys are: {allowed}"
            )
        sub = OmegaConf.get_type(node, key) if isinstance(value, DictConfig) else None
        if sub is not None and dataclasses.is_dataclass(sub):
            _check_keys(node[key], sub, f"{prefix}{key}.")


def validate(cfg: DictConfig | TrainConfig) -> None:
    """Reject values that would fail (or silently mislead) later, naming the key and what is
    allowed; each group's rules sit beside its schema above."""
    if isinstance(cfg, DictConfig):
        _check_keys(cfg, TrainConfig)
    warn_deprecated(cfg)
    check_ranges(cfg, TrainConfig)
    validate_trainer(cfg.trainer)
    validate_data(cfg.data, cfg.model)
    validate_loss(cfg.loss)
    validate_model(cfg.model)
    validate_stain(cfg.stain)
    validate_evaluation(cfg.evaluation)
    validate_tracking(cfg.tracking)
    validate_combinations(cfg)
    validate_mil(cfg.mil, cfg)
    validate_probe(cfg.probe, cfg)


def validate_combinations(cfg: Any) -> None:
    """Options that are fine alone but wrong together."""
    d, m, st = cfg.data, cfg.model, cfg.stain
    if m.cache_features:
        # Features are computed once per image: anything drawn anew each epoch would be frozen
        # into a single draw, silently turning augmentation off.
        why = (
            "cached features hold one embedding per image, so a random augmentation would be "
            "drawn once and frozen into the cache"
        )
        if d.augment:
            _fail("data.augment", True, f"false with model.cache_features=true ({why})")
        if st.name in ("hed_jitter", "macenko_jitter"):
            _fail(
                "stain.name",
                st.name,
                f"none or macenko with model.cache_features=true ({why}; stain normalisation "
                "is deterministic and is applied before caching)",
            )
        if cfg.evaluation.tta != "none":
            _fail(
                "evaluation.tta",
                cfg.evaluation.tta,
                "none with model.cache_features=true (the cache holds one view of each patch)",
            )


def close_matches(name: str, candidates: list[str], n: int = 5) -> list[str]:
    """Names a user probably meant; used for unknown model names."""
    return difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
