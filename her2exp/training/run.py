"""The composition root of one training run: the builders of builders.py wired in order.

Three layers, as in lightning-hydra-template: `train(cfg)` does the work and returns a summary;
`run(cfg)` starts `trainer.nproc_per_node` workers when asked; `her2exp.cli.train.main` is the
Hydra entry point (`her2exp-train`, `python -m her2exp.train`, `torchrun -m her2exp.train`).
docs/architecture.md follows one run through these steps.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from her2exp import models, tracking
from her2exp.config import ConfigError, register_configs, validate
from her2exp.core import progress
from her2exp.engine import explain
from her2exp.runtime import distributed, rundir, runlock
from her2exp.runtime.hydra_run import HydraRun
from her2exp.runtime.rundir import RunDir
from her2exp.training import builders, probe
from her2exp.training.builders import DataParts, Runtime
from her2exp.training.final import final_evaluation
from her2exp.training.trainer import FitResult

log = logging.getLogger("her2exp")
register_configs()
distributed.register_resolvers()
# conf/ sits beside the package; an absolute path works for the console script,
# `python -m her2exp.train` and torchrun alike.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def train(cfg: DictConfig, hydra: HydraRun | None = None) -> dict[str, Any]:
    """Train, pick the best epoch on val AUC, score test at the val-chosen thresholds.

    `hydra`: the command's Hydra facts, read once by `run` (None: composed without Hydra)."""
    hydra = HydraRun() if hydra is None else hydra
    with progress.quiet(not cfg.trainer.progress):  # trainer.progress=false: no bar of the run
        runtime = builders.build_runtime(cfg)
        with runtime.lock:  # rank 0 holds the run directory until the run ends, however it ends
            return _train(cfg, hydra, runtime)


def _train(cfg: DictConfig, hydra: HydraRun, runtime: Runtime) -> dict[str, Any]:
    """train's work, inside the run directory's lock."""
    model = builders.build_model(cfg, runtime.dctx)  # resolves data.mean/std into cfg
    parts = builders.build_data(cfg, runtime.dctx)
    rundir.check_data(runtime.resume, parts.bundle.fingerprint, cfg.trainer.resume_force)
    wrapped = builders.wrap_model(cfg, model, runtime.dctx)
    tracker = builders.build_tracker(cfg, runtime)
    status, summary = "FAILED", {}
    try:
        builders.start_tracking(tracker, cfg, runtime, parts, model, hydra)
        if cfg.model.cache_features:
            builders.use_cached_features(cfg, parts, model, runtime, tracker)
        trainer = builders.build_trainer(cfg, runtime, parts, wrapped, tracker)
        builders.record_stain(parts, runtime, tracker)
        if runtime.resume.path:
            trainer.resume_from(runtime.resume.path)
            tracker.log_history(trainer.history)  # the resumed run shows the whole curve
        fit = probe.fit_knn(trainer, parts) if cfg.model.head == "knn" else trainer.fit()
        summary = fit_summary(cfg, fit, parts, runtime, tracker)
        if fit.interrupted:
            status = "KILLED"
            return interrupted(summary, fit, runtime, tracker, hydra)
        model.load_state_dict(fit.best_state)
        summary.update(
            final_evaluation(
                cfg,
                parts,
                trainer.validator,
                model,
                fit.threshold_youden_val,
                tracker,
                runtime.run_dir,
                summary,
                runtime.dctx.is_main,
                hydra.overrides,
            )
        )
        status = "FINISHED"
        summary["tracking_errors"] = list(tracker.errors)
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as exc:
        tracker.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        raise
    finally:
        tracker.end(status)
        if tracker.deferred_note:
            summary["tracking_deferred"] = tracker.deferred_note
        distributed.teardown()


def fit_summary(
    cfg: DictConfig, fit: FitResult, parts: DataParts, runtime: Runtime, tracker: tracking.Tracker
) -> dict[str, Any]:
    """What the fit decided, for the console, best.json and a sweeper."""
    if cfg.trainer.on_nonfinite == "skip":
        tracker.log_metrics({"nonfinite_steps_skipped": fit.nonfinite_steps})
    return {
        "model": cfg.model.name,
        "best_epoch": fit.best_epoch,
        "last_epoch": fit.last_epoch,
        "best_val_auc": fit.best_val_auc,
        "threshold_youden_val": fit.threshold_youden_val,
        "stopped_early": fit.stopped_early,
        "data_fingerprint": parts.bundle.fingerprint,
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": tracker.uri,
        "run_dir": str(runtime.run_dir.resolve()),
        "nonfinite_steps_skipped": fit.nonfinite_steps,
        **builders.describe(parts),
    }


