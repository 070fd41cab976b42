"""Reaching the tracking store: its URI, whether it answers, which errors pass, retrying them.

No MLflow import at module level (it costs ~2 s): `experiment_id` imports it when called.
"""

from __future__ import annotations

import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

SQLITE = "sqlite:///"


def resolve_uri(uri: str) -> str:
    """Make a relative `sqlite:///file.db` absolute against the current directory."""
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        return SQLITE + str(Path.cwd() / uri[len(SQLITE) :])
    return uri


def check_reachable(uri: str, timeout_s: float = 5.0) -> str | None:
    """None when an http(s) tracking server answers its /health endpoint, else why not.

    A file or database store is always "reachable": its errors are MLflow's to report."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


#: Messages of store errors that go away on their own: SQLite's writer lock, PostgreSQL's
#: deadlock and serialisation failures, an overloaded or restarting server (HTTP 429/5xx, which
#: MLflow's HTTP client retries first: MLFLOW_HTTP_REQUEST_MAX_RETRIES), and MLflow's
#: read-then-insert of rows that concurrent jobs share (the sweep's dataset: seen as
#: `UniqueViolation ... "dataset_pk"` with 2 jobs on PostgreSQL), which a retry finds in place.
TRANSIENT = (
    "database is locked",
    "deadlock detected",
    "could not serialize",
    "temporarily unavailable",
    "too many requests",
    " 429",
    " 502",
    " 503",
    " 504",
    "duplicate key value violates unique constraint",
    "unique constraint failed",
)
#: Back-off jitter from its own generator: the global `random` state is the run's, seeded and
#: checkpointed for exact resume.
_JITTER = random.Random()


def is_transient(exc: BaseException) -> bool:
    """Whether a tracking error is worth retrying (not a wrong value or a missing server)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(marker in text for marker in TRANSIENT)


def with_retries(
    fn: Callable[..., T], *args: Any, attempts: int = 5, base_delay_s: float = 0.2, **kwargs: Any
) -> T:
    """Call fn, retrying transient store errors with exponential back-off and jitter.

    Concurrent sweep jobs share one store: a job that meets another's SQLite write lock or a
    PostgreSQL serialisation failure waits 0.2, 0.4, 0.8, 1.6 s (+ up to 50% jitter) and tries
    again; any other error, or the last attempt's, is raised to the caller. (MLflow's own HTTP
    retries cover only the transport; a direct SQLite/PostgreSQL store has none.)
    """
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            delay = base_delay_s * 2**attempt * (1.0 + 0.5 * _JITTER.random())
            log.warning(
                "MLflow call failed transiently (%s); retry %d/%d in %.1f s",
                exc,
                attempt + 1,
                attempts - 1,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def experiment_id(client: Any, cfg: DictConfig, uri: str) -> str:
    """Get or create `cfg.experiment`; a SQLite store keeps its artifacts beside the database.

    Not `mlflow.set_experiment`: that sets process-global state and takes no artifact location.
    """
    import mlflow

    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location = cfg.get("artifact_location")
    if location is None and uri.startswith(SQLITE):
        location = (Path(uri[len(SQLITE) :]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(cfg.experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        exp = client.get_experiment_by_name(cfg.experiment)  # created concurrently
        if exp is None:
            raise
        return exp.experiment_id
