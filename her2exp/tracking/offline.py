"""Tracking calls that could not reach the server: buffered in the run directory, replayed later.

A run whose server goes away keeps training; its calls are appended, in order, to
`<run_dir>/mlflow_buffer.jsonl` (one JSON record per call) and replayed by the run itself as soon
as the server answers, or afterwards by `her2exp-sync input=<run_dir>`. `<run_dir>/mlflow_run.json`
records the run id and URI, so a resumed attempt continues the same run.

What `her2exp-sync` trusts: the run directory's own files. A deferred model
(`mlflow_model_deferred/`: a pyfunc from code, whose code file runs when the model is loaded)
is logged as it was saved, so sync only run directories you or your colleagues wrote; a queued
upload of a path outside the run directory (resolved, symlinks too) is refused
before anything is sent.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from her2exp.core.fileio import UnsafePath, atomic_write_text, inside
from her2exp.runtime import rundir
from her2exp.runtime.rundir import RunDir
from her2exp.tracking.base import TrackingUnavailable
from her2exp.tracking.store import check_reachable, store_problem

log = logging.getLogger(__name__)

# The run directory's names for them (her2exp/runtime/rundir.py: the run directory's layout).
RUN_FILE = rundir.MLFLOW_RUN  # run id + tracking URI, so a resumed attempt continues the run
BUFFER_FILE = rundir.MLFLOW_BUFFER  # calls deferred while the server was unreachable
MODEL_DIR = rundir.MLFLOW_MODEL_DEFERRED  # the MLflow model, saved when it could not be logged
#: MLflow's limit of metrics in one log_batch request.
METRICS_PER_BATCH = 500

Record = dict[str, Any]


class DeferredLog:
    """Tracking calls that could not reach the server, in order, as JSON lines in the run
    directory. Appends are fsynced; a line torn by a kill is ignored on reading."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: Record) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def records(self) -> list[Record]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the last line of an append cut short by a kill
        return out

    def rewrite(self, records: list[Record]) -> None:
        """Keep only `records` (the unsent rest); atomically, so a kill loses nothing."""
        if not records:
            self.path.unlink(missing_ok=True)
            return
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))


def _epochs(steps: list[int]) -> list[str]:
    epochs = [s for s in steps if s > 0]
    if not epochs:
        return []
    return [f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"]


def describe_deferred(records: list[Record]) -> str:
    """'3 metric batch(es) (epochs 3-4, final metrics), 1 tag(s), 4 artifact(s), ...'."""
    if not records:
        return "nothing"
    parts = []
    metrics = [r for r in records if r["op"] == "metrics"]
    if metrics:
        steps = sorted({int(m[3]) for r in metrics for m in r["metrics"]})
        what = _epochs(steps) + (["final metrics"] if 0 in steps else [])
        parts.append(f"{len(metrics)} metric batch(es) ({', '.join(what)})")
    n_tags = sum(len(r["tags"]) for r in records if r["op"] == "tags")
    if n_tags:
        parts.append(f"{n_tags} tag(s)")
    arts = [r for r in records if r["op"] in ("artifact", "text")]
    if arts:
        parts.append(f"{len(arts)} artifact(s)")
    if any(r["op"] == "model" for r in records):
        parts.append("the MLflow model")
    status = [r["status"] for r in records if r["op"] == "status"]
    if status:
        parts.append(f"the run status {status[-1]}")
    return ", ".join(parts)


def log_pyfunc_model(uri: str, run_id: str, **kwargs: Any) -> None:
    """Log the run's model to the run as an MLflow pyfunc from code named "model".

    `kwargs`: python_model (the code file), artifacts, signature (MLmodel's dict form),
    input_example, metadata, pip_requirements, registered_model_name."""
    import mlflow

    kwargs = _with_signature(kwargs)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pyfunc.log_model(name="model", **kwargs)


def save_pyfunc_model(path: Path, **kwargs: Any) -> None:
    """Save the model locally (the server is away): `log_pyfunc_model`'s kwargs, less the
    registered name; the artifacts are copied in, so the replay needs only `path`."""
    import mlflow

    mlflow.pyfunc.save_model(str(path), **_with_signature(kwargs))


def _with_signature(kwargs: dict[str, Any]) -> dict[str, Any]:
    from mlflow.models import ModelSignature

    sig = kwargs.get("signature")
    if isinstance(sig, dict):
        kwargs = {**kwargs, "signature": ModelSignature.from_dict(sig)}
    return kwargs


def _log_saved_model(uri: str, run_id: str, path: Path, registered: str | None) -> None:
    """Log an MLflow model that was saved locally while the server was away: its code file
    and artifacts from the saved folder, its signature, example and metadata from MLmodel."""
    from mlflow.models import Model

    info = Model.load(str(path))
    flavor = info.flavors["python_function"]
    reqs_file = path / "requirements.txt"
    log_pyfunc_model(
        uri,
        run_id,
        python_model=str(path / Path(flavor["model_code_path"]).name),
        artifacts={k: str(path / a["path"]) for k, a in flavor.get("artifacts", {}).items()},
        signature=info.signature,
        input_example=info.load_input_example(str(path)),
        metadata=info.metadata,
        pip_requirements=reqs_file.read_text().split() if reqs_file.is_file() else None,
        registered_model_name=registered,
    )


def _log_path(client: Any, run_id: str, path: Path, artifact_path: str | None) -> None:
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)


