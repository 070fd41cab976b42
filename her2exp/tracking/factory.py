"""Which tracker a process gets. Apart from base.py so that the interface the other tracking
modules build on never imports `MlflowTracker` (it is one of them: base <- mlflow_tracker)."""

from __future__ import annotations

from omegaconf import DictConfig

from her2exp.tracking.base import Tracker
from her2exp.tracking.mlflow_tracker import MlflowTracker


def build(cfg: DictConfig, is_main: bool) -> Tracker:
    """The tracker for this process: MLflow on the main rank when configured, else a no-op.
    (mlflow itself is imported only when an MlflowTracker is made.)"""
    if cfg.backend == "mlflow" and is_main:
        return MlflowTracker(cfg)
    return Tracker()
