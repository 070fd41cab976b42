"""The hot loop: one training epoch and one scoring pass. Pure over (model, loader, context):
no files, no MLflow, no metric formulas.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


class NonFiniteLossError(RuntimeError):
    """Training diverged; the last good checkpoint on disk is kept."""


@dataclass
class StepContext:
    """What the loop needs besides model and data, chosen once by the trainer."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    accumulation_steps: int = 1
    grad_clip_norm: float | None = None
    channels_last: bool = False
    show_progress: bool = False
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    # Stain pipeline applied on the device (stain.on_device=true); None: done in the workers.
    stain: Callable[..., torch.Tensor] | None = None
    epoch: int = 0
    # Polled after every optimizer step: true ends the epoch early (a pre-emption signal). Under
    # DDP the trainer's callable agrees across ranks, so every rank stops at the same step.
    should_stop: Callable[[], bool] | None = None
    on_nonfinite: str = "stop"  # stop | skip (trainer.on_nonfinite)
    nonfinite_budget: int = 0  # skipped steps still allowed in this run
    debug_nan_at_step: int | None = None  # global batch index whose inputs become NaN

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def to_device(
        self, x: torch.Tensor, y: torch.Tensor, train: bool = False, key: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 batch -> device -> (stain on device) -> float, normalised by mean/std."""
        x = x.to(self.device, non_blocking=True)
        if self.stain is not None:
            x = self.stain(x, train, self.epoch, key)
        if x.dtype == torch.uint8:
            mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1) * 255.0
            x = (x.float() - mean) / std
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt), y.to(self.device, non_blocking=True)


@dataclass
class EpochStats:
    loss: float
    samples: int
    seconds: float
    nonfinite_steps: int = 0  # optimizer steps skipped (trainer.on_nonfinite=skip)
    stopped: bool = False  # ended early by ctx.should_stop

    @property
    def images_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan


def _grad_norm(model: nn.Module, clip: float | None) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    if not params:
        return torch.zeros(())
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in params])
    )


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: StepContext,
    epoch: int,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> EpochStats:
    """One pass over `loader` with gradient accumulation.

    Each micro-batch loss is divided by the size of its accumulation window; the last window of
    the epoch may be shorter and is divided by its own size, so every optimizer step averages
    the gradients it saw. Gradients are unscaled before clipping. The running loss in the bar
    and the returned loss are sample-weighted means (over the steps that were kept).

    Non-finite values: with `on_nonfinite=stop` a NaN/inf loss or gradient norm raises
    NonFiniteLossError before the weights change. With `skip` the whole optimizer step is
    dropped: the backward still runs (under DDP the averaged gradient is then non-finite on
    every rank, so all ranks skip the same step without an extra collective), the gradients are
    zeroed and the BatchNorm buffers that the bad forward updated are restored. With an fp16
    GradScaler, infinite gradients are the scaler's own business (it skips and rescales).
    """
    model.train()
    n_batches = len(loader)
    k = ctx.accumulation_steps
    total_loss, total_n, skipped = 0.0, 0, 0
    window_loss, window_n, window_bad = 0.0, 0, False
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    saved: list[torch.Tensor] = []
    skip_mode = ctx.on_nonfinite == "skip"
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not ctx.show_progress)
    for step, (x, y, *_) in enumerate(bar):
        x, y = ctx.to_device(x, y, train=True, key=step)
        if ctx.debug_nan_at_step == (epoch - 1) * n_batches + step:
            x = x * float("nan")
        window_start = (step // k) * k
        window = min(k, n_batches - window_start)
        boundary = step - window_start == window - 1
        if skip_mode and step == window_start:
            saved = [b.detach().clone() for b in buffers]
        sync = contextlib.nullcontext() if boundary or no_sync is None else no_sync()
        with sync:
            with ctx.autocast():
                logits = model(x)
                loss = criterion(logits, y)
            if not torch.isfinite(loss):
                if not skip_mode:
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step}; "
                        "the last good checkpoint is kept. Lower trainer.lr, check the data, "
                        "or set trainer.on_nonfinite=skip."
                    )
                window_bad = True
            ctx.scaler.scale(loss / window).backward()
        n = y.shape[0]
        window_loss += loss.detach().item() * n
        window_n += n
        if not boundary:
            continue
        if ctx.scaler.is_enabled() and (ctx.grad_clip_norm is not None):
            ctx.scaler.unscale_(optimizer)
        norm = None
        if ctx.grad_clip_norm is not None or not ctx.scaler.is_enabled():
            norm = _grad_norm(model, ctx.grad_clip_norm)
        bad = window_bad or (
            norm is not None and not ctx.scaler.is_enabled() and not torch.isfinite(norm)
        )
        if bad and not skip_mode:
            raise NonFiniteLossError(
                f"non-finite gradient norm ({float(norm)}) at epoch {epoch}, step {step}; the "
                "last good checkpoint is kept. Lower trainer.lr, check the data, or set "
                "trainer.on_nonfinite=skip."
            )
        if bad:
            skipped += 1
            with torch.no_grad():
                for b, old in zip(buffers, saved, strict=True):
                    b.copy_(old)
            if skipped > ctx.nonfinite_budget:
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at epoch {epoch}, step {step}: more skipped "
                    f"steps than trainer.max_nonfinite_steps allows; the last good checkpoint "
                    "is kept."
                )
        else:
            ctx.scaler.step(optimizer)
            ctx.scaler.update()
            total_loss += window_loss
            total_n += window_n
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()  # also after a skipped step: the schedule stays aligned with epochs
        window_loss, window_n, window_bad = 0.0, 0, False
        if ctx.show_progress and total_n:
            bar.set_postfix(loss=f"{total_loss / total_n:.4f}", refresh=False)
        if step < n_batches - 1 and ctx.should_stop is not None and ctx.should_stop():
            bar.close()
            return EpochStats(total_loss / max(total_n, 1), total_n,
                              time.perf_counter() - start, skipped, stopped=True)  # fmt: skip
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    return EpochStats(total_loss / max(total_n, 1), total_n, time.perf_counter() - start, skipped)


@dataclass
class Scores:
    """HER2+ probabilities and labels in loader order, plus the summed loss and count."""

    probs: np.ndarray
    labels: np.ndarray
    loss_sum: float
    n: int

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n if self.n else math.nan


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: torch.utils.data.DataLoader, criterion: nn.Module, ctx: StepContext
) -> Scores:
    """Score every sample once, in loader order (the loader must not shuffle)."""
    model.eval()
    probs, labels = [], []
    total_loss, total_n = 0.0, 0
    for step, (x, y, *_) in enumerate(loader):
        x, y = ctx.to_device(x, y, train=False, key=step)
        with ctx.autocast():
            logits = model(x)
        logits = logits.float()
        total_loss += criterion(logits, y).item() * y.shape[0]
        total_n += y.shape[0]
        probs.append(torch.softmax(logits, dim=1)[:, 1].cpu())
        labels.append(y.cpu())
    return Scores(
        probs=torch.cat(probs).numpy().astype(np.float64) if probs else np.zeros(0),
        labels=torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64),
        loss_sum=total_loss,
        n=total_n,
    )
