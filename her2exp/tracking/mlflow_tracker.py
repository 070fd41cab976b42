"""MLflow, on rank 0 only: one run per training job, continued by every resumed attempt.

MLflow is imported when a tracker is made (it costs ~2 s), never with `tracking=off` or on other
ranks. Calls go through `MlflowClient` (metrics, params and tags as `log_batch`); a call that
meets an absent server is queued by `offline.OfflineQueue` and replayed later.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from her2exp.runtime.hydra_run import HydraRun
from her2exp.runtime.rundir import RunDir
from her2exp.tracking.audit import as_params, flatten, git_diff, pip_freeze
from her2exp.tracking.base import Tracker, TrackingUnavailable
from her2exp.tracking.offline import (
    OfflineQueue,
    Record,
    apply,
    log_pyfunc_model,
    read_run_file,
    save_pyfunc_model,
    write_run_file,
)
from her2exp.tracking.store import (
    check_reachable,
    experiment_id,
    open_store,
    require_store,
    resolve_uri,
    with_retries,
)
from her2exp.tracking.sweep import sweep_context, sweep_tags

log = logging.getLogger(__name__)

#: MLflow's per-request limit: params in one log_batch (a value's: audit.PARAM_VALUE_CHARS).
PARAMS_PER_BATCH = 100


def _bound_http_retries() -> None:
    """MLflow's own HTTP retries (429/5xx, connection errors) with a bound: a dead server must
    not stall every epoch for minutes (the defaults: 7 retries with back-off, 120 s timeout)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def _reachable_uri(cfg: DictConfig) -> tuple[str, str | None]:
    """(URI to log to, the unreachable URI it replaces under `tracking.fallback=local`)."""
    uri = resolve_uri(cfg.uri)
    problem = check_reachable(uri)
    if problem is None:
        return require_store(cfg.uri), None  # a SQLite path MLflow could not use: refused now
    if cfg.get("fallback", "none") != "local":
        raise TrackingUnavailable(
            f"tracking.uri={cfg.uri} cannot be reached ({problem}); start the server, "
            "or use tracking=off, or tracking.fallback=local to log to ./mlflow.db"
        )
    log.warning("tracking server %s unreachable (%s): logging to ./mlflow.db", uri, problem)
    return resolve_uri("sqlite:///mlflow.db"), uri


