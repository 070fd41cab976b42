"""The run's checkpoints: `last.pt` (everything a resume needs) and `best.pt` (the best weights),
written by rank 0 in an order that a kill between the two writes cannot mispair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from her2exp.core import checkpoint
from her2exp.runtime.rundir import BEST, RunDir


class Checkpointer:
    """`last.pt` (everything a resume needs) and `best.pt` (the best weights), written by rank 0.

    `last.pt` is written before `best.pt`, and a resume takes the best weights from `last.pt`
    when the best epoch is its own epoch, else from `best.pt`, which must say it is that epoch:
    a process killed between the two writes never pairs a counter with the wrong weights.
    """

    def __init__(self, run: RunDir, enabled: bool, is_main: bool, extra: dict[str, Any]):
        self.run, self.enabled, self.is_main = run, enabled, is_main
        self.extra = extra  # model name, resolved config, data fingerprint: in every file

    @property
    def last(self) -> Path:
        return self.run.last

    @property
    def best(self) -> Path:
        return self.run.best

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
            beside = path.with_name(BEST)  # the best.pt beside the last.pt resumed from
            best_file = checkpoint.load(beside, mmap=True)
            if int(best_file["epoch"]) != best_epoch:
                raise RuntimeError(
                    f"{beside} holds epoch {best_file['epoch']} but {path} "
                    f"says the best epoch is {best_epoch}; resume from a consistent pair"
                )
            best = best_file["model"]
        return state, best
