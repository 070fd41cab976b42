"""The commands over MLflow: `her2exp-compare`, `-server`, `-sync`, `-rerun` and `-promote`;
their schemas and the checks of their values (the store itself is read by the command).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from her2exp.config.common import UriConfig
from her2exp.config.fields import check_ranges, ranged, refuse
from her2exp.config.model_uri import ALIAS_RE
from her2exp.core.errors import ConfigError
from her2exp.core.fileio import check_writable


# -- her2exp-compare -----------------------------------------------------------------------------
@dataclass
class CompareCommand:
    """`her2exp-compare`: the runs of an experiment or a sweep, best first."""

    experiment: str = "her2exp"
    sweep: str = "latest"  # latest | all | <parent run id>
    out: str = "compare.csv"
    tracking: UriConfig = field(default_factory=UriConfig)
    leaderboard: bool = False  # the sweep parent's backbone x protocol leaderboard instead


def check_compare(cfg: Any) -> None:
    if not cfg.tracking.uri:
        refuse("tracking.uri", cfg.tracking.uri, "an MLflow tracking URI")
    check_writable(cfg.out, "out")  # the table is written after the store is read


_PORT = "a TCP port (1-65535; pg_port 0: a free one)"


# -- her2exp-server ------------------------------------------------------------------------------
@dataclass
class ServerCommand:
    """`her2exp-server`: an MLflow tracking server on PostgreSQL (a private cluster in `dir`)."""

    dir: str = ".mlflow-server"
    backend_store_uri: str | None = None  # an existing database; null: private PostgreSQL
    artifacts_destination: str | None = None  # null: <dir>/artifacts
    host: str = "127.0.0.1"
    port: int = ranged(5000, ge=1, le=65535, allowed=_PORT)
    pg_port: int = ranged(0, ge=0, le=65535, allowed=_PORT)  # 0: a free port
    workers: int = ranged(1, ge=1)


def check_server(cfg: Any) -> None:
    check_ranges(cfg, ServerCommand)


# -- her2exp-sync --------------------------------------------------------------------------------
@dataclass
class SyncCommand:
    """`her2exp-sync`: replay the MLflow calls a run deferred while its server was away."""

    run_dir: str | None = None
    tracking: UriConfig = field(default_factory=lambda: UriConfig(uri=None))  # null: the run's


def check_sync(cfg: Any) -> None:
    if not cfg.run_dir:
        raise ConfigError("run_dir=<run directory> is required")
    if not Path(cfg.run_dir).is_dir():
        raise ConfigError(f"run_dir={cfg.run_dir} is not a folder")


# -- her2exp-rerun -------------------------------------------------------------------------------
@dataclass
class RerunCommand:
    """`her2exp-rerun`: train a logged run again from what MLflow holds."""

    run_id: str | None = None
    output_dir: str | None = None  # null: outputs/rerun/<run id>/<time>
    tracking: UriConfig = field(default_factory=UriConfig)


def check_rerun(cfg: Any) -> None:
    if not cfg.run_id:
        raise ConfigError("run_id=<MLflow run id> is required")


# -- her2exp-promote ----------------------------------------------------------------------------
@dataclass
class PromoteCommand:
    """`her2exp-promote`: a registered model's alias set to a version that passed its checklist."""

    name: str | None = None  # the registered model (tracking.registered_model_name of training)
    version: int | None = ranged(None, ge=1)
    alias: str = "champion"
    force: bool = False  # promote a version that fails its checklist (recorded on the version)
    reason: str | None = None  # why, with force=true (tag her2exp.force_reason)
    tracking: UriConfig = field(default_factory=UriConfig)


def check_promote(cfg: Any) -> None:
    """Values only (the registry is read by the command): name, version and an alias MLflow
    accepts (letters, digits, _ and -)."""
    check_ranges(cfg, PromoteCommand)
    if not cfg.name:
        raise ConfigError("name=<registered model name> is required")
    if cfg.version is None:
        raise ConfigError("version=<the version number to promote> is required")
    if not ALIAS_RE.match(str(cfg.alias)):
        refuse("alias", cfg.alias, "letters, digits, _ and - (e.g. champion)")
    if not cfg.tracking.uri:
        refuse("tracking.uri", cfg.tracking.uri, "an MLflow tracking URI")
