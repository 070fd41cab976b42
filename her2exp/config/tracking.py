"""The commands over MLflow: `her2exp-compare`, `-server`, `-sync`, `-rerun` and `-promote`;
their schemas and the checks of their values (the store itself is read by the command).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from her2exp.config.common import UriConfig
from her2exp.config.fields import check_ranges, option, ranged, refuse
from her2exp.config.model_uri import ALIAS_RE
from her2exp.core.errors import ConfigError
from her2exp.core.fileio import check_writable


# -- her2exp-compare -----------------------------------------------------------------------------
@dataclass
class CompareTracking(UriConfig):
    """`tracking.*` of her2exp-compare: the store and the experiment whose runs are compared
    (the key training logs its runs under; `experiment=` is train's bundle of overrides)."""

    experiment: str = option("her2exp", help="the MLflow experiment whose runs are compared")


@dataclass
class CompareCommand:
    """`her2exp-compare`: the runs of an experiment or a sweep, best first."""

    sweep: str = option("latest", help="latest | all | <parent run id>: the runs compared")
    out: str = option("compare.csv", help="the table's CSV file")
    tracking: CompareTracking = field(default_factory=lambda: CompareTracking())
    leaderboard: bool = option(
        False, help="the sweep parent's backbone x protocol leaderboard instead"
    )


def check_compare(cfg: Any) -> None:
    if not cfg.tracking.uri:
        refuse("tracking.uri", cfg.tracking.uri, "an MLflow tracking URI")
    check_writable(cfg.out, "out")  # the table is written after the store is read


_PORT = "a TCP port (1-65535; pg_port 0: a free one)"


# -- her2exp-server ------------------------------------------------------------------------------
@dataclass
class ServerCommand:
    """`her2exp-server`: an MLflow tracking server on PostgreSQL (a private cluster in `out`)."""

    out: str = option(
        ".mlflow-server",
        help="the server's folder (its private PostgreSQL cluster, artifacts, logs)",
    )
    backend_store_uri: str | None = option(
        None, help="an existing database; null: a private PostgreSQL in out"
    )
    artifacts_destination: str | None = option(
        None, help="where artifacts are stored; null: <out>/artifacts"
    )
    host: str = option("127.0.0.1", help="the address the server listens on")
    port: int = ranged(5000, ge=1, le=65535, allowed=_PORT, help="the server's TCP port")
    pg_port: int = ranged(
        0, ge=0, le=65535, allowed=_PORT, help="the private PostgreSQL's port; 0: a free one"
    )
    processes: int = ranged(1, ge=1, help="server worker processes")


def check_server(cfg: Any) -> None:
    check_ranges(cfg, ServerCommand)


# -- her2exp-sync --------------------------------------------------------------------------------
@dataclass
class SyncCommand:
    """`her2exp-sync`: replay the MLflow calls a run deferred while its server was away."""

    input: str | None = option(None, help="the run directory whose queued MLflow calls are sent")
    tracking: UriConfig = field(default_factory=lambda: UriConfig(uri=None))


def check_sync(cfg: Any) -> None:
    if not cfg.input:
        raise ConfigError("input=<run directory> is required")
    if not Path(cfg.input).is_dir():
        raise ConfigError(f"input={cfg.input} is not a folder")


# -- her2exp-rerun -------------------------------------------------------------------------------
@dataclass
class RerunCommand:
    """`her2exp-rerun`: train a logged run again from what MLflow holds."""

    run_id: str | None = option(None, help="the MLflow run to train again")
    out: str | None = option(
        None, help="the new run's directory; null: outputs/rerun/<run id>/<time>"
    )
    tracking: UriConfig = field(default_factory=UriConfig)


def check_rerun(cfg: Any) -> None:
    if not cfg.run_id:
        raise ConfigError("run_id=<MLflow run id> is required")


_VERSION = "a version number >= 1"


# -- her2exp-promote ----------------------------------------------------------------------------
@dataclass
class PromoteCommand:
    """`her2exp-promote`: a registered model's alias set to a version that passed its checklist."""

    name: str | None = option(
        None, help="the registered model (tracking.registered_model_name of training)"
    )
    # null is the unset default, refused by check_promote with the same words: the range names
    # what a version is (a message must not offer null, which is refused too).
    version: int | None = ranged(
        None, ge=1, allowed=_VERSION, help="the registered model's version to promote"
    )
    alias: str = option("champion", help="the alias set to that version")
    force: bool = option(
        False, help="promote a version that fails its checklist (recorded on the version)"
    )
    reason: str | None = option(None, help="why, with force=true (tag her2exp.force_reason)")
    tracking: UriConfig = field(default_factory=UriConfig)


def check_promote(cfg: Any) -> None:
    """Values only (the registry is read by the command): name, version and an alias MLflow
    accepts (letters, digits, _ and -)."""
    check_ranges(cfg, PromoteCommand)
    if not cfg.name:
        raise ConfigError("name=<registered model name> is required")
    if cfg.version is None:
        raise ConfigError(f"version is required ({_VERSION}, e.g. version=3)")
    if not ALIAS_RE.match(str(cfg.alias)):
        refuse("alias", cfg.alias, "letters, digits, _ and - (e.g. champion)")
    if not cfg.tracking.uri:
        refuse("tracking.uri", cfg.tracking.uri, "an MLflow tracking URI")
