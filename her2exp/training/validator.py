"""Validation: the scoring pass over a sharded loader on every rank, gathered in dataset order,
and the per-epoch metrics the trainer logs and early stopping reads.
"""

from __future__ import annotations

import torch
from torch import nn

from her2exp import metrics
from her2exp.engine.preprocess import Preprocess
from her2exp.engine.scoring import Scores, score
from her2exp.runtime import distributed
from her2exp.runtime.distributed import DistContext


class Validator:
    """Scores a sharded eval loader on every rank and gathers it in dataset order."""

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module,
        preprocess: Preprocess,
        autocast_dtype: torch.dtype | None,
        dctx: DistContext,
    ) -> None:
        self.model, self.criterion, self.preprocess = model, criterion, preprocess
        self.autocast_dtype, self.dctx = autocast_dtype, dctx

    def score(self, loader: torch.utils.data.DataLoader, tta: str = "none") -> Scores:
        """BatchNorm running stats drift apart between ranks during training, so rank 0's are
        broadcast first: every rank scores its shard with identical weights. `tta`: the views
        (engine.tta_views); the per-epoch validation scores one, the final evaluation the
        run's evaluation.tta."""
        distributed.broadcast_module_state(self.model)
        local = score(self.model, loader, self.preprocess, self.autocast_dtype, self.criterion, tta)
        if not self.dctx.is_distributed:
            return local
        loss_sum, n = distributed.all_reduce_sum([local.loss_sum, local.n], self.dctx.device)
        return Scores(
            probs=distributed.gather_in_order(local.probs),
            labels=distributed.gather_in_order(local.labels),
            loss_sum=loss_sum,
            n=int(n),
        )

    def epoch_metrics(self, loader: torch.utils.data.DataLoader) -> dict[str, float]:
        """Validation loss, AUC and the Youden operating point of this epoch's weights."""
        scores = self.score(loader)
        threshold = metrics.youden_threshold(scores.labels, scores.probs)
        report = metrics.at_threshold(scores.labels, scores.probs, threshold)
        return {
            "val_loss": scores.loss,
            "val_auc": report.auc,
            "val_sensitivity": report.sensitivity,
            "val_specificity": report.specificity,
            "val_precision": report.precision,
            "val_f1": report.f1,
            "val_youden_threshold": threshold,
        }
