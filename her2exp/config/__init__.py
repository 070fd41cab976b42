"""Structured configs: Hydra validates keys and types at compose time; `validate` checks values.

Every option a user can set lives here once, with its type, default and allowed values, so a typo
in an override fails at compose time instead of deep inside training; and every command's line is
checked here before any heavy import, so a mistake costs a second, not a CUDA start-up.

What the package owns:
- choices.py: the allowed values of every string option (one tuple each);
- fields.py: `ranged` bounds of numeric options, `check_ranges`, the `refuse` message shape;
- model.py, data.py, train.py: the training config's groups, `TrainConfig` and `validate`;
- commands.py and its modules (scoring, cohorts, tile, export, tracking, common): the schema and
  `check_*` of every other command; model_uri.py: the forms of a registry URI and an alias;
- store.py (Hydra's ConfigStore entries) and compose.py (`compose`, the Compose API over conf/).

What it may import: her2exp.core (ConfigError, UserError, file checks), hydra and omegaconf, the
standard library. Nothing above it, and never torch, timm or mlflow, not even inside a function
(the import-linter contracts `floors` and `light-config`): a check that needs a heavy library runs
in the command that needs it (e.g. whether timm knows `model.name`, training's build_runtime).

The names below were all importable from `her2exp.config` before the split and stay so.
"""

from __future__ import annotations

from her2exp.config.choices import (
    AGGREGATION_CHOICES,
    AMP_CHOICES,
    BAG_BY_CHOICES,
    CALIBRATION_CHOICES,
    DATA_SOURCES,
    EMBEDDING_CHOICES,
    EQUIVOCAL_CHOICES,
    FINETUNE_CHOICES,
    HEAD_CHOICES,
    LEVEL_CHOICES,
    LOSS_CHOICES,
    MIL_CHOICES,
    PATIENT_LABEL_CHOICES,
    PROBE_CHOICES,
    SEED_MAX,
    SPLIT_BY_CHOICES,
    STAIN_CHOICES,
    TTA_CHOICES,
    VERIFY_CHOICES,
    WEIGHT_SUFFIXES,
)
from her2exp.config.data import (
    DataConfig,
    SplitConfig,
    StainConfig,
    validate_data,
    validate_stain,
)
from her2exp.config.fields import (
    Range,
    check_ranges,
    close_matches,
    numeric_fields,
    ranged,
    refuse,
)
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
from her2exp.config.train import (
    DEPRECATED,
    EvaluationConfig,
    TrackingConfig,
    TrainConfig,
    TrainerConfig,
    register_configs,
    validate,
    validate_combinations,
    validate_evaluation,
    validate_tracking,
    validate_trainer,
    warn_deprecated,
)
from her2exp.core.errors import ConfigError

__all__ = [
    "AGGREGATION_CHOICES",
    "AMP_CHOICES",
    "BAG_BY_CHOICES",
    "CALIBRATION_CHOICES",
    "DATA_SOURCES",
    "DEPRECATED",
    "EMBEDDING_CHOICES",
    "EQUIVOCAL_CHOICES",
    "FINETUNE_CHOICES",
    "HEAD_CHOICES",
    "LEVEL_CHOICES",
    "LOSS_CHOICES",
    "MIL_CHOICES",
    "PATIENT_LABEL_CHOICES",
    "PROBE_CHOICES",
    "SEED_MAX",
    "SPLIT_BY_CHOICES",
    "STAIN_CHOICES",
    "TTA_CHOICES",
    "VERIFY_CHOICES",
    "WEIGHT_SUFFIXES",
    "ConfigError",
    "DataConfig",
    "EvaluationConfig",
    "LossConfig",
    "MilConfig",
    "ModelConfig",
    "ProbeConfig",
    "Range",
    "SplitConfig",
    "StainConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrainerConfig",
    "check_ranges",
    "close_matches",
    "numeric_fields",
    "ranged",
    "refuse",
    "register_configs",
    "validate",
    "validate_combinations",
    "validate_data",
    "validate_evaluation",
    "validate_loss",
    "validate_mil",
    "validate_model",
    "validate_probe",
    "validate_stain",
    "validate_tracking",
    "validate_trainer",
    "warn_deprecated",
]
