"""Reaching the tracking store: its URI, whether it answers, which errors pass, retrying them.

`require_store` checks a store before MLflow opens it: MLflow would create a missing SQLite file
(also on a mere look-up), retry an unwritable one for ~2 minutes, and answer a file that is not a
database with a SQLAlchemy traceback that does not name it.
No MLflow import at module level (it costs ~2 s): `experiment_id` imports it when called.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig

from her2exp.config import ConfigError
from her2exp.tracking.base import TrackingUnavailable
from her2exp.tracking.schema import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

log = logging.getLogger(__name__)

T = TypeVar("T")

SQLITE = "sqlite:///"
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


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


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (made absolute), None for other stores."""
    uri = resolve_uri(uri)
    if not uri.startswith(SQLITE):
        return None
    path = uri[len(SQLITE) :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def _sqlite_problem(path: Path, lookup: bool) -> str | None:
    """Why MLflow could not use (or, for a look-up, should not open) the database at `path`."""
    if path.exists():
        if not path.is_file():
            return f"{path} is not a file"
        try:
            with open(path, "rb") as fh:
                head = fh.read(len(SQLITE_MAGIC))
        except OSError as exc:
            return f"{path} cannot be read ({exc.strerror})"
        if head and not SQLITE_MAGIC.startswith(head):  # a prefix: being created right now
            return f"{path} is not an SQLite database (it starts with {head[:8]!r})"
        if head == SQLITE_MAGIC and not _has_mlflow_tables(path):
            return f"{path} is an SQLite database without MLflow's tables (another program's?)"
    elif lookup:
        return f"{path} does not exist (a look-up creates no database: check the path)"
    if lookup:
        return None
    return _unwritable(path)


def _has_mlflow_tables(path: Path) -> bool:
    """True for an MLflow database, or one without any table yet (MLflow creates them; another
    job may be doing so right now, or hold the write lock: MLflow retries those)."""
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=2.0)
        try:
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.OperationalError:  # locked or busy
        return True
    except sqlite3.Error:
        return False
    return not names or bool(names & {"experiments", "alembic_version"})


def _unwritable(path: Path) -> str | None:
    """Why SQLite could not write `path` (its journal goes beside it), tried without a trace:
    os.access says yes to root everywhere, even in /proc."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # MLflow creates the missing folders
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
        if path.exists():
            with open(path, "r+b"):
                pass
    except OSError as exc:
        return f"cannot create a file in {folder} ({exc.strerror})"
    return None


def store_problem(uri: str, lookup: bool = False, timeout_s: float = 5.0) -> str | None:
    """None when the store at `uri` can be used, else why not (a clause that follows the URI).

    `lookup`: only reading runs that must be there (her2exp-eval run_id=..., compare, rerun), so
    a missing SQLite file is refused instead of created; otherwise the file and its folder must
    be writable. Nothing is created either way."""
    if uri.startswith(("http://", "https://")):
        problem = check_reachable(uri, timeout_s)
        return None if problem is None else f"cannot be reached ({problem})"
    path = sqlite_file(uri)
    problem = None if path is None else _sqlite_problem(path, lookup)
    return None if problem is None else f"cannot be used: {problem}"


def require_store(uri: str, lookup: bool = False) -> str:
    """The resolved `uri`, or TrackingUnavailable naming `tracking.uri` (see `store_problem`)."""
    problem = store_problem(uri, lookup)
    if problem is not None:
        raise TrackingUnavailable(f"tracking.uri={uri} {problem}")
    return resolve_uri(uri)


@contextmanager
def _creation_lock(db: Path) -> Iterator[None]:
    """An exclusive inter-process lock on `<db>.lock` beside the database (fcntl.flock), the
    lock file removed again on the way out: a store's folder keeps only what MLflow puts there.
    A waiter whose lock file was removed meanwhile locks the new one (inode checked)."""
    lock = db.with_name(db.name + ".lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)  # the holder removed that file on release: lock the one there now
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        finally:
            os.close(fd)  # releases the flock


def open_store(uri: str) -> Any:
    """An MlflowClient of the store at `uri` for writing. A SQLite store is opened (and, when it
    is new, created and migrated by MLflow) under an inter-process lock beside the database:
    two jobs started together on a store that is not there yet would otherwise both create its
    schema, and the second die on `table ... already exists`. MLflow keeps the opened store for
    the process, so later clients of `uri` find it ready."""
    import mlflow

    uri = resolve_uri(uri)
    db = sqlite_file(uri)
    if db is None:
        return mlflow.MlflowClient(tracking_uri=uri)
    db.parent.mkdir(parents=True, exist_ok=True)  # as MLflow would
    with _creation_lock(db):
        return mlflow.MlflowClient(tracking_uri=uri)  # opens the store: schema made, checked


def download_from_run(
    uri: str, run_id: str, artifact: str, folder: str, missing: str
) -> tuple[Any, str]:
    """(the MLflow run `run_id`, its `artifact` downloaded into `folder`). A store that is not there is
    refused (never created), an unknown run or a missing artifact is one ConfigError line
    (`missing`: what the artifact's absence means)."""
    resolved = require_store(uri, lookup=True)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=resolved)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"run_id={run_id!r} not found in {uri}") from exc
    try:
        return run, client.download_artifacts(run_id, artifact, folder)
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        raise ConfigError(
            f"run_id={run_id!r} has no {artifact} artifact in {uri} ({missing})"
        ) from exc


def add_to_run(
    uri: str,
    run_id: str,
    artifact: Path,
    artifact_path: str,
    metrics: dict[str, float],
    tags: dict[str, str],
) -> None:
    """Add one file (as `artifact_path/<its name>`), metrics (step 0) and tags to an existing,
    possibly finished run: a finished run takes new entries only through the client, not
    through a tracker (which would open a run). Here so that MLflow is called from tracking/
    alone (her2exp-export adds its graph to the training run this way)."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    client = mlflow.MlflowClient(tracking_uri=require_store(uri, lookup=True))
    with_retries(client.log_artifact, run_id, str(artifact), artifact_path)
    now = int(time.time() * 1000)
    with_retries(
        client.log_batch,
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )


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
    Either way the experiment is marked a model-training one (`ensure_experiment_kind`), or
    MLflow's UI opens it in its GenAI view (traces, prompts), where no run's curves are.
    """
    import mlflow

    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        ensure_experiment_kind(client, exp)
        return exp.experiment_id
    location = cfg.get("artifact_location")
    if location is None and uri.startswith(SQLITE):
        location = (Path(uri[len(SQLITE) :]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(
            cfg.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except mlflow.exceptions.MlflowException:
        exp = client.get_experiment_by_name(cfg.experiment)  # created concurrently
        if exp is None:
            raise
        ensure_experiment_kind(client, exp)
        return exp.experiment_id


def ensure_experiment_kind(client: Any, experiment: Any) -> None:
    """Tag an experiment made before her2exp set its kind (or by hand) as a model-training one.

    A kind already set, by her2exp or a user, is left as it is: the user may want another view.
    A store that refuses the tag costs the UI's default view only, never the run: warned.
    """
    import mlflow

    if EXPERIMENT_KIND_TAG in (experiment.tags or {}):
        return
    try:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException as exc:
        log.warning("experiment %r: could not set its kind (%s)", experiment.name, exc)
