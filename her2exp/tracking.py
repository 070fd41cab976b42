"""MLflow, on rank 0 only, with the audit tags a reviewer needs to trust and repeat a run.

MLflow is imported lazily (it costs ~2 s), and never with `tracking=off` or on other ranks.
Git tags are set here rather than by MLflow, whose own git tag follows sys.argv[0] and records
no dirty flag.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parent.parent


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"trainer.lr": 0.001, ...}; lists kept as their string form."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def git_info(repo: Path = REPO_DIR) -> dict[str, str]:
    """Commit, branch and dirty flag of the repository the package is imported from."""

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": "unknown", "git_branch": "unknown", "git_dirty": "unknown"}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": commit,
        "git_branch": git("rev-parse", "--abbrev-ref", "HEAD") or "unknown",
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
    }


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment_tags(device: torch.device) -> dict[str, str]:
    tags = {
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "timm_version": _version("timm"),
        "hydra_version": _version("hydra-core"),
        "mlflow_version": _version("mlflow-skinny"),
        "cuda_version": str(torch.version.cuda),
        "cudnn_version": str(torch.backends.cudnn.version())
        if torch.cuda.is_available()
        else "none",
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine()),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
    }
    return tags


def resolve_uri(uri: str) -> str:
    """Make a relative `sqlite:///file.db` absolute against the current directory."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path.cwd() / uri[len(prefix) :])
    return uri


class Tracker:
    """No-op tracker: what non-zero ranks and `tracking=off` get."""

    run_id: str | None = None
    uri: str | None = None

    def start(self, cfg: DictConfig, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass

    def describe(self) -> str:
        return "MLflow tracking off"


class MlflowTracker(Tracker):
    """One MLflow run per training job."""

    def __init__(self, cfg: DictConfig) -> None:
        import mlflow  # lazy: ~2 s, and only rank 0 with tracking=mlflow pays it

        self.mlflow = mlflow
        self.cfg = cfg
        self.uri = resolve_uri(cfg.uri)
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        location = self.cfg.artifact_location
        if location is None and self.uri.startswith("sqlite:///"):
            location = (Path(self.uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(self.cfg.experiment, artifact_location=location)
        except self.mlflow.exceptions.MlflowException:
            exp = self.client.get_experiment_by_name(self.cfg.experiment)  # created concurrently
            if exp is None:
                raise
            return exp.experiment_id

    def start(self, cfg: DictConfig, tags: dict[str, str]) -> None:
        run = self.client.create_run(self._experiment_id(), run_name=self.cfg.run_name, tags=tags)
        self.run_id = run.info.run_id
        params = flatten(OmegaConf.to_container(cfg, resolve=True))
        entities = [self.mlflow.entities.Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(entities), 100):
            self.client.log_batch(self.run_id, params=entities[i : i + 100])

    def log_metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        import time

        ts = int(time.time() * 1000)
        batch = [
            self.mlflow.entities.Metric(k, float(v), ts, step or 0)
            for k, v in values.items()
            if v is not None and not (isinstance(v, float) and math.isnan(v))
        ]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def describe(self) -> str:
        return f"MLflow run {self.run_id} in {self.uri} (experiment {self.cfg.experiment!r})"


def build(cfg: DictConfig, is_main: bool) -> Tracker:
    if cfg.backend == "mlflow" and is_main:
        return MlflowTracker(cfg)
    return Tracker()


def run_tags(
    cfg: DictConfig,
    device: torch.device,
    world_size: int,
    backend: str | None,
    overrides: list[str],
    data_fingerprint: str,
) -> dict[str, str]:
    """The audit tags every run carries."""
    tags = {
        "seed": str(cfg.seed),
        "overrides": " ".join(overrides),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "world_size": str(world_size),
        "backend": backend or "none",
        "data_fingerprint": data_fingerprint,
        "model_name": cfg.model.name,
        "task_name": cfg.task_name,
        "deterministic": str(bool(cfg.trainer.deterministic)).lower(),
        **git_info(),
        **environment_tags(device),
        **{f"user.{k}": str(v) for k, v in (cfg.tags or {}).items()},
    }
    tags["mlflow.source.git.commit"] = tags["git_commit"]  # what the MLflow UI shows
    return tags
