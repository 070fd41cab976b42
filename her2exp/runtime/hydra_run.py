"""What Hydra knows about the running command: its overrides, its mode, its job and folders.

Read from Hydra's runtime config (set by `@hydra.main`) once, at the command's entry
(`HydraRun.current()` in cli/train.py and cli/eval.py, the commands whose runs record their
command line), into a frozen `HydraRun` that is passed down: the run's tracker tags and sweep
tags, its resume command, its model card and the sweep default of `evaluation.explain` read
that, never HydraConfig. A caller that hands none (tests, notebooks, her2exp-rerun, whose run
records the original's overrides) gets `HydraRun()`. This module is the one place that imports
HydraConfig (tests/runtime/test_rundir.py holds it). Here, below `tracking`, `training` and
`reports`, so all of them can take it.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class HydraRun:
    """The command's Hydra facts. `HydraRun()` is a command composed without @hydra.main (tests,
    notebooks, workers spawned by trainer.nproc_per_node before they were handed one, a rerun)."""

    overrides: tuple[str, ...] = ()  # the command line's task overrides
    multirun: bool = False
    job_name: str = ""
    job_num: int | None = None  # a multirun's job number
    output_dir: str | None = None  # hydra.runtime.output_dir: the run directory
    sweep_dir: str | None = None  # a multirun's hydra.sweep.dir

    @classmethod
    def current(cls) -> HydraRun:
        """Hydra's runtime config now; `HydraRun()` when there is none."""
        try:
            hc = HydraConfig.get()
        except ValueError:
            return cls()
        from hydra.types import RunMode

        multirun = hc.mode == RunMode.MULTIRUN
        return cls(
            overrides=tuple(hc.overrides.task),
            multirun=multirun,
            job_name=str(hc.job.name or ""),
            job_num=int(hc.job.num) if multirun and hc.job.num is not None else None,
            output_dir=_output_dir(hc),
            sweep_dir=str(hc.sweep.dir) if multirun else None,
        )

    def sweep_context(self) -> dict[str, str]:
        """A multirun job's place in its sweep (tracking.sweep_context's keys); {} otherwise."""
        if not self.multirun:
            return {}
        ctx = {"job_overrides": " ".join(self.overrides), "sweep_dir": str(self.sweep_dir)}
        if self.job_num is not None:
            ctx["job_num"] = str(self.job_num)
        return ctx


def _output_dir(hc: DictConfig) -> str | None:
    """hydra.runtime.output_dir, None where Hydra has not set it (a config shown by --cfg, or
    composed without a run: the field is still mandatory-missing there)."""
    value = OmegaConf.select(hc, "runtime.output_dir", default=None, throw_on_missing=False)
    return None if value is None else str(value)
