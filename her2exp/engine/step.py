"""One training epoch and the optimizer update it obeys (docs/architecture.md, "One training step").

- `StepPolicy`: how every step is taken, fixed for the run (frozen); the per-epoch state
  (`EpochState`) lives apart from it.
- `OptimizerUpdate`: the only code that touches the optimizer, scheduler and GradScaler: unscale,
  norm (and clip), one non-finite flag agreed by every rank, step or skip, always `update()`.
- `train_one_epoch`: one pass over the loader with gradient accumulation.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from her2exp.core import progress
from her2exp.engine.preprocess import Preprocess
from her2exp.runtime import distributed


class NonFiniteLossError(RuntimeError):
    """Training diverged; the last good checkpoint on disk is kept."""


@dataclass(frozen=True)
class StepPolicy:
    """How every optimizer step of the run is taken (trainer.* options, resolved once)."""

    autocast_dtype: torch.dtype | None = None
    accumulation_steps: int = 1
    grad_clip_norm: float | None = None
    on_nonfinite: str = "stop"  # stop | skip (trainer.on_nonfinite)
    max_nonfinite_steps: int = 10
    show_progress: bool = False  # trainer.progress; core.progress rules the rest (rank 0, ...)
    debug_nan_at_step: int | None = None  # global batch index whose inputs become NaN

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


@dataclass
class EpochState:
    """What changes from epoch to epoch: the epoch, skips already spent, a stop request."""

    epoch: int = 1
    nonfinite_skipped_before: int = 0  # skipped optimizer steps in earlier epochs of the run
    # Polled once per optimizer step and agreed across ranks with the non-finite flag: true
    # ends the epoch early (a pre-emption signal), on every rank at the same step.
    stop_requested: Callable[[], bool] | None = None


@dataclass
class EpochStats:
    loss: float
    samples: int
    seconds: float
    nonfinite_steps: int = 0  # optimizer steps skipped (trainer.on_nonfinite=skip)
    stopped: bool = False  # ended early by a stop request

    @property
    def images_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan


class OptimizerUpdate:
    """The one owner of the optimizer step, the LR schedule and the GradScaler.

    At the end of every accumulation window: unscale (when a GradScaler is on), take the
    gradient norm (clipping to `grad_clip_norm`), build one local "bad window" flag (a
    non-finite loss, or a non-finite norm without a scaler; with fp16 an overflow is the
    scaler's own business), agree it with the stop request across ranks in one all-reduce, then
    step or skip on every rank alike. A skip restores the BatchNorm buffers the bad forward
    moved and backs the GradScaler off, so `update()` runs after every window, scales stay equal
    across ranks and the next `unscale_()` never meets a stale one.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        policy: StepPolicy,
    ) -> None:
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.policy = policy
        self._saved: list[torch.Tensor] = []

    def begin_window(self, model: nn.Module) -> None:
        """Remember BatchNorm buffers, so a skipped step leaves the model as it was."""
        if self.policy.on_nonfinite == "skip":
            self._saved = [b.detach().clone() for b in _float_buffers(model)]

    def finish_window(
        self,
        model: nn.Module,
        window_bad: torch.Tensor,
        stop: bool,
        where: str,
        window_loss: torch.Tensor | None = None,
    ) -> tuple[bool, bool, float]:
        """Step or skip; returns (skipped, stop agreed by every rank, this rank's window loss).

        The one host sync of the step: the agreed flags and the local loss sum come back in
        one `.tolist()`. The stop flag is written by a fill kernel, not copied from the host
        (a pageable host-to-device copy would wait for the GPU as well).
        """
        scaler = self.scaler
        if scaler.is_enabled():
            scaler.unscale_(self.optimizer)
        norm = _grad_norm(model, self.policy.grad_clip_norm)
        bad = window_bad if scaler.is_enabled() else window_bad | ~torch.isfinite(norm)
        flags = torch.full((2,), float(stop), device=bad.device)
        flags[0] = bad
        agreed = distributed.any_rank_tensor(flags)
        loss = window_loss if window_loss is not None else torch.zeros((), device=bad.device)
        bad_v, stop_v, loss_v = torch.cat([agreed, loss.reshape(1).float()]).tolist()
        bad_agreed, stop_agreed = bad_v > 0, stop_v > 0
        if bad_agreed:
            if self.policy.on_nonfinite != "skip":
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at {where}; the last good checkpoint is kept. "
                    "Lower trainer.lr, check the data, or set trainer.on_nonfinite=skip."
                )
            with torch.no_grad():
                for b, old in zip(_float_buffers(model), self._saved, strict=True):
                    b.copy_(old)
            if scaler.is_enabled():  # as the scaler backs off on an overflow of its own
                scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        else:
            scaler.step(self.optimizer)
            scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # also after a skipped step: the schedule stays aligned with epochs
        return bad_agreed, stop_agreed, loss_v


