"""Early stopping on validation AUC: the best epoch, its threshold and the patience counter,
with the state `last.pt` keeps so a resumed run stops where an uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Any


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
