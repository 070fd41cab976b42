"""The tracker interface the trainer talks to, and the no-op tracker behind `tracking=off`.

`tracking.factory.build` picks the implementation; only rank 0 with `tracking.backend=mlflow`
imports MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from her2exp.config import ConfigError
from her2exp.runtime.hydra_run import HydraRun


class TrackingUnavailable(ConfigError, RuntimeError):
    """The tracking store cannot be reached or used when a command starts (before any work): a
    user's mistake, so every command reports it in one `her2exp: ...` line (exit 2)."""


class Tracker:
    """No-op tracker: what non-zero ranks and `tracking=off` get. The interface of all trackers.

    Every method must return without raising: tracking never kills a training run.
    """

    run_id: str | None = None
    uri: str | None = None

    def start(
        self,
        cfg: DictConfig,
        tags: dict[str, str],
        run_dir: Path | None = None,
        continue_run: bool = False,
        hydra: HydraRun | None = None,
    ) -> None:
        """Open the run (`continue_run`: the one `run_dir` recorded, if any); `hydra`: the
        command's Hydra facts, read at its entry (its sweep and job; None: none)."""

    def log_history(self, rows: list[dict[str, float]]) -> None:
        """Per-epoch rows (each with an "epoch" key): the step of each row is its epoch."""
        for row in rows:
            self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, int(row["epoch"]))

    def log_metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        """Metrics at `step` (an epoch; None for final metrics); NaN and None are dropped."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or a folder, under `artifact_path` in the run's artifacts."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Run tags (values as strings)."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Text as an artifact file (audit/pip_freeze.txt, ...)."""

    def log_dataset(self, manifest: Any, name: str, digest: str, counts: dict) -> None:
        """The data as a dataset input: its manifest, fingerprint and per-split class counts."""

    def log_model(self, spec: dict[str, Any]) -> None:
        """The trained model as an MLflow pyfunc from code (`serving.model_spec`: the code
        file, artifacts, signature, input example, metadata with its thresholds)."""

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with `status` (FINISHED, FAILED, KILLED)."""

    @property
    def errors(self) -> list[str]:
        """Tracking calls that failed for another reason than an absent server."""
        return []

    @property
    def deferred_note(self) -> str | None:
        """One line on calls still waiting for an absent server, None when nothing waits."""
        return None

    def describe(self) -> str:
        """Where the run goes, for the log."""
        return "MLflow tracking off"