def _params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, characters MLflow accepts."""
    return as_params(flatten(OmegaConf.to_container(cfg, resolve=True)))


def _run_name(tracking_cfg: DictConfig, cfg: DictConfig, sweep: dict[str, str]) -> str:
    """`tracking.run_name`, else model-loss[-jobN]-<random>.

    Not MLflow's own random names: they come from the `random` module, which the run has just
    seeded, so every job of a sweep would get the same name. Ours come from os.urandom."""
    if tracking_cfg.run_name:
        return tracking_cfg.run_name
    parts = [
        OmegaConf.select(cfg, "model.name"),
        OmegaConf.select(cfg, "loss.name") or OmegaConf.select(cfg, "cohort_name"),
        f"job{sweep['job_num']}" if "job_num" in sweep else None,
        uuid.uuid4().hex[:6],
    ]
    return "-".join(str(p) for p in parts if p)


def _attempt_tags(run: Any, params: dict[str, str], tags: dict[str, str]) -> dict[str, str]:
    """Tags a resumed attempt adds to its run: the attempt count, its command, the status it
    found, and every param that changed (`attemptN.param_changed.<key>: old -> new`)."""
    attempt = int(run.data.tags.get("attempts", "1")) + 1
    new = {k: v for k, v in tags.items() if k not in run.data.tags}
    new["attempts"] = str(attempt)
    new[f"attempt{attempt}.command"] = tags.get("command", "")
    new[f"attempt{attempt}.previous_status"] = run.info.status
    old = run.data.params
    for k, v in params.items():
        if k in old and old[k] != v:
            new[f"attempt{attempt}.param_changed.{k}"] = f"{old[k]} -> {v}"[:5000]
    return new


def _model_requirements() -> list[str]:
    import timm

    return [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]


class MlflowTracker(Tracker):
    """One MLflow run per training job, continued (same run id) by every resumed attempt.

    Once the run exists, a call that fails because the server is unreachable is queued in the
    run directory (`offline.OfflineQueue`) and training goes on; the queue is replayed as soon as
    the server answers, at the end of the run, or later by `her2exp-sync input=<run_dir>`. Other
    failures are recorded and reported at the end. Checkpoints and reports never depend on
    MLflow.
    """

    RECONNECT_S = 5.0  # probe an absent server at most this often

    def __init__(self, cfg: DictConfig) -> None:
        _bound_http_retries()
        self.uri, self.fallback_from = _reachable_uri(cfg)
        import mlflow  # lazy: ~2 s, and only rank 0 with tracking=mlflow pays it

        self.mlflow = mlflow
        self.cfg = cfg
        self.client = open_store(self.uri)  # a new SQLite store made once, under a lock
        self._errors: list[str] = []
        self.run_dir: Path | None = None
        self.queue: OfflineQueue | None = None  # None: no run directory (sweep parents)
        self.reopened = False

    # -- sending -----------------------------------------------------------------------------
    def _failed(self, what: str, exc: BaseException, reason: str) -> None:
        self._errors.append(f"{what}: {type(exc).__name__}: {exc} ({reason})")
        log.error("MLflow %s failed (%s); training goes on", what, exc)

    def _safe(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) with retries; a failure is recorded, never raised (no queue to fall to)."""
        try:
            return with_retries(fn, *args)
        except Exception as exc:  # noqa: BLE001 - tracking must never kill a training run
            self._failed(what, exc, "unreachable" if check_reachable(self.uri) else "error")
            return None

    def _send(self, what: str, fn: Callable[[], Any], retry: bool = True) -> bool:
        """fn() while the server is up; False when it turned out to be away (the caller queues).

        Any other failure is recorded and counts as done: queueing it would not help."""
        try:
            if retry:
                with_retries(fn)
            else:
                fn()
        except Exception as exc:  # noqa: BLE001 - tracking must never kill a training run
            if check_reachable(self.uri, timeout_s=2.0) is None:
                self._failed(what, exc, "error")
            else:
                self.queue.lost(exc)
                return False
        return True

    def _submit(self, record: Record) -> None:
        """Send one call now, or queue it while the server is away (in order)."""
        record = {"run_id": self.run_id, **record}
        call = functools.partial(apply, self.client, record)
        if self.queue is None:
            self._safe(record["op"], call)
        elif not (self.queue.online() and self._send(record["op"], call)):
            self.queue.append(record)

    # -- run life cycle ----------------------------------------------------------------------
    def start(
        self,
        cfg: DictConfig,
        tags: dict[str, str],
        run_dir: Path | None = None,
        continue_run: bool = False,
        hydra: HydraRun | None = None,
    ) -> None:
        """Create the run, or with `continue_run` reopen the one `run_dir` recorded; `hydra`
        (read at the command's entry) says which sweep and job it is."""
        sweep = sweep_context(hydra)
        tags = {**tags, **sweep_tags(sweep)}
        if self.fallback_from:
            tags["tracking_fallback_from"] = self.fallback_from
        params = _params(cfg)
        if run_dir is not None:
            self.run_dir = Path(run_dir)
            self.queue = OfflineQueue(self.run_dir, self.uri, self.client, self.RECONNECT_S)
        if continue_run and self.run_dir is not None and self._reopen(params, tags):
            return
        exp_id = with_retries(experiment_id, self.client, self.cfg, self.uri)
        name = _run_name(self.cfg, cfg, sweep)
        self.run_id = with_retries(
            self.client.create_run, exp_id, run_name=name, tags=tags
        ).info.run_id
        if self.run_dir is not None:
            write_run_file(self.run_dir, self.run_id, self.uri, exp_id)
        self._log_params(params)
        self.log_text(pip_freeze(), "audit/pip_freeze.txt")
        if tags.get("git_dirty") == "true":
            self.log_text(git_diff(), "audit/git_diff.patch")

    def _log_params(self, params: dict[str, str]) -> None:
        entities = [self.mlflow.entities.Param(k, v) for k, v in params.items()]
        for i in range(0, len(entities), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=entities[i : i + PARAMS_PER_BATCH])

    def _reopen(self, params: dict[str, str], tags: dict[str, str]) -> bool:
        """Continue the run a killed or restarted attempt left RUNNING/KILLED/FAILED.

        False (start a new run) when the run file is missing, names another store, or names a
        run that is gone."""
        info = read_run_file(self.run_dir)
        if info is None or info.get("tracking_uri") != self.uri:
            return False
        try:
            run = self.client.get_run(info["run_id"])
        except self.mlflow.exceptions.MlflowException:
            log.warning(
                "MLflow run %s recorded in %s is gone: starting a new run",
                info["run_id"],
                self.run_dir,
            )
            return False
        self.run_id, self.reopened = run.info.run_id, True
        self.client.update_run(self.run_id, status="RUNNING")
        new_tags = _attempt_tags(run, params, tags)
        self.client.log_batch(
            self.run_id, tags=[self.mlflow.entities.RunTag(k, str(v)) for k, v in new_tags.items()]
        )
        self._log_params({k: v for k, v in params.items() if k not in run.data.params})
        self.queue.replay_earlier()
        log.info(
            "continuing MLflow run %s (attempt %s, was %s)",
            self.run_id,
            new_tags["attempts"],
            run.info.status,
        )
        return True

    def end(self, status: str = "FINISHED") -> None:
        """Close the run; first one last try to send what is queued, then say what is left."""
        if self.run_id is None:
            return
        if self._errors:
            self.set_tags({"tracking_errors": str(len(self._errors))})
        if self.queue is not None:
            self.queue.online(force=True)
        if self.replayed:
            self.set_tags({"tracking_replayed_calls": str(self.replayed)})
        self._submit({"op": "status", "status": status, "end_time": int(time.time() * 1000)})
        note = self.deferred_note
        if note:
            log.warning(note)
        elif self.replayed:
            log.warning(
                "MLflow server %s was unreachable during the run: %d deferred call(s) "
                "were replayed, nothing is missing",
                self.uri,
                self.replayed,
            )

    # -- what a run logs ---------------------------------------------------------------------
    def log_history(self, rows: list[dict[str, float]]) -> None:
        """Per-epoch rows restored from a checkpoint; a continued run gets only missing epochs."""
        present: set[int] = set()
        if self.reopened:
            got = self._safe(
                "get_metric_history", self.client.get_metric_history, self.run_id, "val_auc"
            )
            present = {int(m.step) for m in got or []}
        super().log_history([row for row in rows if int(row["epoch"]) not in present])

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
            self._submit(
                {"op": "artifact", "path": str(path.resolve()), "artifact_path": artifact_path}
            )

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit({"op": "text", "text": text, "artifact_file": artifact_file})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if tags:
            self._submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_dataset(self, manifest: Any, name: str, digest: str, counts: dict) -> None:
        """The data as an MLflow dataset input: schema, digest = our fingerprint, split counts.

        Not queued while the server is away: the fingerprint is a run tag either way."""
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

    def log_model(self, spec: dict[str, Any]) -> None:
        """The best model as an MLflow pyfunc from code (`serving.model_spec`), thresholds in
        its metadata.

        With the server away it is saved in the run directory and logged on replay. Not retried
        once online: a retry after a partial upload would log a second model."""
        kwargs = {
            **spec,
            "pip_requirements": _model_requirements(),
            "registered_model_name": self.cfg.get("registered_model_name"),
        }
        log_it = functools.partial(log_pyfunc_model, self.uri, self.run_id, **kwargs)
        if self.queue is None:
            self._safe("log_model", log_it)
        elif not (self.queue.online() and self._send("log_model", log_it, retry=False)):
            self._defer_model(kwargs)

    def _defer_model(self, kwargs: dict[str, Any]) -> None:
        """Save the model in the run directory and queue its logging."""
        path = RunDir(self.run_dir).mlflow_model_deferred
        shutil.rmtree(path, ignore_errors=True)
        save_pyfunc_model(path, **{k: v for k, v in kwargs.items() if k != "registered_model_name"})
        self.queue.append(
            {
                "run_id": self.run_id,
                "op": "model",
                "path": str(path),
                "registered_model_name": kwargs["registered_model_name"],
            }
        )

    # -- what the run reports ----------------------------------------------------------------
    @property
    def errors(self) -> list[str]:
        return self._errors

    @property
    def replayed(self) -> int:
        """Calls this process replayed after the server came back."""
        return self.queue.replayed if self.queue is not None else 0

    @property
    def deferred_note(self) -> str | None:
        """What is still waiting in the buffer, as one line for the end of the run."""
        return self.queue.note() if self.queue is not None else None

    def describe(self) -> str:
        return f"MLflow run {self.run_id} in {self.uri} (experiment {self.cfg.experiment!r})"
