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
import re
import socket
import subprocess
import sys
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

    def start(self, cfg: DictConfig, tags: dict[str, str]) -> None:
        pass

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


class MlflowTracker(Tracker):
    """One MLflow run per training job.

    Once the run exists, a failing tracking call (a server that went away) is recorded and the
    run goes on: checkpoints and the run directory's reports never depend on MLflow. Failures
    are reported at the end.
    """

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

    @property
    def errors(self) -> list[str]:
        return self._errors

    def _safe(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._errors and "unreachable" in self._errors[-1]:
            return None  # the server is gone: don't wait on retries every epoch
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never kill a training run
            reason = "unreachable" if check_reachable(self.uri) else "error"
            self._errors.append(f"{what}: {type(exc).__name__}: {exc} ({reason})")
            log.error("MLflow %s failed (%s); training goes on", what, exc)
            return None

    def start(self, cfg: DictConfig, tags: dict[str, str]) -> None:
        tags = dict(tags)
        sweep = sweep_context()
        if "parent_run_id" in sweep:
            tags["mlflow.parentRunId"] = sweep["parent_run_id"]
        for key in ("job_num", "job_overrides", "sweep_dir"):
            if key in sweep:
                tags[f"sweep.{key}"] = sweep[key]
        if getattr(self, "fallback_from", None):
            tags["tracking_fallback_from"] = self.fallback_from
        # MLflow's own random names come from the `random` module, which the run has just
        # seeded: every job of a sweep would get the same name. Ours come from os.urandom.
        parts = [
            OmegaConf.select(cfg, "model.name"),
            OmegaConf.select(cfg, "loss.name") or OmegaConf.select(cfg, "cohort_name"),
            f"job{sweep['job_num']}" if "job_num" in sweep else None,
            uuid.uuid4().hex[:6],
        ]
        name = self.cfg.run_name or "-".join(str(p) for p in parts if p)
        run = self.client.create_run(
            _experiment_id(self.client, self.cfg, self.uri), run_name=name, tags=tags
        )
        self.run_id = run.info.run_id
        params = flatten(OmegaConf.to_container(cfg, resolve=True))
        # MLflow keys allow alphanumerics, _ - . / and space: "score_map.2+" -> "score_map.2_"
        entities = [
            self.mlflow.entities.Param(re.sub(r"[^\w\-. /]", "_", k), str(v)[:6000])
            for k, v in params.items()
        ]
        for i in range(0, len(entities), 100):
            self.client.log_batch(self.run_id, params=entities[i : i + 100])
        self.log_text(pip_freeze(), "audit/pip_freeze.txt")
        if tags.get("git_dirty") == "true":
            self.log_text(git_diff(), "audit/git_diff.patch")

    def log_metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        import time

        ts = int(time.time() * 1000)
        batch = [
            self.mlflow.entities.Metric(k, float(v), ts, step or 0)
            for k, v in values.items()
            if v is not None and not (isinstance(v, float) and math.isnan(v))
        ]
        for i in range(0, len(batch), 500):
            self._safe("log_metrics", self.client.log_batch, self.run_id,
                       metrics=batch[i : i + 500])  # fmt: skip

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._safe("log_artifacts", self.client.log_artifacts, self.run_id, str(path),
                       artifact_path)  # fmt: skip
        elif path.is_file():
            self._safe("log_artifact", self.client.log_artifact, self.run_id, str(path),
                       artifact_path)  # fmt: skip

    def log_text(self, text: str, artifact_file: str) -> None:
        self._safe("log_text", self.client.log_text, self.run_id, text, artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self._safe("set_tag", self.client.set_tag, self.run_id, k, str(v))

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

        self._safe("log_input", _log)

    def log_model(self, model: Any, example: Any, metadata: dict[str, Any]) -> None:
        """The best model as an MLflow model (pyfunc-loadable), thresholds in its metadata."""
        import timm

        def _log() -> None:
            self.mlflow.set_tracking_uri(self.uri)
            with self.mlflow.start_run(run_id=self.run_id):
                self.mlflow.pytorch.log_model(
                    model,
                    name="model",
                    input_example=example,
                    serialization_format="pickle",
                    metadata=metadata,
                    pip_requirements=[
                        f"torch=={torch.__version__.split('+')[0]}",
                        f"timm=={timm.__version__}",
                    ],  # fmt: skip
                    registered_model_name=self.cfg.get("registered_model_name"),
                )

        self._safe("log_model", _log)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            if self._errors:
                self._safe("set_tag", self.client.set_tag, self.run_id, "tracking_errors",
                           str(len(self._errors)))  # fmt: skip
            self._safe("set_terminated", self.client.set_terminated, self.run_id, status=status)

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
        run = client.create_run(
            _experiment_id(client, config.tracking, self.tracker.uri),
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
