"""The training config as a whole: `trainer.*`, `tracking.*`, `evaluation.*`, the `TrainConfig`
that joins every group, `validate` (every group's check, then the combinations) and the
ConfigStore entry `train_schema` that conf/train.yaml lists first.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from her2exp.config.choices import (
    AGGREGATION_CHOICES,
    AMP_CHOICES,
    CALIBRATION_CHOICES,
    LEVEL_CHOICES,
    SEED_MAX,
    TTA_CHOICES,
)
from her2exp.config.data import DataConfig, StainConfig, validate_data, validate_stain
from her2exp.config.fields import check_ranges, ranged, refuse
from her2exp.config.model import (
    LossConfig,
    MilConfig,
    ModelConfig,
    ProbeConfig,
    validate_loss,
    validate_mil,
    validate_model,
    validate_probe,
)
from her2exp.core.errors import ConfigError

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
    resume: str | None = (
        None  # a last.pt, or auto: the run directory's own (her2exp/runtime/rundir.py)
    )
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
        refuse("trainer.amp", t.amp, f"one of {', '.join(AMP_CHOICES)}")
    if t.device not in ("auto", "cpu", "cuda") and not str(t.device).startswith("cuda:"):
        refuse("trainer.device", t.device, "auto, cpu, cuda or cuda:N")
    if t.on_nonfinite not in ("stop", "skip"):
        refuse("trainer.on_nonfinite", t.on_nonfinite, "stop or skip")


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
        refuse("tracking.backend", tr.backend, "mlflow or off")
    if tr.fallback not in ("none", "local"):
        refuse("tracking.fallback", tr.fallback, "none (stop) or local (./mlflow.db)")


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
    # (her2exp/engine/explain.py). Off in experiment=smoke, and in a multirun unless its command line
    # sets it (explain.resolve_sweep_default); skipped with model.cache_features=true.
    explain: bool = True


def validate_evaluation(e: Any) -> None:
    """evaluation.*: the operating points and confidence intervals."""
    check_ranges(e, EvaluationConfig, "evaluation.")  # her2exp-eval merges and calls this alone
    for level in ("slide", "patient"):
        how = getattr(e, f"{level}_aggregation")
        if how not in AGGREGATION_CHOICES:
            refuse(f"evaluation.{level}_aggregation", how, ", ".join(AGGREGATION_CHOICES))
    if e.decision_level not in LEVEL_CHOICES:
        refuse("evaluation.decision_level", e.decision_level, ", ".join(LEVEL_CHOICES))
    sens = f"sens{int(round(e.target_sensitivity * 100))}"
    points = ("youden", sens, f"{sens}_lcb", "p50")
    if e.operating_point not in points:
        refuse("evaluation.operating_point", e.operating_point, f"one of {', '.join(points)}")
    if e.tta not in TTA_CHOICES:
        refuse("evaluation.tta", e.tta, f"one of {', '.join(TTA_CHOICES)}")
    if e.calibration not in CALIBRATION_CHOICES:
        refuse("evaluation.calibration", e.calibration, f"one of {', '.join(CALIBRATION_CHOICES)}")


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
            refuse("data.augment", True, f"false with model.cache_features=true ({why})")
        if st.name in ("hed_jitter", "macenko_jitter"):
            refuse(
                "stain.name",
                st.name,
                f"none or macenko with model.cache_features=true ({why}; stain normalisation "
                "is deterministic and is applied before caching)",
            )
        if cfg.evaluation.tta != "none":
            refuse(
                "evaluation.tta",
                cfg.evaluation.tta,
                "none with model.cache_features=true (the cache holds one view of each patch)",
            )
