"""The optimizer and its schedule, built once per run: AdamW over timm's parameter groups, linear
warmup then cosine. The trainer steps them only through `engine.OptimizerUpdate`.
"""

from __future__ import annotations

import functools
import math

import torch
from omegaconf import DictConfig
from torch import nn


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
