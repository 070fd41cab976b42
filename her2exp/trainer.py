"""The epoch loop over small components: validation, early stopping, checkpointing, resume.

Metric formulas live in metrics/, MLflow in tracking/, the optimizer step in engine.py; this
module only decides what happens when, and keeps enough state in `last.pt` that a resumed run
replays an uninterrupted one exactly (docs/architecture.md, "The trainer").
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from her2exp import checkpoint, distributed, metrics
from her2exp.distributed import DistContext
from her2exp.engine import (
    EpochState,
    EpochStats,
    OptimizerUpdate,
    Preprocess,
    Scores,
    score,
    train_one_epoch,
)
from her2exp.tracking import Tracker

log = logging.getLogger(__name__)


#: The first CUDA compute capability with bf16 in its tensor cores (Ampere, sm_80). Older GPUs
#: (V100 sm_70, T4 sm_75) only emulate it, several times slower than fp16 + GradScaler.
NATIVE_BF16_CAPABILITY = (8, 0)


def resolve_amp(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler) for `trainer.amp` on the run's device.

    auto: bf16 where the run's GPU has it natively, else fp16 + GradScaler; fp32 on the CPU,
    where bf16 autocast without bf16 instructions runs many times slower. bf16 on the CPU only
    when asked. The capability asked is `device`'s, not the current device's.
    """
    capability = None
    if amp == "auto" and device.type == "cuda" and not torch.version.hip:
        capability = torch.cuda.get_device_capability(device)
    return amp_choice(amp, device.type, capability)


def amp_choice(
    amp: str, device_type: str, capability: tuple[int, int] | None
) -> tuple[torch.dtype | None, bool]:
    """The decision of `resolve_amp`, given the GPU's compute capability (None: not CUDA, or
    ROCm, whose bf16 is native on every GPU PyTorch supports)."""
    if amp == "off" or (amp == "auto" and device_type != "cuda"):
        return None, False
    if amp == "auto":
        native = capability is None or tuple(capability) >= NATIVE_BF16_CAPABILITY
        return (torch.bfloat16, False) if native else (torch.float16, True)
    if amp == "bf16":
        return torch.bfloat16, False
    return torch.float16, True


def build_optimizer(
    model: nn.Module, cfg: DictConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW without decay on norms, biases and what the model names (a ViT's position
    embedding, class and register tokens: decaying them pulls every patch towards one position
    and the class token towards zero); linear warmup then cosine, stepped per update.

    Both paths take timm's groups with `model.no_weight_decay()`. `trainer.layer_decay` (ViTs)
    uses timm's layer-wise groups: the lr of layer group i is lr * layer_decay ** (top - i), the
    head at lr. Only trainable parameters are optimised, so a frozen backbone contributes
    nothing. The schedule scales every group's own lr.
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    skip = no_weight_decay_names(model)
    if cfg.get("layer_decay") is not None:
        groups = param_groups_layer_decay(
            model, cfg.weight_decay, no_weight_decay_list=skip, layer_decay=cfg.layer_decay
        )
        for group in groups:
            group["lr"] = cfg.lr * group["lr_scale"]
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    # Nothing to train (the kNN probe's head): one empty group keeps the schedule, checkpoints
    # and resume on their one path.
    optimizer = torch.optim.AdamW(groups or [{"params": []}], lr=cfg.lr)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    factor = functools.partial(
        warmup_cosine, warmup=warmup, total=total, min_ratio=cfg.min_lr_ratio
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """The parameter names (fnmatch patterns) the model keeps out of weight decay: timm's
    `no_weight_decay()` convention, which Her2Classifier forwards from its backbone."""
    names = getattr(model, "no_weight_decay", None)
    return set(names()) if callable(names) else set()


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """lr factor at `step`: linear from 1/(warmup+1) to 1, then cosine down to `min_ratio`."""
    if step < warmup:
        start = 1.0 / (warmup + 1)
        return start + (1.0 - start) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class StopRequest:
    """SIGTERM/SIGINT (what schedulers and torchrun send before a kill) become a request to stop.

    The first signal only sets a flag: the running step finishes and the epoch is abandoned
    (`last.pt` of the previous epoch is the resume point; a signal during evaluation or the
    checkpoint write lets that epoch finish and be saved). A second signal of the same kind
    gets the default behaviour: an impatient Ctrl-C still ends the process at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()
            log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, default)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


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


class EarlyStopping:
    """The best epoch on validation AUC and the patience counter: nothing else decides it."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_auc = -math.inf
        self.best_epoch = 0
        self.best_threshold = 0.5
        self.bad_epochs = 0

    def update(self, auc: float, threshold: float, epoch: int) -> bool:
        """Record one epoch's val AUC; true when it is the new best."""
        improved = not math.isnan(auc) and auc > self.best_auc
        if improved:
            self.best_auc, self.best_epoch, self.best_threshold = auc, epoch, threshold
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def exhausted(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_val_auc": self.best_auc,
            "best_epoch": self.best_epoch,
            "threshold_youden_val": self.best_threshold,
            "early_stop_bad_epochs": self.bad_epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_auc = float(state["best_val_auc"])
        self.best_epoch = int(state["best_epoch"])
        self.best_threshold = float(state["threshold_youden_val"])
        self.bad_epochs = int(state["early_stop_bad_epochs"])


class Checkpointer:
    """`last.pt` (everything a resume needs) and `best.pt` (the best weights), written by rank 0.

    `last.pt` is written before `best.pt`, and a resume takes the best weights from `last.pt`
    when the best epoch is its own epoch, else from `best.pt`, which must say it is that epoch:
    a process killed between the two writes never pairs a counter with the wrong weights.
    """

    def __init__(self, directory: Path, enabled: bool, is_main: bool, extra: dict[str, Any]):
        self.directory, self.enabled, self.is_main = directory, enabled, is_main
        self.extra = extra  # model name, resolved config, data fingerprint: in every file

    @property
    def last(self) -> Path:
        return self.directory / "last.pt"

    @property
    def best(self) -> Path:
        return self.directory / "best.pt"

    def save(self, resume_state: dict[str, Any], best: dict[str, Any] | None) -> None:
        if not (self.is_main and self.enabled):
            return
        checkpoint.save({**resume_state, **self.extra}, self.last)
        if best is not None:
            self.save_best(best)

    def save_best(self, best: dict[str, Any]) -> None:
        if self.is_main and self.enabled:
            checkpoint.save({**best, **self.extra}, self.best)

    def load(self, path: Path) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor] | None]:
        """Rank 0: (resume state, best weights or None), memory-mapped (only what is used is
        paged in). Other ranks: (None, None); they receive what they need from rank 0 by
        in-place broadcasts (Trainer.resume_from), so no shared file system is needed."""
        if not self.is_main:
            return None, None
        state = checkpoint.load(path, mmap=True)
        best = None
        best_epoch = int(state["best_epoch"])
        if best_epoch > 0 and best_epoch == int(state["epoch"]):
            best = state["model"]
        elif best_epoch > 0:
            best_file = checkpoint.load(path.parent / "best.pt", mmap=True)
            if int(best_file["epoch"]) != best_epoch:
                raise RuntimeError(
                    f"{path.parent / 'best.pt'} holds epoch {best_file['epoch']} but {path} "
                    f"says the best epoch is {best_epoch}; resume from a consistent pair"
                )
            best = best_file["model"]
        return state, best


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
        """A head fitted without gradient steps (probe=knn, her2exp/probe.py): epoch 1 is its
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
