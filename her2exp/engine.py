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

    @property
    def images_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan


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
    and the returned loss are sample-weighted means.
    """
    model.train()
    n_batches = len(loader)
    k = ctx.accumulation_steps
    total_loss, total_n = 0.0, 0
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not ctx.show_progress)
    for step, (x, y, *_) in enumerate(bar):
        x, y = ctx.to_device(x, y, train=True, key=step)
        window_start = (step // k) * k
        window = min(k, n_batches - window_start)
        boundary = step - window_start == window - 1
        sync = contextlib.nullcontext() if boundary or no_sync is None else no_sync()
        with sync:
            with ctx.autocast():
                logits = model(x)
                loss = criterion(logits, y)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step}; "
                    "the last good checkpoint is kept. Lower trainer.lr or check the data."
                )
            ctx.scaler.scale(loss / window).backward()
        if boundary:
            if ctx.grad_clip_norm is not None:
                ctx.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip_norm)
            ctx.scaler.step(optimizer)
            ctx.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        n = y.shape[0]
        total_loss += loss.detach().item() * n
        total_n += n
        if ctx.show_progress:
            bar.set_postfix(loss=f"{total_loss / total_n:.4f}", refresh=False)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    return EpochStats(total_loss / max(total_n, 1), total_n, time.perf_counter() - start)


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