def interrupted(
    summary: dict[str, Any],
    fit: FitResult,
    runtime: Runtime,
    tracker: tracking.Tracker,
    hydra: HydraRun,
) -> dict[str, Any]:
    """Stopped by a signal or trainer.stop_after_epoch: say how to resume, in MLflow too."""
    last = RunDir(runtime.run_dir).last.resolve()
    command = builders.resume_command(runtime.run_dir, list(hydra.overrides))
    tags = {
        "interrupted_after_epoch": fit.last_epoch,
        "resume_with": last,
        "resume_command": command,
    }
    if fit.stop_signal is not None:
        tags["stop_signal"] = signal.Signals(fit.stop_signal).name
        summary["stop_signal"] = fit.stop_signal
    tracker.set_tags(tags)
    summary.update({"interrupted": True, "resume_command": command})
    if runtime.dctx.is_main:
        print(
            f"her2exp: stopped after epoch {fit.last_epoch} (checkpoint {last}); "
            f"resume with: {command}"
        )
    return summary


def _worker(container: dict[str, Any], hydra: HydraRun) -> dict[str, Any]:
    """Entry point of each worker started by `trainer.nproc_per_node=N` (spawned: no Hydra of
    its own; the parent's HydraRun is handed over)."""
    cfg = OmegaConf.create(container)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format=f"[%(asctime)s][rank {distributed.env_rank()}][%(name)s][%(levelname)s] - %(message)s",
        handlers=[
            logging.StreamHandler(),
            logging.FileHandler(run_dir / distributed.rank_log_name("train")),
        ],
    )
    try:
        return train(cfg, hydra)
    except ConfigError as exc:
        if distributed.env_rank() == 0:
            print(f"her2exp: {exc}", file=sys.stderr)
        raise


def check_start(cfg: DictConfig) -> None:
    """What her2exp-train refuses before Hydra's run creates or writes anything (cli/train.py's
    start_check): every value, a model name timm does not know, and what the run directory
    holds (rundir.plan, read only: an earlier run's checkpoint without trainer.resume, a
    changed experiment on resume, a missing or damaged resume checkpoint, a finished run
    without last.pt), a run directory another process's run holds (runlock.check_free), and
    a SQLite store that cannot be used (builders.check_local_store: reads only).
    build_runtime asks it all again on every rank and takes the lock; the checksum of an
    unchanged checkpoint is not read twice."""
    validate(cfg)
    models.check_model_name(cfg.model.name)
    if cfg.tracking.backend == "mlflow" and distributed.env_rank() == 0:
        builders.check_local_store(cfg.tracking.uri)  # unwritable, not a database: nothing made
    quiet = logging.getLogger("her2exp")
    before, quiet.disabled = quiet.disabled, True  # the run logs the plan, once configured
    try:
        rundir.plan(
            cfg,
            Path(cfg.output_dir),
            distributed.restart_count(),
            distributed.env_rank() == 0,
        )
    finally:
        quiet.disabled = before
    if distributed.env_rank() == 0:  # the other ranks of a launch start once rank 0 holds it
        runlock.check_free(Path(cfg.output_dir))  # another start's run: leave its .hydra/ alone


def run(cfg: DictConfig, hydra: HydraRun | None = None) -> dict[str, Any]:
    """Train in this process, under torchrun, or by starting `trainer.nproc_per_node` workers.

    `hydra`: Hydra's runtime config as the command's entry read it (cli.train.main:
    `HydraRun.current()`), passed down - the workers started below have none of their own; None
    for a config composed without Hydra (tests, notebooks, her2exp-rerun, whose run records the
    original's overrides, not its own command line)."""
    hydra = HydraRun() if hydra is None else hydra
    # evaluation.explain: off in a sweep unless asked for, before the config is copied.
    explain.resolve_sweep_default(cfg, hydra)
    n = cfg.trainer.nproc_per_node
    if n > 1 and not distributed.under_launcher():
        validate(cfg)  # fail in the parent, before any worker starts
        run_dir = Path(cfg.output_dir)
        rundir.plan(cfg, run_dir, distributed.restart_count())
        # The parent holds the run directory while its workers run, and tells them so.
        with runlock.acquire(run_dir):
            container = OmegaConf.to_container(cfg, resolve=True)  # resolvers don't cross spawn
            log.info("starting %d workers (trainer.nproc_per_node)", n)
            held = {runlock.HELD_ENV: str(run_dir.resolve())}
            with distributed.env(**tracking.export_sweep_context(hydra), **held):
                return distributed.launch(
                    _worker, n, (container, hydra), run_dir, cfg.trainer.dist_timeout_s
                )
    return train(cfg, hydra)
