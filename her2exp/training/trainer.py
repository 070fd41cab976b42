"""The epoch loop over small components: validation, early stopping, checkpointing, resume.

Metric formulas live in metrics/, MLflow in tracking/, the optimizer step in engine/step.py; this
module only decides what happens when, and keeps enough state in `last.pt` that a resumed run
replays an uninterrupted one exactly (docs/architecture.md, "The trainer"). Its components each
have their module (`optimizer`, `checkpointer`, `validator`, `early_stopping`, and
`runtime.signals` for the stop request); their names are re-exported here for existing importers.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from her2exp.core import checkpoint
from her2exp.engine import (
    EpochState,
    EpochStats,
    OptimizerUpdate,
    Preprocess,
    train_one_epoch,
)
from her2exp.runtime import distributed
from her2exp.runtime.distributed import DistContext
from her2exp.runtime.signals import StopRequest
from her2exp.tracking import Tracker
from her2exp.training.checkpointer import Checkpointer
from her2exp.training.early_stopping import EarlyStopping
from her2exp.training.optimizer import build_optimizer, no_weight_decay_names, warmup_cosine
from her2exp.training.validator import Validator

__all__ = [
    "Checkpointer",
    "EarlyStopping",
    "FitResult",
    "StopRequest",
    "Trainer",
    "Validator",
    "build_optimizer",
    "no_weight_decay_names",
    "train_one_epoch",
    "warmup_cosine",
]

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    best_epoch: int
    best_val_auc: float
    threshold_youden_val: float
    last_epoch: int
    stopped_early: bool
    interrupted: bool
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    best_checkpoint: Path | None = None
    stop_signal: int | None = None  # set when a SIGTERM/SIGINT ended the fit
    nonfinite_steps: int = 0


class Trainer:
    """The epoch loop over its components; `fit` runs until done, early-stopped or told to stop.

    The trainer reads only `trainer.*` options (`TrainerConfig`); everything else arrives built.
    """

    def __init__(
        self,
        t: DictConfig,
        model: nn.Module,
        train_model: nn.Module,
        criterion: nn.Module,
        loaders: tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader],
        update: OptimizerUpdate,
        preprocess: Preprocess,
        validator: Validator,
        checkpointer: Checkpointer,
        dctx: DistContext,
        tracker: Tracker,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.t = t
        self.model = model  # the plain module: its state_dict is what checkpoints hold
        self.train_model = train_model  # possibly compiled and/or DDP-wrapped
        self.criterion, self.no_sync = criterion, no_sync
        self.train_loader, self.val_loader = loaders
        self.update, self.preprocess, self.validator = update, preprocess, validator
        self.checkpointer, self.dctx, self.tracker = checkpointer, dctx, tracker
        self.early = EarlyStopping(t.early_stop_patience)
        self.stop = StopRequest()
        self.nonfinite_steps = 0
        self.start_epoch = 1
        self.history: list[dict[str, float]] = []
        self.best_state: dict[str, torch.Tensor] = {}

    # -- resume ------------------------------------------------------------------------------
    def _resume_state(self, epoch: int, rng_per_rank: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.update.optimizer.state_dict(),
            "scheduler": self.update.scheduler.state_dict(),
            "scaler": self.update.scaler.state_dict(),
            "epoch": epoch,
            **self.early.state_dict(),
            "nonfinite_steps_skipped": self.nonfinite_steps,
            "history": self.history,
            "rng": rng_per_rank[0],
            "rng_per_rank": rng_per_rank,
            "world_size": self.dctx.world_size,
        }

    def _best_file(self) -> dict[str, Any]:
        return {
            "model": self.best_state,
            "epoch": self.early.best_epoch,
            "best_val_auc": self.early.best_auc,
            "threshold_youden_val": self.early.best_threshold,
        }

    def resume_from(self, path: str | Path) -> None:
        """Restore everything `last.pt` holds (see Checkpointer for the best-weights pairing).

        Rank 0 loads the file into its model and optimizer; the other ranks then receive the
        weights, the AdamW state and the best weights tensor by tensor (broadcast_module_state,
        broadcast_state) and only the small rest by pickle: a rank's peak is its own model and
        optimizer state, never a second copy of the checkpoint (docs/scaling.md).
        """
        started = time.perf_counter()
        state, best = self.checkpointer.load(Path(path))
        optimizer, device = self.update.optimizer, self.dctx.device
        if state is not None:
            self.model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        distributed.broadcast_module_state(self.model)
        received = distributed.broadcast_state(optimizer.state_dict(), device)
        if not self.dctx.is_main:
            optimizer.load_state_dict(received)
        del received
        small = {k: v for k, v in (state or {}).items() if k not in ("model", "optimizer")}
        small = distributed.broadcast_object(small)
        self._restore_counters(small)
        best = distributed.broadcast_state(best, device, to=torch.device("cpu"))
        if best is not None:  # rank 0's are views of the memory-mapped file: copied
            main = self.dctx.is_main
            self.best_state = {k: v.detach().clone() if main else v for k, v in best.items()}
            del best
            self.checkpointer.save_best(self._best_file())
        self.resume_seconds = time.perf_counter() - started
        log.info(
            "resumed from %s after epoch %d (state restored in %.2f s)",
            path,
            small["epoch"],
            self.resume_seconds,
        )

    def _restore_counters(self, state: dict[str, Any]) -> None:
        """Schedule, scaler, epoch, early stopping, history and this rank's RNG streams."""
        self.update.scheduler.load_state_dict(state["scheduler"])
        self.update.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.early.load_state_dict(state)
        self.nonfinite_steps = int(state.get("nonfinite_steps_skipped", 0))
        self.history = list(state["history"])
        per_rank = state.get("rng_per_rank", [state["rng"]])
        same_layout = int(state.get("world_size", 1)) == self.dctx.world_size
        checkpoint.set_rng_state(per_rank[self.dctx.rank] if same_layout else state["rng"])

    def _stop_agreed(self) -> bool:
        """Any rank asked to stop -> every rank stops (one tiny all-reduce under DDP)."""
        return distributed.any_rank(self.stop.requested, self.dctx.device)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> FitResult:
        """Run the epochs with SIGTERM/SIGINT turned into a clean stop (see StopRequest)."""
        with self.stop.installed():
            return self._fit()

    def _fit(self) -> FitResult:
        t = self.t
        stopped_early = interrupted = False
        epoch = self.start_epoch - 1
        epochs = range(self.start_epoch, t.epochs + 1)
        if self.start_epoch > t.epochs:
            log.info("nothing to train: checkpoint already at epoch %d", epoch)
        elif self.early.exhausted:  # killed right after early stopping
            log.info("nothing to train: the run had early-stopped at epoch %d", epoch)
            stopped_early, epochs = True, range(0)
        for epoch in epochs:
            stats = self._train_epoch(epoch)
            if stats.stopped:  # a signal: the partial epoch is dropped, last.pt is the resume point
                interrupted, epoch = True, epoch - 1
                log.warning(
                    "stopped by a signal during epoch %d; resume from epoch %d", epoch + 1, epoch
                )
                break
            self._end_of_epoch(epoch, stats)
            # Every rank holds the same gathered metrics; rank 0's decision is still broadcast
            # so no rank can ever wait on a collective that the others have left.
            if distributed.broadcast_object(self.early.exhausted):
                stopped_early = True
                log.info("early stop: no val AUC gain in %d epochs", self.early.bad_epochs)
                break
            if t.stop_after_epoch is not None and epoch >= t.stop_after_epoch and epoch < t.epochs:
                interrupted = True
                log.info("stopping after epoch %d as asked (trainer.stop_after_epoch)", epoch)
                break
            if self._stop_agreed():  # a signal during evaluation or the checkpoint write
                interrupted = True
                log.warning("stopped by a signal after epoch %d (saved)", epoch)
                break
        return self._result(epoch, stopped_early, interrupted)

    def fit_closed_form(self, samples: int) -> FitResult:
        """A head fitted without gradient steps (probe=knn, her2exp/training/probe.py): epoch 1 is its
        fit, validated, recorded by early stopping, checkpointed and logged like a trained one."""
        self._end_of_epoch(1, EpochStats(loss=math.nan, samples=samples, seconds=0.0))
        return self._result(1, False, False)

    def _train_epoch(self, epoch: int) -> EpochStats:
        self.train_loader.sampler.set_epoch(epoch)
        self.train_loader.dataset.set_epoch(epoch)
        state = EpochState(epoch, self.nonfinite_steps, lambda: self.stop.requested)
        stats = train_one_epoch(
            self.train_model,
            self.train_loader,
            self.criterion,
            self.update,
            self.preprocess,
            state,
            self.no_sync,
        )
        self.nonfinite_steps += stats.nonfinite_steps
        if stats.nonfinite_steps:
            log.warning(
                "epoch %d: skipped %d optimizer step(s) with a non-finite loss or "
                "gradient (%d in this run)",
                epoch,
                stats.nonfinite_steps,
                self.nonfinite_steps,
            )
        loss_sum, n_seen, seconds = distributed.all_reduce_sum(
            [stats.loss * stats.samples, stats.samples, stats.seconds], self.dctx.device
        )
        stats.loss, stats.samples = loss_sum / max(n_seen, 1), int(n_seen)
        stats.seconds = seconds / self.dctx.world_size
        return stats

    def _end_of_epoch(self, epoch: int, stats: EpochStats) -> None:
        """Validate, update the best epoch, checkpoint, then log (a resume re-logs only what is
        missing)."""
        val = self.validator.epoch_metrics(self.val_loader)
        row = {
            "epoch": epoch,
            "train_loss": stats.loss,
            **val,
            "lr": max(g["lr"] for g in self.update.optimizer.param_groups),  # the head's
            "epoch_seconds": stats.seconds,
            "images_per_second": stats.images_per_second,
            "nonfinite_steps_skipped": self.nonfinite_steps,
        }
        self.history.append(row)
        improved = self.early.update(val["val_auc"], val["val_youden_threshold"], epoch)
        if improved:
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
            }
        rng_per_rank = distributed.all_gather_object(checkpoint.rng_state())
        self.checkpointer.save(
            self._resume_state(epoch, rng_per_rank), self._best_file() if improved else None
        )
        if self.dctx.is_main:
            self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, epoch)
            log.info(
                "epoch %d/%d train_loss %.4f val_loss %.4f val_auc %.4f sens %.3f spec %.3f "
                "thr %.3f %.0f img/s%s",
                epoch,
                self.t.epochs,
                stats.loss,
                val["val_loss"],
                val["val_auc"],
                val["val_sensitivity"],
                val["val_specificity"],
                val["val_youden_threshold"],
                stats.images_per_second,
                " *" if improved else "",
            )

    def _result(self, epoch: int, stopped_early: bool, interrupted: bool) -> FitResult:
        if not self.best_state:
            self.best_state = copy.deepcopy(self.model.state_dict())
        best = self.checkpointer.best
        return FitResult(
            best_epoch=self.early.best_epoch,
            best_val_auc=self.early.best_auc,
            threshold_youden_val=self.early.best_threshold,
            last_epoch=epoch,
            stopped_early=stopped_early,
            interrupted=interrupted,
            best_state=self.best_state,
            history=self.history,
            best_checkpoint=best if best.is_file() else None,
            stop_signal=self.stop.signum if interrupted else None,
            nonfinite_steps=self.nonfinite_steps,
        )
