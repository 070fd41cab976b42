"""The epoch loop: AMP set-up, evaluation each epoch, early stopping, checkpoints and resume.

Metric formulas live in metrics.py, MLflow in tracking.py; this module only decides what happens
when, and keeps enough state in `last.pt` that a resumed run replays an uninterrupted one exactly.
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
from omegaconf import DictConfig, OmegaConf
from torch import nn

from her2exp import checkpoint, distributed, metrics
from her2exp.distributed import DistContext
from her2exp.engine import Scores, StepContext, evaluate, train_one_epoch
from her2exp.tracking import Tracker

log = logging.getLogger(__name__)


def resolve_amp(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler) for `trainer.amp` on this device.

    auto: bf16 on CUDA that supports it, else fp16 + GradScaler; fp32 on the CPU, where bf16
    autocast without bf16 instructions runs many times slower. bf16 on the CPU only when asked.
    """
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None, False
    if amp == "auto":
        return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    if amp == "bf16":
        return torch.bfloat16, False
    return torch.float16, True


def build_optimizer(
    model: nn.Module, cfg: DictConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW without decay on norms and biases; linear warmup then cosine, stepped per update.

    `trainer.layer_decay` (ViTs) uses timm's layer-wise groups: the lr of layer group i is
    lr * layer_decay ** (top - i), the head at lr. Only trainable parameters are optimised, so a
    frozen backbone contributes nothing. The schedule scales every group's own lr.
    """
    if cfg.get("layer_decay") is not None:
        from timm.optim import param_groups_layer_decay

        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        groups = param_groups_layer_decay(
            model, cfg.weight_decay, no_weight_decay_list=skip, layer_decay=cfg.layer_decay
        )
        for group in groups:
            group["lr"] = cfg.lr * group["lr_scale"]
    else:
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    factor = functools.partial(
        warmup_cosine, warmup=warmup, total=total, min_ratio=cfg.min_lr_ratio
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


class Trainer:
    """Holds what one fit needs; `fit` runs epochs until done, early-stopped or told to stop."""

    def __init__(
        self,
        cfg: DictConfig,
        model: nn.Module,
        train_model: nn.Module,
        criterion: nn.Module,
        train_loader: torch.utils.data.DataLoader,
        val_loader: torch.utils.data.DataLoader,
        dctx: DistContext,
        tracker: Tracker,
        run_dir: Path,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        stain_on_device: Callable[..., torch.Tensor] | None = None,
        features: bool = False,
    ) -> None:
        self.cfg, self.t = cfg, cfg.trainer
        self.model = model  # the plain module: its state_dict is what checkpoints hold
        self.train_model = train_model  # possibly compiled and/or DDP-wrapped
        # model.cache_features: the loaders yield cached embeddings, so the head alone is
        # trained and scored; checkpoints still hold the whole model.
        self.score_model = model.head if features else model
        self.no_sync = no_sync
        self.criterion = criterion
        self.train_loader, self.val_loader = train_loader, val_loader
        self.dctx, self.tracker = dctx, tracker
        self.ckpt_dir = run_dir / "checkpoints"
        k = self.t.accumulation_steps
        self.steps_per_epoch = math.ceil(len(train_loader) / k)
        self.optimizer, self.scheduler = build_optimizer(model, self.t, self.steps_per_epoch)
        dtype, use_scaler = resolve_amp(self.t.amp, dctx.device)
        self.ctx = StepContext(
            device=dctx.device,
            autocast_dtype=dtype,
            scaler=torch.amp.GradScaler(dctx.device.type, enabled=use_scaler),
            accumulation_steps=k,
            grad_clip_norm=self.t.grad_clip_norm,
            channels_last=cfg.model.channels_last and not features,
            show_progress=bool(self.t.progress) and dctx.is_main,
            mean=tuple(cfg.data.mean),
            std=tuple(cfg.data.std),
            stain=None if features else stain_on_device,
            should_stop=self._stop_agreed,
            on_nonfinite=self.t.on_nonfinite,
            debug_nan_at_step=self.t.debug_nan_at_step,
        )
        self.stop = StopRequest()
        self.nonfinite_steps = 0
        self.start_epoch = 1
        self.best_auc = -math.inf
        self.best_epoch = 0
        self.best_threshold = 0.5
        self.bad_epochs = 0
        self.history: list[dict[str, float]] = []
        self.best_state: dict[str, torch.Tensor] = {}

    # -- checkpoints -------------------------------------------------------------------------
    def _resume_state(self, epoch: int, rng_per_rank: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.ctx.scaler.state_dict(),
            "epoch": epoch,
            "best_val_auc": self.best_auc,
            "best_epoch": self.best_epoch,
            "threshold_youden_val": self.best_threshold,
            "early_stop_bad_epochs": self.bad_epochs,
            "nonfinite_steps_skipped": self.nonfinite_steps,
            "history": self.history,
            "rng": rng_per_rank[0],
            "rng_per_rank": rng_per_rank,
            "world_size": self.dctx.world_size,
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
        }

    def _stop_agreed(self) -> bool:
        """Any rank asked to stop -> every rank stops (one tiny all-reduce per step under DDP)."""
        return distributed.any_rank(self.stop.requested, self.dctx.device)

    def resume_from(self, path: str | Path) -> None:
        """Restore everything `last.pt` holds.

        The best weights are `last.pt`'s own when the best epoch is its epoch, else `best.pt`'s,
        which must say it is that epoch. (`last.pt` is written before `best.pt`, so a process
        killed between the two never pairs a counter with the wrong weights.)
        """
        path = Path(path)
        state = best = None
        started = time.perf_counter()
        if self.dctx.is_main:  # rank 0 reads; the others get it by broadcast (no shared FS needed)
            state = checkpoint.load(path)
            best_epoch = int(state["best_epoch"])
            if best_epoch > 0 and best_epoch == int(state["epoch"]):
                best = state["model"]
            elif best_epoch > 0:
                best_file = checkpoint.load(path.parent / "best.pt")
                if int(best_file["epoch"]) != best_epoch:
                    raise RuntimeError(
                        f"{path.parent / 'best.pt'} holds epoch {best_file['epoch']} but {path} "
                        f"says the best epoch is {best_epoch}; resume from a consistent pair"
                    )
                best = best_file["model"]
        state, best = distributed.broadcast_object((state, best))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.ctx.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_auc = float(state["best_val_auc"])
        self.best_epoch = int(state["best_epoch"])
        self.best_threshold = float(state["threshold_youden_val"])
        self.bad_epochs = int(state["early_stop_bad_epochs"])
        self.nonfinite_steps = int(state.get("nonfinite_steps_skipped", 0))
        self.history = list(state["history"])
        if best is not None:
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in best.items()}
            if self.dctx.is_main and self.t.save_checkpoints:
                self._save_best()
        per_rank = state.get("rng_per_rank", [state["rng"]])
        same_layout = int(state.get("world_size", 1)) == self.dctx.world_size
        checkpoint.set_rng_state(per_rank[self.dctx.rank] if same_layout else state["rng"])
        self.resume_seconds = time.perf_counter() - started
        log.info("resumed from %s after epoch %d (state restored in %.2f s)", path, state["epoch"],
                 self.resume_seconds)  # fmt: skip

    def _save_best(self) -> Path:
        return checkpoint.save(
            {
                "model": self.best_state,
                "epoch": self.best_epoch,
                "best_val_auc": self.best_auc,
                "threshold_youden_val": self.best_threshold,
                "model_name": self.cfg.model.name,
                "config": OmegaConf.to_yaml(self.cfg, resolve=True),
            },
            self.ckpt_dir / "best.pt",
        )

    def evaluate_all(self, loader: torch.utils.data.DataLoader) -> Scores:
        """Score a sharded eval loader on every rank and gather in dataset order.

        BatchNorm running stats drift apart between ranks during training, so rank 0's are
        broadcast first: every rank scores its shard with identical weights.
        """
        distributed.broadcast_module_state(self.score_model)
        local = evaluate(self.score_model, loader, self.criterion, self.ctx)
        if not self.dctx.is_distributed:
            return local
        loss_sum, n = distributed.all_reduce_sum([local.loss_sum, local.n], self.dctx.device)
        return Scores(
            probs=distributed.gather_in_order(local.probs),
            labels=distributed.gather_in_order(local.labels),
            loss_sum=loss_sum,
            n=int(n),
        )

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
        elif self.bad_epochs >= t.early_stop_patience:  # killed right after early stopping
            log.info("nothing to train: the run had early-stopped at epoch %d", epoch)
            stopped_early, epochs = True, range(0)
        for epoch in epochs:
            self.train_loader.sampler.set_epoch(epoch)
            self.train_loader.dataset.set_epoch(epoch)
            self.ctx.epoch = epoch
            self.ctx.nonfinite_budget = t.max_nonfinite_steps - self.nonfinite_steps
            stats = train_one_epoch(
                self.train_model,
                self.train_loader,
                self.criterion,
                self.optimizer,
                self.scheduler,
                self.ctx,
                epoch,
                no_sync=self.no_sync,
            )
            if stats.stopped:  # a signal: the partial epoch is dropped, last.pt is the resume point
                interrupted = True
                epoch -= 1
                log.warning("stopped by a signal during epoch %d; resume from epoch %d",
                            epoch + 1, epoch)  # fmt: skip
                break
            self.nonfinite_steps += stats.nonfinite_steps
            if stats.nonfinite_steps:
                log.warning("epoch %d: skipped %d optimizer step(s) with a non-finite loss or "
                            "gradient (%d in this run)", epoch, stats.nonfinite_steps,
                            self.nonfinite_steps)  # fmt: skip
            loss_sum, n_seen, seconds = distributed.all_reduce_sum(
                [stats.loss * stats.samples, stats.samples, stats.seconds], self.dctx.device
            )
            stats.loss, stats.samples = loss_sum / max(n_seen, 1), int(n_seen)
            stats.seconds = seconds / self.dctx.world_size
            scores = self.evaluate_all(self.val_loader)
            threshold = metrics.youden_threshold(scores.labels, scores.probs)
            report = metrics.at_threshold(scores.labels, scores.probs, threshold)
            row = {
                "epoch": epoch,
                "train_loss": stats.loss,
                "val_loss": scores.loss,
                "val_auc": report.auc,
                "val_sensitivity": report.sensitivity,
                "val_specificity": report.specificity,
                "val_precision": report.precision,
                "val_f1": report.f1,
                "val_youden_threshold": threshold,
                "lr": max(g["lr"] for g in self.optimizer.param_groups),  # the head's
                "epoch_seconds": stats.seconds,
                "images_per_second": stats.images_per_second,
                "nonfinite_steps_skipped": self.nonfinite_steps,
            }
            self.history.append(row)
            improved = not math.isnan(report.auc) and report.auc > self.best_auc
            if improved:
                self.best_auc, self.best_epoch, self.best_threshold = report.auc, epoch, threshold
                self.bad_epochs = 0
                self.best_state = {
                    k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
                }
            else:
                self.bad_epochs += 1
            rng_per_rank = distributed.all_gather_object(checkpoint.rng_state())
            if self.dctx.is_main and t.save_checkpoints:
                # last.pt first (it can stand in for best.pt, see resume_from), then best.pt.
                checkpoint.save(self._resume_state(epoch, rng_per_rank), self.ckpt_dir / "last.pt")
                if improved:
                    self._save_best()
            if self.dctx.is_main:  # after the checkpoint: a resume re-logs only what is missing
                self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, epoch)
                log.info(
                    "epoch %d/%d train_loss %.4f val_loss %.4f val_auc %.4f sens %.3f spec %.3f "
                    "thr %.3f %.0f img/s%s",
                    epoch, t.epochs, stats.loss, scores.loss, report.auc, report.sensitivity,
                    report.specificity, threshold, stats.images_per_second,
                    " *" if improved else "",
                )  # fmt: skip
            # Every rank holds the same gathered metrics; rank 0's decision is still broadcast
            # so no rank can ever wait on a collective that the others have left.
            if distributed.broadcast_object(self.bad_epochs >= t.early_stop_patience):
                stopped_early = True
                log.info("early stop: no val AUC gain in %d epochs", self.bad_epochs)
                break
            if t.stop_after_epoch is not None and epoch >= t.stop_after_epoch and epoch < t.epochs:
                interrupted = True
                log.info("stopping after epoch %d as asked (trainer.stop_after_epoch)", epoch)
                break
            if self._stop_agreed():  # a signal during evaluation or the checkpoint write
                interrupted = True
                log.warning("stopped by a signal after epoch %d (saved)", epoch)
                break
        if not self.best_state:
            self.best_state = copy.deepcopy(self.model.state_dict())
        best_ckpt = self.ckpt_dir / "best.pt"
        return FitResult(
            best_epoch=self.best_epoch,
            best_val_auc=self.best_auc,
            threshold_youden_val=self.best_threshold,
            last_epoch=epoch,
            stopped_early=stopped_early,
            interrupted=interrupted,
            best_state=self.best_state,
            history=self.history,
            best_checkpoint=best_ckpt if best_ckpt.is_file() else None,
            stop_signal=self.stop.signum if interrupted else None,
            nonfinite_steps=self.nonfinite_steps,
        )