def _float_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for b in model.buffers() if b.is_floating_point()]


def _grad_norm(model: nn.Module, clip: float | None) -> torch.Tensor:
    """Total gradient norm (clipped to `clip` when set), as a device tensor: no host sync."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), device=next(model.parameters()).device)
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: nn.Module,
    update: OptimizerUpdate,
    preprocess: Preprocess,
    state: EpochState,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> EpochStats:
    """One pass over `loader` with gradient accumulation.

    Each micro-batch loss is divided by the size of its accumulation window; the last window of
    the epoch may be shorter and is divided by its own size, so every optimizer step averages
    the gradients it saw. Forward and backward of all but the window's last micro-batch run
    under `no_sync()`. A window's loss sum stays on the device and reaches the host with the
    step's one sync (`finish_window`); the returned loss is the sample-weighted mean over the
    windows that were kept, and the progress bar shows it at no extra sync.
    """
    policy, device, epoch = update.policy, preprocess.device, state.epoch
    model.train()
    n_batches, k = len(loader), policy.accumulation_steps
    kept_loss, kept_n, skipped = 0.0, 0, 0
    window_loss, window_n = torch.zeros((), device=device), 0
    window_bad = torch.zeros((), dtype=torch.bool, device=device)
    start = time.perf_counter()
    update.optimizer.zero_grad(set_to_none=True)
    shown = policy.show_progress
    bar = progress.bar(loader, desc=f"epoch {epoch}", unit="batch", leave=False, show=shown)
    for step, (x, y, *rest) in enumerate(bar):
        window_start = (step // k) * k
        window = min(k, n_batches - window_start)
        boundary = step - window_start == window - 1
        if step == window_start:
            update.begin_window(model)
        index = rest[0] if rest else None  # dataset indices: the stain jitter's key
        x, y = preprocess(x, True, epoch, index), y.to(device, non_blocking=True)
        if policy.debug_nan_at_step == (epoch - 1) * n_batches + step:
            x = x * float("nan")
        sync = contextlib.nullcontext() if boundary or no_sync is None else no_sync()
        with sync:
            with policy.autocast(device):
                loss = criterion(model(x), y)
            window_bad |= ~torch.isfinite(loss.detach())
            update.scaler.scale(loss / window).backward()
        window_loss += loss.detach().float() * y.shape[0]
        window_n += y.shape[0]
        if not boundary:
            continue
        stop = state.stop_requested is not None and state.stop_requested()
        where = f"epoch {epoch}, step {step}"
        bad, stop, loss_sum = update.finish_window(model, window_bad, stop, where, window_loss)
        if bad:
            skipped += 1
            if state.nonfinite_skipped_before + skipped > policy.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at epoch {epoch}, step {step}: more skipped "
                    "steps than trainer.max_nonfinite_steps allows; the last good checkpoint "
                    "is kept."
                )
        else:
            kept_loss += loss_sum
            kept_n += window_n
        window_loss, window_n = torch.zeros((), device=device), 0
        window_bad = torch.zeros((), dtype=torch.bool, device=device)
        if policy.show_progress and kept_n:
            bar.set_postfix(loss=f"{kept_loss / kept_n:.4f}", refresh=False)
        if stop and step < n_batches - 1:
            bar.close()
            seconds = time.perf_counter() - start
            return EpochStats(kept_loss / max(kept_n, 1), kept_n, seconds, skipped, stopped=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return EpochStats(kept_loss / max(kept_n, 1), kept_n, time.perf_counter() - start, skipped)
