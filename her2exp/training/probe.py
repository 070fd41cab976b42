"""Probing protocols of a frozen backbone on cached features (`experiment=fm_probe`, `probe=`):
the kNN head's fit step (the head itself is `models.knn.KNNHead`, re-exported here for
existing importers); the linear probe is the usual head, ABMIL the `mil` group's.

`probe=knn` trains nothing: `fit_knn` hands the head the training embeddings and then runs the
trainer's one-epoch bookkeeping (validation, best.pt, MLflow), so the final evaluation, the
frozen operating points, `her2exp-eval` and `her2exp-predict` are the same path as for a trained
head: best.pt holds the training embeddings and labels as the head's buffers.
docs/architecture.md, "Probes".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from her2exp.config import ConfigError
from her2exp.models.knn import LOG_FLOOR, KNNHead

if TYPE_CHECKING:
    from her2exp.training.builders import DataParts
    from her2exp.training.trainer import FitResult, Trainer

__all__ = ["LOG_FLOOR", "KNNHead", "fit_knn"]


def fit_knn(trainer: Trainer, parts: DataParts) -> FitResult:
    """probe=knn in place of `trainer.fit()`: the head takes the (gathered, every rank alike)
    training embeddings, then one epoch's validation, checkpoint and log, as after training."""
    if parts.cached is None:
        raise ConfigError("model.head=knn needs model.cache_features=true (probe=knn sets it)")
    head = trainer.model.head
    head.fit(parts.cached.features["train"], torch.as_tensor(parts.bundle.labels("train")))
    return trainer.fit_closed_form(len(head.bank))
