"""timm model construction with early, readable errors."""

from __future__ import annotations

import timm
import torch
from omegaconf import DictConfig

from her2exp.config import ConfigError, close_matches


def check_model_name(name: str) -> None:
    """Fail before training on a name timm does not know, suggesting what the user likely meant."""
    if name.startswith(("hf-hub:", "hf_hub:")):
        return
    available = timm.list_models()
    if name not in available:
        hints = close_matches(name, available)
        hint = f"; did you mean: {', '.join(hints)}" if hints else ""
        raise ConfigError(f"model.name={name!r} is not a timm model (see timm.list_models()){hint}")


def build(cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    """Create the classifier; `pretrained=false` by default so nothing downloads."""
    check_model_name(cfg.name)
    model = timm.create_model(
        cfg.name, pretrained=cfg.pretrained, num_classes=cfg.num_classes, drop_rate=cfg.drop_rate
    )
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def maybe_compile(model: torch.nn.Module, cfg: DictConfig) -> torch.nn.Module:
    """torch.compile when asked; the uncompiled module is kept for checkpoints."""
    if cfg.compile:
        return torch.compile(
            model,
            backend=cfg.compile_backend,
            mode=None if cfg.compile_backend != "inductor" else cfg.compile_mode,
        )
    return model