def apply(client: Any, record: Record) -> None:
    """Perform one tracking call described by a DeferredLog record (through MlflowClient)."""
    from mlflow.entities import Metric, RunTag

    op, run_id = record["op"], record["run_id"]
    if op == "metrics":
        batch = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in record["metrics"]]
        for i in range(0, len(batch), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=batch[i : i + METRICS_PER_BATCH])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in record["tags"].items()])
    elif op == "artifact":
        _log_path(client, run_id, Path(record["path"]), record.get("artifact_path"))
    elif op == "text":
        client.log_text(run_id, record["text"], record["artifact_file"])
    elif op == "model":
        path, registered = Path(record["path"]), record.get("registered_model_name")
        _log_saved_model(client.tracking_uri, run_id, path, registered)
    elif op == "status":
        client.set_terminated(run_id, status=record["status"], end_time=record.get("end_time"))
    else:
        raise ValueError(f"unknown deferred tracking call {op!r}")


def replay(client: Any, deferred: DeferredLog) -> tuple[int, list[Record]]:
    """Send the deferred calls in order; stop at the first failure and keep the rest on disk.
    Returns (calls sent, calls left)."""
    records = deferred.records()
    done = 0
    try:
        for record in records:
            apply(client, record)
            done += 1
    finally:
        deferred.rewrite(records[done:])
    return done, records[done:]


PATH_OPS = ("artifact", "model")  # the calls that upload a path (the model: code that runs)


def _check_tree(run_dir: Path, path: Path) -> None:
    """`path` and, for a folder, everything under it (links not followed: each is resolved)."""
    inside(run_dir, path)
    if not path.is_dir() or path.is_symlink():
        return
    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            inside(run_dir, Path(folder) / name)


def check_paths(run_dir: str | Path, records: list[Record]) -> None:
    """Every path the queue would upload lies inside `run_dir`, or UnsafePath naming the first
    that does not; checked for the whole queue before anything is sent, so nothing goes half."""
    run_dir = Path(run_dir)
    for n, record in enumerate(records, 1):
        if record.get("op") not in PATH_OPS:
            continue
        raw = Path(str(record.get("path", "")))
        try:
            _check_tree(run_dir, raw.absolute())  # relative: to the cwd, as apply() reads it
        except UnsafePath as exc:
            raise UnsafePath(
                f"refused: {run_dir / BUFFER_FILE} call {n} ({record['op']}): {exc}; "
                "her2exp-sync sends only the run directory's own files (nothing sent)"
            ) from None


