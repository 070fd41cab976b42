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
from her2exp.config.fields import check_ranges, closest, option, ranged, refuse
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
    epochs: int = ranged(10, ge=1, help="training epochs (early stopping may end the run sooner)")
    lr: float = ranged(1e-3, gt=0, help="peak learning rate of AdamW, reached after the warmup")
    weight_decay: float = ranged(
        1e-4, ge=0, help="AdamW weight decay (none on norms, biases and the tokens the model names)"
    )
    warmup_epochs: float = ranged(
        1.0, ge=0, help="linear warmup before the cosine decay, in epochs (fractions allowed)"
    )
    min_lr_ratio: float = ranged(
        0.01,
        ge=0,
        le=1,
        help="the cosine schedule's floor as a fraction of lr: 0 decays to zero, 1 is a constant lr",
    )
    layer_decay: float | None = ranged(
        None, gt=0, le=1, help="ViT-style layer-wise lr decay (timm), e.g. 0.75; null: off"
    )
    accumulation_steps: int = ranged(
        1, ge=1, help="micro-batches per optimizer step (gradient accumulation)"
    )
    grad_clip_norm: float | None = ranged(
        1.0,
        gt=0,
        allowed="null (no clipping) or a value > 0",
        help="clip the gradient norm to this value before each step",
    )
    amp: str = option(
        "auto",
        help="auto | bf16 | fp16 | off; auto: bf16 on GPUs that support it, fp16 + GradScaler on older ones, fp32 on the CPU",
    )
    early_stop_patience: int = ranged(
        5, ge=1, help="epochs without a better validation AUC before training stops"
    )
    monitor: str | None = option(
        None,
        help="deprecated and ignored (the best epoch is the one with the highest validation AUC); warns when set",
    )
    resume: str | None = option(
        None, help="a last.pt to resume from, or auto: the run directory's own; null: a new run"
    )
    resume_force: bool = option(
        False, help="resume even though the experiment changed (recorded in MLflow)"
    )
    overwrite: bool = option(
        False, help="a run directory holding an earlier run's checkpoint: replace it"
    )
    stop_after_epoch: int | None = ranged(
        None, ge=1, help="stop after this epoch as if pre-empted (tests resume); null: never"
    )
    deterministic: bool = option(
        False,
        help="deterministic algorithms (torch.use_deterministic_algorithms): reproducible, slower",
    )
    device: str = option("auto", help="auto | cpu | cuda | cuda:N; auto: CUDA when available")
    nproc_per_node: int = ranged(
        1,
        ge=1,
        help="worker processes started in-process for DDP (a sweep's job); torchrun sets its own",
    )
    sync_bn: bool = option(False, help="synchronise BatchNorm statistics across DDP ranks")
    dist_timeout_s: float = ranged(
        300.0, gt=0, help="seconds a DDP collective waits for the other ranks"
    )
    progress: bool = option(True, help="show progress bars")
    save_checkpoints: bool = option(
        True, help="write last.pt and best.pt (false: nothing to resume from)"
    )
    on_nonfinite: str = option(
        "stop",
        help="a non-finite loss or gradient: stop (keep the last good checkpoint) | skip that step, stopping once more than max_nonfinite_steps were skipped",
    )
    max_nonfinite_steps: int = ranged(
        10, ge=0, help="on_nonfinite=skip: skipped steps allowed in a run before it stops"
    )
    debug_nan_at_step: int | None = ranged(
        None,
        ge=0,
        help="debugging only: NaN inputs at this training batch (0-based, over the whole run) to exercise on_nonfinite",
    )


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
    backend: str = option("mlflow", help="mlflow | off")
    uri: str = option(
        "sqlite:///mlflow.db",
        help="the MLflow tracking URI: sqlite:///file.db, a folder, or http://host:port of a server",
    )
    experiment: str = option("her2exp", help="the MLflow experiment the run goes in")
    run_name: str | None = option(None, help="the MLflow run name; null: MLflow's own")
    artifact_location: str | None = option(
        None, help="where a new experiment stores artifacts; null: the server's default"
    )
    log_checkpoint: bool = option(True, help="log best.pt as an MLflow artifact")
    log_model: bool = option(True, help="log the MLflow model (raw patches in, P(HER2+) out)")
    registered_model_name: str | None = option(
        None, help="register the logged model under this name; null: not registered"
    )
    fallback: str = option(
        "none",
        help="the server unreachable at start: none (stop) | local (log to ./mlflow.db instead)",
    )


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

    target_sensitivity: float = ranged(
        0.90, gt=0, lt=1, help="the sensitivity the sens{N} operating points aim at on validation"
    )
    lcb_confidence: float = ranged(
        0.95,
        gt=0,
        lt=1,
        help="sens{N}_lcb: the one-sided confidence of the lower bound on validation sensitivity",
    )
    n_boot: int = ranged(
        1000,
        ge=0,
        allowed="0 (DeLong CI only) or a number of resamples",
        help="bootstrap resamples of the AUC confidence interval",
    )
    slide_aggregation: str = option(
        "mean", help="mean | max | topk_mean of the slide's tile scores"
    )
    patient_aggregation: str = option(
        "mean", help="mean | max | topk_mean of the patient's tile scores"
    )
    topk: int = ranged(8, ge=1, help="topk_mean: mean of the k highest tile scores (all if fewer)")
    decision_level: str = option(
        "tile",
        help="tile | slide | patient: where the clinic decides (its thresholds are the headline)",
    )
    operating_point: str = option(
        "youden", help="youden | sens{N} | sens{N}_lcb | p50: the threshold predict calls with"
    )
    gallery_max: int = ranged(
        32, ge=0, help="patches shown per gallery of false negatives and false positives"
    )
    figures: bool = option(
        True,
        help="the report's PNG figures (~6 s of matplotlib a run; off in experiment=smoke); numbers and tables are written either way",
    )
    tta: str = option(
        "none",
        help="none | d4: final evaluation, eval and predict as the mean over the 8 rotations and flips of each patch",
    )
    calibration: str = option(
        "none",
        help="none | temperature: one T fitted on validation by NLL, frozen in best.pt; the thresholds are then chosen on the calibrated probabilities",
    )
    explain: bool = option(
        True,
        help="Grad-CAM (CNN) / token maps (ViT) over the galleries; off in experiment=smoke, in a multirun unless set, and with model.cache_features=true",
    )


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
    seed: int = ranged(
        42,
        ge=0,
        le=SEED_MAX,
        help="the run's seed (initialisation, sampling; data and split too unless data.*_seed)",
    )
    task_name: str = option("train", help="the job's name (Hydra's job log file)")
    output_dir: str = option(
        MISSING, help="the run directory (set by Hydra: outputs/<date>/<time>)"
    )
    tags: dict[str, str] = option(factory=dict, help="extra MLflow tags, e.g. 'tags={study:a}'")


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
            near = closest(f"{prefix}{key}", [f"{prefix}{k}" for k in known])
            hint = f"did you mean {' or '.join(near)}?" if near else f"keys: {', '.join(known)}"
            raise ConfigError(f"{prefix}{key} is not a key of the training config ({hint})")
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
