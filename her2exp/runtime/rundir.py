"""What a run directory may already hold when a run starts, decided before any work.

A fixed `hydra.run.dir` is the recommended recipe (docs/howto/preemption.md), so a second
start in it must never destroy the first run's checkpoints and reports by accident, and a resume
must continue the experiment that was started, not a changed one whose new settings the restored
optimizer and schedule would silently override:

- a checkpoint there and no `trainer.resume`: refused, unless `trainer.overwrite=true` (the old
  checkpoints, reports and MLflow run link are removed, a new run starts);
- `trainer.resume`: the checkpoint must exist and load, and its config must match the new one on
  every key that changes what is computed (EXPERIMENT_FREE lists the rest), and its data
  fingerprint the new data's; `trainer.resume_force=true` resumes anyway and records the change;
- `trainer.resume=auto` and no last.pt where a run got as far as its best.pt or reports/best.json
  (last.pt deleted to save space): refused unless `trainer.overwrite=true` - it cannot be
  resumed, and a fresh start would replace its best.pt, reports and finished MLflow run;
- a last.pt that is not a file (a directory): refused, it can be neither resumed nor written.

All of it is read from the files alone, so every rank decides the same, before any work and
before any file is written; runtime.runlock then keeps a second start out while the run runs.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from her2exp.config import ConfigError
from her2exp.core import checkpoint

log = logging.getLogger("her2exp")

#: Keys that change how a run executes or is recorded, not what it computes: they may differ on a
#: resume. Everything else (model, loss, data, stain, seed, the optimisation, the number of
#: epochs, which the cosine schedule spans) alters the experiment.
EXPERIMENT_FREE = (
    "output_dir",
    "task_name",
    "tags",
    "tracking",
    "evaluation",  # applied after training, from the restored best weights
    "data.num_workers",
    "data.prefetch_factor",
    "data.persistent_workers",
    "data.pin_memory",
    "data.eval_batch_size",
    "model.feature_cache_dir",
    "model.compile",
    "model.compile_mode",
    "model.compile_backend",
    "model.compile_before_ddp",
    "trainer.resume",
    "trainer.resume_force",
    "trainer.overwrite",
    "trainer.stop_after_epoch",
    "trainer.progress",
    "trainer.save_checkpoints",
    "trainer.dist_timeout_s",
    "trainer.device",
    "trainer.debug_nan_at_step",
)
# The run directory's names, relative to its root. The run's MLflow artifacts keep the same
# layout (`checkpoints/best.pt`, `reports/best.json`, `config_resolved.yaml`): ARTIFACTS below.
# Use RunDir's properties (or ARTIFACTS'); the names are here to be defined once.
CHECKPOINTS = "checkpoints"
REPORTS = "reports"
LAST = "last.pt"  # everything a resume needs
BEST = "best.pt"  # the best weights; final_evaluation freezes the thresholds into it
STAIN_REFERENCE = "stain_reference.pt"
CONFIG_RESOLVED = "config_resolved.yaml"
MLFLOW_RUN = "mlflow_run.json"  # run id + tracking URI, so a resumed attempt continues the run
MLFLOW_BUFFER = "mlflow_buffer.jsonl"  # calls deferred while the server was unreachable
MLFLOW_MODEL_DEFERRED = "mlflow_model_deferred"  # the MLflow model, saved when it could not log
BEST_JSON = "best.json"  # the run's summary (reports.best.RunSummary)
SUMMARY_MD = "summary.md"
HYDRA = ".hydra"  # Hydra's record of the command: config.yaml, hydra.yaml, overrides.yaml
HYDRA_CONFIG = "config.yaml"
HYDRA_OVERRIDES = "overrides.yaml"
LOCK = ".her2exp.lock"  # flock'd by the run's rank 0 while it runs (runtime/runlock.py)


@dataclass(frozen=True)
class RunDir:
    """One training run's directory, the one place its layout is spelled out: every path a run
    writes or reads (training, resume, the final evaluation, the model card, her2exp-eval,
    -export, -sync, sweeps) comes from here, so a renamed file is renamed once.

    `root` is `hydra.run.dir` (cfg.output_dir). Only paths: nothing is created or read."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_checkpoint(cls, checkpoint_path: str | Path) -> RunDir:
        """The run directory holding a checkpoint: `<run>/checkpoints/best.pt` -> `<run>`; a
        checkpoint outside a `checkpoints/` folder: the folder it is in."""
        path = Path(checkpoint_path).resolve()
        return cls(path.parent.parent if path.parent.name == CHECKPOINTS else path.parent)

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST

    @property
    def stain_reference(self) -> Path:
        return self.checkpoints / STAIN_REFERENCE

    @property
    def reports(self) -> Path:
        return self.root / REPORTS

    @property
    def best_json(self) -> Path:
        return self.reports / BEST_JSON

    @property
    def summary_md(self) -> Path:
        return self.reports / SUMMARY_MD

    def report(self, name: str) -> Path:
        """A file of the run's report folder (`reports/<name>`)."""
        return self.reports / name

    @property
    def config_resolved(self) -> Path:
        return self.root / CONFIG_RESOLVED

    @property
    def mlflow_run(self) -> Path:
        return self.root / MLFLOW_RUN

    @property
    def mlflow_buffer(self) -> Path:
        return self.root / MLFLOW_BUFFER

    @property
    def mlflow_model_deferred(self) -> Path:
        return self.root / MLFLOW_MODEL_DEFERRED

    @property
    def hydra(self) -> Path:
        return self.root / HYDRA

    @property
    def hydra_config(self) -> Path:
        return self.hydra / HYDRA_CONFIG

    @property
    def hydra_overrides(self) -> Path:
        return self.hydra / HYDRA_OVERRIDES

    @property
    def lock(self) -> Path:
        """The advisory lock a running run holds (runtime.runlock); not an output of the run:
        overwrite keeps it, and no check takes its presence for an earlier run."""
        return self.root / LOCK

    @property
    def run_outputs(self) -> tuple[Path, ...]:
        """What `trainer.overwrite=true` removes: the files that belong to the earlier run."""
        return tuple(self.root / name for name in RUN_OUTPUTS)