def read_run_file(run_dir: str | Path) -> dict[str, str] | None:
    """The run id, tracking URI and experiment id a run directory's run was logged to."""
    try:
        return json.loads(RunDir(Path(run_dir)).mlflow_run.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_run_file(run_dir: str | Path, run_id: str, uri: str, experiment_id: str) -> None:
    info = {"run_id": run_id, "tracking_uri": uri, "experiment_id": experiment_id}
    atomic_write_text(RunDir(Path(run_dir)).mlflow_run, json.dumps(info) + "\n")


def sync(run_dir: str | Path, uri: str | None = None) -> tuple[int, list[Record]]:
    """`her2exp-sync`: replay a run directory's deferred MLflow calls to its tracking server."""
    import mlflow

    run_dir = Path(run_dir)
    uri = uri or (read_run_file(run_dir) or {}).get("tracking_uri")
    if uri is None:
        raise FileNotFoundError(f"{run_dir / RUN_FILE} is missing: pass the tracking URI")
    deferred = DeferredLog(RunDir(run_dir).mlflow_buffer)
    records = deferred.records()
    if not records:
        return 0, []
    check_paths(run_dir, records)
    problem = store_problem(uri, lookup=True)  # the run must be there: a missing file is not made
    if problem is not None:
        raise TrackingUnavailable(f"tracking.uri={uri} {problem}")
    return replay(mlflow.MlflowClient(tracking_uri=uri), deferred)


class OfflineQueue:
    """A run's calls while its server is away: queued in order in the run directory, the server
    probed at most every `reconnect_s` seconds, and the queue replayed as soon as it answers.

    Once the server is lost every later call queues behind the first one, so order is kept.
    """

    def __init__(self, run_dir: Path, uri: str, client: Any, reconnect_s: float) -> None:
        self.run_dir = Path(run_dir)
        self.buffer = DeferredLog(RunDir(self.run_dir).mlflow_buffer)
        self.uri = uri
        self.client = client
        self.reconnect_s = reconnect_s
        self.offline_since: float | None = None
        self._last_probe = 0.0
        self.replayed = 0  # calls this process replayed

    def lost(self, exc: BaseException) -> None:
        """The server stopped answering: queue from now on."""
        self.offline_since = self._last_probe = time.monotonic()
        log.warning(
            "MLflow server %s unreachable (%s): buffering to %s and training on",
            self.uri,
            type(exc).__name__,
            self.buffer.path,
        )

    def append(self, record: Record) -> None:
        self.buffer.append(record)

    def online(self, force: bool = False) -> bool:
        """True unless the server is away; on its return the queued calls are sent first.

        `force`: probe now, not only once `reconnect_s` has passed since the last probe."""
        if self.offline_since is None:
            return True
        now = time.monotonic()
        if not force and now - self._last_probe < self.reconnect_s:
            return False
        self._last_probe = now
        if check_reachable(self.uri, timeout_s=2.0) is not None:
            return False
        try:
            sent, left = replay(self.client, self.buffer)
        except Exception as exc:  # noqa: BLE001 - still away (or flapping): try again later
            log.warning("MLflow server answers again but replay failed (%s); retrying later", exc)
            return False
        self.replayed += sent
        log.warning(
            "MLflow server %s is back after %.0f s: replayed %d deferred call(s)",
            self.uri,
            now - self.offline_since,
            sent,
        )
        self.offline_since = None
        return not left

    def replay_earlier(self) -> None:
        """Send what a killed attempt left queued, before a resumed run's own calls."""
        sent, left = replay(self.client, self.buffer)
        if sent or left:
            log.warning(
                "replayed %d MLflow call(s) deferred by an earlier attempt (%d left)",
                sent,
                len(left),
            )

    def note(self) -> str | None:
        """What is still waiting in the buffer, as one line for the end of the run."""
        records = self.buffer.records()
        if not records:
            return None
        return (
            f"MLflow server {self.uri} unreachable: deferred {describe_deferred(records)} "
            f"to {self.buffer.path}; replay with: her2exp-sync input={self.run_dir}"
        )
