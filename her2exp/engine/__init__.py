"""The hot loop: one training epoch, one scoring pass and the optimizer update both obey; the
features cache and the explanations of a model's calls.

Pure over (model, loader, policy): no MLflow, no metric formulas (docs/architecture.md, "One
training step"). Owns `preprocess` (the one input path), `step` (`StepPolicy`, `EpochState`,
`OptimizerUpdate`, `train_one_epoch`), `scoring` (`score`, the TTA views), `features` (the
cached embeddings of a frozen backbone) and `explain` (Grad-CAM and token maps). May import
`data`, `tracking`, `runtime`, `models`, `reports`, the pure floors, `config` and `core`; never
`evaluation`, `training`, `apps` or the command line. The names below are re-exported because
callers write `from her2exp.engine import Preprocess, score, train_one_epoch`.
"""

from her2exp.engine.preprocess import Preprocess
from her2exp.engine.scoring import Scores, mean_probability, score, tta_views, view_logits
from her2exp.engine.step import (
    EpochState,
    EpochStats,
    NonFiniteLossError,
    OptimizerUpdate,
    StepPolicy,
    train_one_epoch,
)

__all__ = [
    "EpochState",
    "EpochStats",
    "NonFiniteLossError",
    "OptimizerUpdate",
    "Preprocess",
    "Scores",
    "StepPolicy",
    "mean_probability",
    "score",
    "train_one_epoch",
    "tta_views",
    "view_logits",
]