#: What `trainer.overwrite=true` removes: the files that belong to the earlier run.
RUN_OUTPUTS = (CHECKPOINTS, REPORTS, MLFLOW_RUN, MLFLOW_MODEL_DEFERRED)
#: The same layout inside a training run's MLflow artifacts, as relative paths: `artifact(
#: ARTIFACTS.best)` is "checkpoints/best.pt". `.hydra/` is the one exception, logged as `hydra/`.
ARTIFACTS = RunDir(Path())
HYDRA_ARTIFACT = "hydra"


def artifact(path: Path) -> str:
    """An ARTIFACTS path as MLflow names it (forward slashes, relative)."""
    return path.as_posix()


@dataclass
class ResumePlan:
    """The checkpoint to continue from (None: a fresh start) and what was checked about it."""

    path: Path | None
    continue_run: bool  # resume=auto: continue the run directory's MLflow run too
    data_fingerprint: str | None = None  # the checkpoint's, compared once the data is built
    forced_changes: list[str] = field(default_factory=list)  # resume_force=true: recorded


def existing_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint an earlier run left in `run_dir` (last.pt, else best.pt)."""
    run = RunDir(run_dir)
    return next((p for p in (run.last, run.best) if p.is_file()), None)


def refuse_a_training_run(out: Path, command: str) -> None:
    """A command that writes its own reports/ and .hydra/ into `out` (her2exp-eval) is refused
    where a training run lives (its checkpoints/ or config_resolved.yaml): it would replace the
    run's summary, predictions, model card and Hydra record. Asked before Hydra writes."""
    run = RunDir(Path(out))
    found = [p.name for p in (run.checkpoints, run.config_resolved) if p.exists()]
    if found:
        raise ConfigError(
            f"output directory {run.root} holds a training run ({', '.join(found)}): {command} "
            "would replace its reports/ and .hydra/; leave hydra.run.dir to its default (a new "
            "folder) or choose another"
        )


def find_latest(run_dir: Path) -> Path | None:
    """`trainer.resume=auto`: the run directory's last.pt, if a previous attempt left one."""
    last = RunDir(run_dir).last
    return last if last.is_file() else None


def remove_stale_temps(run_dir: Path) -> None:
    """Temporary files of checkpoint writes that a killed attempt never finished. Rank 0 only,
    once it holds the run directory's lock (runtime.runlock): another start's writer may be
    mid-write until then, and plan, which runs before the lock, only reads."""
    for stale in RunDir(run_dir).checkpoints.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def plan(cfg: DictConfig, run_dir: Path, restarts: int, is_main: bool = True) -> ResumePlan:
    """Resolve `trainer.resume` against what `run_dir` holds; refuse what would lose or mix runs.

    Pure reads: every rank decides the same, the parent of spawned workers can decide first,
    and her2exp-train's check before Hydra writes anything (training.run.check_start) asks it
    too; the stale temporary files of a killed attempt are removed later, under the run's lock
    (remove_stale_temps).
    """
    t = cfg.trainer
    resume = t.resume
    if resume is None and restarts > 0:  # torchrun --max-restarts brought the group back
        log.info("torchrun restart %d: resuming from the run directory's last checkpoint", restarts)
        resume = "auto"
    if not t.overwrite:
        check_last_is_a_file(RunDir(run_dir))
    if resume is None:
        found = existing_checkpoint(run_dir)
        if found is not None and not t.overwrite:
            how = "trainer.resume=auto continues it, " if found == RunDir(run_dir).last else ""
            raise ConfigError(
                f"hydra.run.dir={run_dir} holds the checkpoint {found} of an earlier run: "
                f"{how}trainer.overwrite=true replaces it (its checkpoints and reports are "
                "removed), or choose another hydra.run.dir"
            )
        return ResumePlan(None, False)
    if resume == "auto":
        path = find_latest(run_dir)
        if path is None:
            return _fresh_or_refused(run_dir, t.overwrite)
    else:
        path = Path(resume)
        if not path.is_file():
            raise ConfigError(f"trainer.resume={resume}: no such file (a last.pt, or auto)")
    stored = _stored(path, verify=is_main)
    changes = config_changes(stored.get("config"), cfg)
    if changes and not t.resume_force:
        raise ConfigError(
            f"trainer.resume: {path} was trained with another experiment; changed: "
            f"{'; '.join(changes)}. Resume with the checkpoint's settings, start another "
            "hydra.run.dir, or trainer.resume_force=true to continue anyway (recorded in MLflow)"
        )
    if changes:
        log.warning("trainer.resume_force=true: resuming %s despite: %s", path, "; ".join(changes))
    return ResumePlan(path, resume == "auto", stored.get("data_fingerprint"), changes)


def finished_run(run_dir: Path) -> list[Path]:
    """What marks `run_dir` as holding a run that got as far as a best epoch (best.pt) or its
    final summary (reports/best.json). Files alone: cheap, and the same answer on every rank."""
    run = RunDir(run_dir)
    return [p for p in (run.best, run.best_json) if p.is_file()]


def check_last_is_a_file(run: RunDir) -> None:
    """A `last.pt` that is a directory (or a socket, a fifo) is no checkpoint: resume=auto
    would start fresh over the run's best.pt and then fail to write last.pt, so: refused."""
    last = run.last
    if last.exists() and not last.is_file():
        raise ConfigError(
            f"{last} is not a file (a directory?): it cannot be resumed from or written; "
            "move it away, or trainer.overwrite=true to replace the run in "
            f"hydra.run.dir={run.root}"
        )


def _fresh_or_refused(run_dir: Path, overwrite: bool) -> ResumePlan:
    """resume=auto without a last.pt: a fresh start, unless the directory holds a run that got
    further than its first epoch (last.pt deleted to save space: it cannot be resumed, and
    training into it would replace its best.pt, reports and finished MLflow run)."""
    finished = finished_run(run_dir)
    if finished and not overwrite:
        names = ", ".join(str(p.relative_to(run_dir)) for p in finished)
        raise ConfigError(
            f"hydra.run.dir={run_dir} holds an earlier run ({names}) but no {LAST} to resume "
            "from: trainer.resume=auto cannot continue it; trainer.overwrite=true replaces it "
            "(its checkpoints, reports and MLflow link are removed), or choose another "
            "hydra.run.dir"
        )
    if finished:  # trainer.overwrite=true: build_runtime clears it, a new MLflow run starts
        return ResumePlan(None, False)
    log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", run_dir)
    return ResumePlan(None, True)


#: The checkpoints whose checksum this process has checked, as (path, inode, size, mtime) of
#: the file and its sidecar: her2exp-train's pre-check and build_runtime read it once.
_VERIFIED: set[tuple[object, ...]] = set()


def _verify_once(path: Path) -> None:
    def stamp(p: Path) -> tuple[object, ...]:
        st = p.stat() if p.exists() else None
        return (str(p.resolve()), st and st.st_ino, st and st.st_size, st and st.st_mtime_ns)

    key = stamp(path) + stamp(checkpoint.checksum_path(path))
    if key not in _VERIFIED:
        checkpoint.verify(path)
        _VERIFIED.add(key)


def _stored(path: Path, verify: bool = True) -> dict[str, Any]:
    """The checkpoint's config and data fingerprint; a damaged file is the user's to fix.

    Memory-mapped, so only the small pickled part is read. Rank 0 alone checks the checksum
    (a pass over the whole file): eight ranks hashing a 17 GB last.pt at once would only
    repeat its answer."""
    try:
        if verify:
            _verify_once(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except checkpoint.CheckpointCorruptError as exc:
        raise ConfigError(f"trainer.resume: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one line naming it
        raise ConfigError(
            f"trainer.resume: {path} is not a her2exp checkpoint that loads "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(state, dict) or "epoch" not in state:
        raise ConfigError(f"trainer.resume: {path} is not a last.pt (it has no training state)")
    return {k: state.get(k) for k in ("config", "data_fingerprint")}


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _free(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in EXPERIMENT_FREE)


def config_changes(stored_yaml: str | None, cfg: DictConfig) -> list[str]:
    """`key: old -> new` for every key both configs have that alters the experiment (an option
    only one her2exp version knows cannot be compared; nor can a checkpoint without a config)."""
    if not stored_yaml:
        return []
    old = _flat(yaml.safe_load(stored_yaml) or {})
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - ${hydra:...} outside a Hydra run: keys stay unresolved
        container = OmegaConf.to_container(cfg, resolve=False)
    new = _flat(container)
    changes = []
    for key in sorted(set(old) & set(new)):
        before, after = old[key], new[key]
        if _free(key) or (key in ("data.mean", "data.std") and after is None):
            continue  # mean/std null: the model's own, resolved into the stored config
        if before != after:
            changes.append(f"{key}: {before!r} -> {after!r}")
    return changes


def check_data(resume: ResumePlan, built: str, force: bool) -> None:
    """The data a resume trains on must be the data the checkpoint saw (same files, labels and
    split): refused otherwise, unless `trainer.resume_force=true` (then recorded)."""
    stored = resume.data_fingerprint
    if resume.path is None or stored is None or stored == built:
        return
    message = (
        f"{resume.path} was trained on other data (fingerprint {stored[:12]}..., now "
        f"{built[:12]}...: files, labels, split or data seed changed)"
    )
    if not force:
        raise ConfigError(
            f"trainer.resume: {message}; resume on the same data, or trainer.resume_force=true "
            "to continue anyway"
        )
    log.warning("trainer.resume_force=true: %s", message)
    resume.forced_changes.append(f"data fingerprint: {stored[:12]}... -> {built[:12]}...")


def clear_earlier_run(run_dir: Path) -> list[str]:
    """`trainer.overwrite=true` (rank 0): remove the earlier run's checkpoints, reports and
    MLflow link. Calls it still had queued for MLflow are not thrown away silently: refused."""
    buffer = RunDir(run_dir).mlflow_buffer
    if buffer.is_file() and buffer.stat().st_size > 0:
        raise ConfigError(
            f"trainer.overwrite=true: {buffer} still holds MLflow calls of the earlier run that "
            f"never reached the server; send them first (her2exp-sync input={run_dir}) or "
            "delete the file"
        )
    removed = []
    for name in RUN_OUTPUTS:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        log.warning("trainer.overwrite=true: removed the earlier run's %s", ", ".join(removed))
    return removed
