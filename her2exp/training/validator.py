"""Validation: the run's Scorer over a sharded loader on every rank, gathered in dataset order,
and the per-epoch metrics the trainer logs and early stopping reads.

The live model is scored by the same `evaluation.Scorer` every later command builds from
best.pt (the run's Preprocess, autocast dtype and views), so the end-of-training test table is
computed as her2exp-eval, her2exp-predict and the served model compute theirs.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from her2exp import metrics
from her2exp.engine.scoring import Scores
from her2exp.evaluation.scorer import Scorer
from her2exp.runtime import distributed
from her2exp.runtime.distributed import DistContext


class Validator:
    """Scores a sharded eval loader on every rank and gathers it in dataset order."""

    def __init__(self, scorer: Scorer, criterion: nn.Module, dctx: DistContext) -> None:
        """`scorer`: the live (unwrapped) model with the run's input path and autocast dtype; no
        calibration yet (final.fit_calibration fits and applies it after the last epoch)."""
        self.scorer, self.criterion, self.dctx = scorer, criterion, dctx

    def score(
        self,
        loader: torch.utils.data.DataLoader,
        tta: str = "none",
        desc: str = "validation",
        leave: bool = True,
    ) -> Scores:
        """BatchNorm running stats drift apart between ranks during training, so rank 0's are
        broadcast first: every rank scores its shard with identical weights. `tta`: the views
        (engine.tta_views); the per-epoch validation scores one, the final evaluation the
        run's evaluation.tta. `desc`, `leave`: rank 0's progress bar over its shard."""
        distributed.broadcast_module_state(self.scorer.model)
        local = replace(self.scorer, tta=tta).score(loader, self.criterion, desc, leave)
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
        scores = self.score(loader, leave=False)  # the epoch's own bar is cleared too
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
