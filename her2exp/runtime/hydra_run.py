"""What Hydra knows about the running command: its command-line overrides.

Read from Hydra's runtime config (set by `@hydra.main`); the run's tracker, its resume command
and its model card record them. Here, below `training` and `reports`, so both can ask.
"""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig


def hydra_overrides() -> list[str]:
    """The command line's overrides (empty when composed without @hydra.main: tests, notebooks)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []
