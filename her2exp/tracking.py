"""MLflow, on rank 0 only, with the audit tags a reviewer needs to trust and repeat a run.

MLflow is imported lazily (it costs ~2 s), and never with `tracking=off` or on other ranks.
Git tags are set here rather than by MLflow, whose own git tag follows sys.argv[0] and records
no dirty flag.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
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


def git_diff(repo: Path = REPO_DIR) -> str:
    """The uncommitted changes of a dirty checkout: what a rerun must apply on top of the commit."""
    try:
        res = subprocess.run(["git", "-C", str(repo), "diff", "HEAD"], capture_output=True,
                             text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout if res.returncode == 0 else ""


def pip_freeze() -> str:
    """`pip freeze` of the running interpreter (read from package metadata: no subprocess)."""
    lines = {
        f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]
    }
    return "\n".join(sorted(lines, key=str.lower)) + "\n"


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
        "cuda_device_count": str(torch.cuda.device_count()),
        "cudnn_deterministic": str(torch.backends.cudnn.deterministic).lower(),
        "torch_deterministic_algorithms": str(torch.are_deterministic_algorithms_enabled()).lower(),
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

    def start(
        self,
        cfg: DictConfig,
        tags: dict[str, str],
        run_dir: Path | None = None,
        continue_run: bool = False,
    ) -> None:
        pass

    def log_history(self, rows: list[dict[str, float]]) -> None:
        for row in rows:
            self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, int(row["epoch"]))

    def log_metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_dataset(self, manifest: Any, name: str, digest: str, counts: dict) -> None:
        pass

    def log_model(self, model: Any, example: Any, metadata: dict[str, Any]) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass

    @property
    def errors(self) -> list[str]:
        return []

    @property
    def deferred_note(self) -> str | None:
        return None

    def describe(self) -> str:
        return "MLflow tracking off"


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached when the run starts (before any training)."""


def check_reachable(uri: str, timeout_s: float = 5.0) -> str | None:
    """None when an http(s) tracking server answers its /health endpoint, else why not."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def sweep_context() -> dict[str, str]:
    """Parent run and job of a Hydra multirun: from Hydra in the job process, or from the
    environment in workers the job process spawned (trainer.nproc_per_node)."""
    ctx = {k: os.environ[v] for k, v in SWEEP_ENV.items() if v in os.environ}
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            ctx["job_num"] = str(hc.job.num)
            ctx["job_overrides"] = " ".join(hc.overrides.task)
            ctx["sweep_dir"] = str(hc.sweep.dir)
    except ValueError:
        pass
    return ctx


SWEEP_ENV = {
    "parent_run_id": "HER2EXP_PARENT_RUN_ID",
    "job_num": "HER2EXP_SWEEP_JOB_NUM",
    "job_overrides": "HER2EXP_SWEEP_JOB_OVERRIDES",
    "sweep_dir": "HER2EXP_SWEEP_DIR",
}


def export_sweep_context() -> dict[str, str]:
    """Environment for spawned workers so their run joins the same sweep parent."""
    return {SWEEP_ENV[k]: v for k, v in sweep_context().items()}


#: Messages of store errors that go away on their own: SQLite's writer lock, PostgreSQL's
#: deadlock and serialisation failures, an overloaded or restarting server (HTTP 429/5xx), and
#: MLflow's read-then-insert of rows that concurrent jobs share (the sweep's dataset: seen as
#: `UniqueViolation ... "dataset_pk"` with 2 jobs on PostgreSQL), which a retry finds in place.
_TRANSIENT = ("database is locked", "deadlock detected", "could not serialize",
              "temporarily unavailable", "too many requests", " 429", " 502", " 503", " 504",
              "duplicate key value violates unique constraint", "unique constraint failed")  # fmt: skip
#: Back-off jitter from its own generator: the global `random` state is the run's, seeded and
#: checkpointed for exact resume.
_JITTER = random.Random()


def is_transient(exc: BaseException) -> bool:
    """Whether a tracking error is worth retrying (not a wrong value or a missing server)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(marker in text for marker in _TRANSIENT)


def with_retries(fn: Any, *args: Any, attempts: int = 5, base_delay_s: float = 0.2,
                 **kwargs: Any) -> Any:  # fmt: skip
    """Call fn, retrying transient store errors with exponential back-off and jitter.

    Concurrent sweep jobs share one store: a job that meets another's SQLite write lock or a
    PostgreSQL serialisation failure waits 0.2, 0.4, 0.8, 1.6 s (+ up to 50% jitter) and tries
    again; any other error, or the last attempt's, is raised to the caller.
    """
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            delay = base_delay_s * 2**attempt * (1.0 + 0.5 * _JITTER.random())
            log.warning("MLflow call failed transiently (%s); retry %d/%d in %.1f s",
                        exc, attempt + 1, attempts - 1, delay)  # fmt: skip
            time.sleep(delay)
    raise AssertionError("unreachable")


def _experiment_id(client: Any, cfg: DictConfig, uri: str) -> str:
    import mlflow

    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location = cfg.get("artifact_location")
    if location is None and uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(cfg.experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        exp = client.get_experiment_by_name(cfg.experiment)  # created concurrently
        if exp is None:
            raise
        return exp.experiment_id


RUN_FILE = "mlflow_run.json"  # run id + tracking URI, so a resumed attempt continues the run
BUFFER_FILE = "mlflow_buffer.jsonl"  # calls deferred while the server was unreachable
MODEL_DIR = "mlflow_model_deferred"  # the MLflow model, saved locally when it could not be logged


class DeferredLog:
    """Tracking calls that could not reach the server, in order, as JSON lines in the run
    directory. Appends are fsynced; a line torn by a kill is ignored on reading."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the last line of an append cut short by a kill
        return out

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        if not records:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.path)


def describe_deferred(records: list[dict[str, Any]]) -> str:
    """'3 metric batch(es) (epochs 3-4, final metrics), 1 tag(s), 4 artifact(s), ...'."""
    if not records:
        return "nothing"
    parts = []
    metrics = [r for r in records if r["op"] == "metrics"]
    if metrics:
        steps = sorted({int(m[3]) for r in metrics for m in r["metrics"]})
        epochs = [s for s in steps if s > 0]
        what = [] if not epochs else [f"epoch {epochs[0]}" if len(epochs) == 1
                                      else f"epochs {epochs[0]}-{epochs[-1]}"]  # fmt: skip
        what += ["final metrics"] if 0 in steps else []
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


def _apply(client: Any, record: dict[str, Any]) -> None:
    """Perform one tracking call described by a DeferredLog record."""
    from mlflow.entities import Metric, RunTag

    op, run_id = record["op"], record["run_id"]
    if op == "metrics":
        batch = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in record["metrics"]]
        for i in range(0, len(batch), 500):
            client.log_batch(run_id, metrics=batch[i : i + 500])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in record["tags"].items()])
    elif op == "artifact":
        path = Path(record["path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), record.get("artifact_path"))
        elif path.is_file():
            client.log_artifact(run_id, str(path), record.get("artifact_path"))
    elif op == "text":
        client.log_text(run_id, record["text"], record["artifact_file"])
    elif op == "model":
        _log_saved_model(client.tracking_uri, run_id, Path(record["path"]),
                         record.get("registered_model_name"))  # fmt: skip
    elif op == "status":
        client.set_terminated(run_id, status=record["status"], end_time=record.get("end_time"))
    else:
        raise ValueError(f"unknown deferred tracking call {op!r}")


def _log_saved_model(uri: str, run_id: str, path: Path, registered: str | None) -> None:
    """Log an MLflow model that was saved locally while the server was away."""
    import mlflow
    from mlflow.models import Model

    info = Model.load(str(path))
    reqs = (
        (path / "requirements.txt").read_text().split()
        if (path / "requirements.txt").is_file()
        else None
    )
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            mlflow.pytorch.load_model(str(path)),
            name="model",
            input_example=info.load_input_example(str(path)),
            serialization_format="pickle",
            metadata=info.metadata,
            pip_requirements=reqs,
            registered_model_name=registered,
        )


def replay(client: Any, deferred: DeferredLog) -> tuple[int, list[dict[str, Any]]]:
    """Send the deferred calls in order; stop at the first failure and keep the rest on disk.
    Returns (calls sent, calls left)."""
    records = deferred.records()
    done = 0
    try:
        for record in records:
            _apply(client, record)
            done += 1
    finally:
        deferred.rewrite(records[done:])
    return done, records[done:]


def read_run_file(run_dir: Path) -> dict[str, str] | None:
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def sync(run_dir: str | Path, uri: str | None = None) -> tuple[int, list[dict[str, Any]]]:
    """`her2exp-sync`: replay a run directory's deferred MLflow calls to its tracking server."""
    import mlflow

    run_dir = Path(run_dir)
    info = read_run_file(run_dir)
    uri = uri or (info or {}).get("tracking_uri")
    if uri is None:
        raise FileNotFoundError(f"{run_dir / RUN_FILE} is missing: pass the tracking URI")
    deferred = DeferredLog(run_dir / BUFFER_FILE)
    if not deferred.records():
        return 0, []
    problem = check_reachable(uri)
    if problem is not None:
        raise TrackingUnavailable(f"{uri} cannot be reached ({problem})")
    return replay(mlflow.MlflowClient(tracking_uri=uri), deferred)


class MlflowTracker(Tracker):
    """One MLflow run per training job, continued (same run id) by every resumed attempt.

    Once the run exists, a call that fails because the server is unreachable is appended to the
    run directory's `mlflow_buffer.jsonl` and training goes on; while the server is away every
    later call queues behind it (order is kept), the server is polled at most every
    `RECONNECT_S` seconds, and the queue is replayed as soon as it answers, at the end of the
    run, or later by `her2exp-sync <run_dir>`. Other failures are recorded and reported at the
    end. Checkpoints and reports never depend on MLflow.
    """

    RECONNECT_S = 5.0

    def __init__(self, cfg: DictConfig) -> None:
        # Bounded retries: a dead server must not stall every epoch for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        uri = resolve_uri(cfg.uri)
        problem = check_reachable(uri)
        if problem is not None:
            if cfg.get("fallback", "none") != "local":
                raise TrackingUnavailable(
                    f"tracking.uri={cfg.uri} cannot be reached ({problem}); start the server, "
                    "or use tracking=off, or tracking.fallback=local to log to ./mlflow.db"
                )
            log.warning("tracking server %s unreachable (%s): logging to ./mlflow.db", uri, problem)
            self.fallback_from = uri
            uri = resolve_uri("sqlite:///mlflow.db")
        import mlflow  # lazy: ~2 s, and only rank 0 with tracking=mlflow pays it

        self.mlflow = mlflow
        self.cfg = cfg
        self.uri = uri
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        self._errors: list[str] = []
        self.run_dir: Path | None = None
        self.deferred: DeferredLog | None = None
        self._offline_since: float | None = None
        self._last_probe = 0.0
        self._n_replayed = 0
        self.reopened = False

    @property
    def errors(self) -> list[str]:
        return self._errors

    def _safe(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return with_retries(fn, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never kill a training run
            reason = "unreachable" if check_reachable(self.uri) else "error"
            self._errors.append(f"{what}: {type(exc).__name__}: {exc} ({reason})")
            log.error("MLflow %s failed (%s); training goes on", what, exc)
            return None

    # -- deferral ----------------------------------------------------------------------------
    def _online(self, force: bool = False) -> bool:
        """True unless the server is away; on its return the queued calls are sent first."""
        if self._offline_since is None:
            return True
        now = time.monotonic()
        if not force and now - self._last_probe < self.RECONNECT_S:
            return False
        self._last_probe = now
        if check_reachable(self.uri, timeout_s=2.0) is not None:
            return False
        try:
            sent, left = replay(self.client, self.deferred)
        except Exception as exc:  # noqa: BLE001 - still away (or flapping): try again later
            log.warning("MLflow server answers again but replay failed (%s); retrying later", exc)
            return False
        self._n_replayed += sent
        log.warning("MLflow server %s is back after %.0f s: replayed %d deferred call(s)",
                    self.uri, now - self._offline_since, sent)  # fmt: skip
        self._offline_since = None
        return not left

    def _submit(self, record: dict[str, Any]) -> None:
        record = {"run_id": self.run_id, **record}
        if self.deferred is None:  # no run directory to buffer in (sweep parents, evaluation)
            self._safe(record["op"], _apply, self.client, record)
            return
        if not self._online():
            self.deferred.append(record)
            return
        try:
            with_retries(_apply, self.client, record)
        except Exception as exc:  # noqa: BLE001 - tracking must never kill a training run
            if check_reachable(self.uri, timeout_s=2.0) is None:
                self._errors.append(f"{record['op']}: {type(exc).__name__}: {exc} (error)")
                log.error("MLflow %s failed (%s); training goes on", record["op"], exc)
                return
            self._offline_since = self._last_probe = time.monotonic()
            self.deferred.append(record)
            log.warning("MLflow server %s unreachable (%s): buffering to %s and training on",
                        self.uri, type(exc).__name__, self.deferred.path)  # fmt: skip

    @property
    def deferred_note(self) -> str | None:
        """What is still waiting in the buffer, as one line for the end of the run."""
        if self.deferred is None:
            return None
        records = self.deferred.records()
        if not records:
            return None
        return (f"MLflow server {self.uri} unreachable: deferred {describe_deferred(records)} "
                f"to {self.deferred.path}; replay with: her2exp-sync {self.run_dir}")  # fmt: skip

    # -- run life cycle ----------------------------------------------------------------------
    def start(
        self,
        cfg: DictConfig,
        tags: dict[str, str],
        run_dir: Path | None = None,
        continue_run: bool = False,
    ) -> None:
        """Create the run, or with `continue_run` reopen the one `run_dir` recorded."""
        tags = dict(tags)
        sweep = sweep_context()
        if "parent_run_id" in sweep:
            tags["mlflow.parentRunId"] = sweep["parent_run_id"]
        for key in ("job_num", "job_overrides", "sweep_dir"):
            if key in sweep:
                tags[f"sweep.{key}"] = sweep[key]
        if getattr(self, "fallback_from", None):
            tags["tracking_fallback_from"] = self.fallback_from
        params = flatten(OmegaConf.to_container(cfg, resolve=True))
        params = {re.sub(r"[^\w\-. /]", "_", k): str(v)[:6000] for k, v in params.items()}
        if run_dir is not None:
            self.run_dir = Path(run_dir)
            self.deferred = DeferredLog(self.run_dir / BUFFER_FILE)
        if continue_run and self.run_dir is not None and self._reopen(params, tags):
            return
        # MLflow's own random names come from the `random` module, which the run has just
        # seeded: every job of a sweep would get the same name. Ours come from os.urandom.
        parts = [
            OmegaConf.select(cfg, "model.name"),
            OmegaConf.select(cfg, "loss.name") or OmegaConf.select(cfg, "cohort_name"),
            f"job{sweep['job_num']}" if "job_num" in sweep else None,
            uuid.uuid4().hex[:6],
        ]
        name = self.cfg.run_name or "-".join(str(p) for p in parts if p)
        exp_id = with_retries(_experiment_id, self.client, self.cfg, self.uri)
        run = with_retries(self.client.create_run, exp_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.run_dir / f".{RUN_FILE}.tmp"
            tmp.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri,
                                       "experiment_id": exp_id}) + "\n")  # fmt: skip
            os.replace(tmp, self.run_dir / RUN_FILE)
        self._log_params(params)
        self.log_text(pip_freeze(), "audit/pip_freeze.txt")
        if tags.get("git_dirty") == "true":
            self.log_text(git_diff(), "audit/git_diff.patch")

    def _log_params(self, params: dict[str, str]) -> None:
        entities = [self.mlflow.entities.Param(k, v) for k, v in params.items()]
        for i in range(0, len(entities), 100):
            self.client.log_batch(self.run_id, params=entities[i : i + 100])

    def _reopen(self, params: dict[str, str], tags: dict[str, str]) -> bool:
        """Continue the run a killed or restarted attempt left RUNNING/KILLED/FAILED."""
        info = read_run_file(self.run_dir)
        if info is None or info.get("tracking_uri") != self.uri:
            return False
        try:
            run = self.client.get_run(info["run_id"])
        except self.mlflow.exceptions.MlflowException:
            log.warning("MLflow run %s recorded in %s is gone: starting a new run",
                        info["run_id"], self.run_dir)  # fmt: skip
            return False
        self.run_id, self.reopened = run.info.run_id, True
        self.client.update_run(self.run_id, status="RUNNING")
        attempt = int(run.data.tags.get("attempts", "1")) + 1
        new_tags = {k: v for k, v in tags.items() if k not in run.data.tags}
        new_tags.update({
            "attempts": str(attempt),
            f"attempt{attempt}.command": tags.get("command", ""),
            f"attempt{attempt}.previous_status": run.info.status,
        })  # fmt: skip
        old = run.data.params
        for k, v in params.items():
            if k in old and old[k] != v:
                new_tags[f"attempt{attempt}.param_changed.{k}"] = f"{old[k]} -> {v}"[:5000]
        self.client.log_batch(
            self.run_id, tags=[self.mlflow.entities.RunTag(k, str(v)) for k, v in new_tags.items()]
        )
        self._log_params({k: v for k, v in params.items() if k not in old})
        sent, left = replay(self.client, self.deferred)  # what a killed attempt had queued
        if sent or left:
            log.warning("replayed %d MLflow call(s) deferred by an earlier attempt (%d left)",
                        sent, len(left))  # fmt: skip
        log.info("continuing MLflow run %s (attempt %d, was %s)", self.run_id, attempt,
                 run.info.status)  # fmt: skip
        return True

    def log_history(self, rows: list[dict[str, float]]) -> None:
        """Per-epoch rows restored from a checkpoint; a continued run gets only missing epochs."""
        present: set[int] = set()
        if self.reopened:
            got = self._safe("get_metric_history", self.client.get_metric_history,
                             self.run_id, "val_auc")  # fmt: skip
            present = {int(m.step) for m in got or []}
        for row in rows:
            if int(row["epoch"]) not in present:
                self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, int(row["epoch"]))

    def log_metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        batch = [
            [k, float(v), ts, step or 0]
            for k, v in values.items()
            if v is not None and not (isinstance(v, float) and math.isnan(v))
        ]
        if batch:
            self._submit({"op": "metrics", "metrics": batch})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.exists():
            self._submit({"op": "artifact", "path": str(path.resolve()),
                          "artifact_path": artifact_path})  # fmt: skip

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit({"op": "text", "text": text, "artifact_file": artifact_file})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if tags:
            self._submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_dataset(self, manifest: Any, name: str, digest: str, counts: dict) -> None:
        """The data as an MLflow dataset input: schema, digest = our fingerprint, split counts."""
        from mlflow.entities import DatasetInput, InputTag

        def _log() -> None:
            ds = self.mlflow.data.from_pandas(manifest, name=name, targets="label", digest=digest)
            tags = [InputTag("mlflow.data.context", "training")] + [
                InputTag(f"{split}_{cls}", str(n))
                for split, c in counts.items()
                for cls, n in c.items()
            ]
            self.client.log_inputs(self.run_id, [DatasetInput(ds._to_mlflow_entity(), tags)])

        if self.reopened:
            return  # the first attempt logged it (same data: the fingerprint is a run tag)
        self._safe("log_input", _log)

    def log_model(self, model: Any, example: Any, metadata: dict[str, Any]) -> None:
        """The best model as an MLflow model (pyfunc-loadable), thresholds in its metadata.

        With the server away it is saved in the run directory and logged on replay."""
        import timm

        reqs = [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]
        registered = self.cfg.get("registered_model_name")

        def _log() -> None:
            self.mlflow.set_tracking_uri(self.uri)
            with self.mlflow.start_run(run_id=self.run_id):
                self.mlflow.pytorch.log_model(
                    model,
                    name="model",
                    input_example=example,
                    serialization_format="pickle",
                    metadata=metadata,
                    pip_requirements=reqs,
                    registered_model_name=registered,
                )

        if self.deferred is None:
            self._safe("log_model", _log)
            return
        if self._online():
            try:
                _log()
                return
            except Exception as exc:  # noqa: BLE001 - tracking must never kill a training run
                if check_reachable(self.uri, timeout_s=2.0) is None:
                    self._errors.append(f"log_model: {type(exc).__name__}: {exc} (error)")
                    log.error("MLflow log_model failed (%s); training goes on", exc)
                    return
                self._offline_since = self._last_probe = time.monotonic()
        path = self.run_dir / MODEL_DIR
        shutil.rmtree(path, ignore_errors=True)
        self.mlflow.pytorch.save_model(model, str(path), input_example=example,
                                       serialization_format="pickle", metadata=metadata,
                                       pip_requirements=reqs)  # fmt: skip
        self.deferred.append({"run_id": self.run_id, "op": "model", "path": str(path),
                              "registered_model_name": registered})  # fmt: skip

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is None:
            return
        if self._errors:
            self.set_tags({"tracking_errors": str(len(self._errors))})
        if self._offline_since is not None:
            self._online(force=True)  # one last try before the status is queued
        if self._n_replayed:
            self.set_tags({"tracking_replayed_calls": str(self._n_replayed)})
        self._submit({"op": "status", "status": status, "end_time": int(time.time() * 1000)})
        if self._n_replayed and not self.deferred_note:
            log.warning("MLflow server %s was unreachable during the run: %d deferred call(s) "
                        "were replayed, nothing is missing", self.uri, self._n_replayed)  # fmt: skip
        elif self.deferred_note:
            log.warning(self.deferred_note)

    @property
    def replayed(self) -> int:
        return self._n_replayed

    def describe(self) -> str:
        return f"MLflow run {self.run_id} in {self.uri} (experiment {self.cfg.experiment!r})"


class MlflowSweepCallback(Callback):
    """Hydra callback: one MLflow parent run per multirun, the jobs' runs as its children.

    Creating the parent in `on_multirun_start` also creates a fresh SQLite store once, before
    jobs fan out (concurrent first use of one SQLite store fails with migration errors). Jobs
    find the parent through HER2EXP_PARENT_RUN_ID (inherited by launched processes) and attach
    with the `mlflow.parentRunId` tag, which works across processes, unlike `nested=True`.
    """

    def __init__(self) -> None:
        self.tracker: MlflowTracker | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.tracking.backend != "mlflow":
            return
        hc = config.hydra  # HydraConfig is not set yet in on_multirun_start
        self.tracker = MlflowTracker(config.tracking)
        client = self.tracker.client
        sweeper = str(hc.runtime.choices.get("hydra/sweeper", "basic"))
        run = with_retries(
            client.create_run,
            with_retries(_experiment_id, client, config.tracking, self.tracker.uri),
            run_name=f"sweep {Path(str(hc.sweep.dir)).name}",
            tags={
                "sweep": "parent",
                "sweeper": sweeper,
                "sweep_dir": str(Path(str(hc.sweep.dir)).resolve()),
                "sweep_overrides": " ".join(hc.overrides.task),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                **git_info(),
            },
        )
        self.tracker.run_id = run.info.run_id
        os.environ[SWEEP_ENV["parent_run_id"]] = run.info.run_id
        log.info("MLflow sweep parent run %s", run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.tracker is None or self.tracker.run_id is None:
            return
        client, parent = self.tracker.client, self.tracker.run_id
        children = client.search_runs(
            [_experiment_id(client, config.tracking, self.tracker.uri)],
            f"tags.mlflow.parentRunId = '{parent}'",
        )
        scored = [r for r in children if "best_val_auc" in r.data.metrics]
        self.tracker.log_metrics({"n_jobs": len(children), "n_finished": len(scored)})
        if scored:
            best = max(scored, key=lambda r: r.data.metrics["best_val_auc"])
            self.tracker.log_metrics({"best_val_auc": best.data.metrics["best_val_auc"]})
            self.tracker.set_tags({"best_child_run_id": best.info.run_id})
        failed = len(scored) < len(children)
        self.tracker.end("FAILED" if failed or not children else "FINISHED")
        os.environ.pop(SWEEP_ENV["parent_run_id"], None)


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
    weights: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The audit tags every run carries; `weights`: where the backbone's weights came from
    (`weights.source`, and for a local file `weights.file` and `weights.sha256`)."""
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
        **{f"weights.{k}": str(v) for k, v in (weights or {"source": "random init"}).items()},
    }
    tags["mlflow.source.git.commit"] = tags["git_commit"]  # what the MLflow UI shows
    return tags
