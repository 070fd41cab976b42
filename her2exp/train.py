"""`her2exp-train`: compose the config, wire the parts, return the best validation AUC.

Three layers, as in lightning-hydra-template: `train(cfg)` does the work and returns a summary;
`main` is the Hydra entry point that turns configuration errors into one readable line and
returns the objective a Hydra sweeper maximises.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from her2exp import (
    checkpoint,
    data,
    distributed,
    features,
    losses,
    metrics,
    models,
    reports,
    tracking,
)
from her2exp.config import ConfigError, register_configs, validate
from her2exp.evaluate import ScoredSplit, format_table, report_cohorts
from her2exp.seed import set_seed
from her2exp.stain import pipeline as stain_pipeline
from her2exp.stain.pipeline import StainCollate
from her2exp.trainer import Trainer, resolve_amp

log = logging.getLogger("her2exp")
register_configs()
distributed.register_resolvers()
# conf/ sits beside the package (see DESIGN.md); an absolute path works for the console script,
# `python -m her2exp.train` and torchrun alike.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _hydra_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        return []


def check_input_size(model: torch.nn.Module, image_size: int, name: str, device) -> None:
    """One dummy forward so a patch size the model cannot take fails now, not after the data
    is built (too small for a CNN; not the fixed input size of a ViT without dynamic_img_size)."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, image_size, image_size, device=device))
    except (RuntimeError, AssertionError, ValueError) as exc:
        backbone = getattr(model, "backbone", model)
        native = getattr(backbone, "pretrained_cfg", {}).get("input_size")
        hint = f" (its input size is {native[-1]} px)" if native else ""
        raise ConfigError(
            f"data.image_size={image_size} does not fit model.name={name}{hint}: {exc}"
        ) from exc
    if out.shape != (1, 2):
        raise ConfigError(f"model.name={name} returned shape {tuple(out.shape)}, expected (1, 2)")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, pick the best epoch on val AUC, score test at the val-chosen threshold."""
    validate(cfg)
    models.check_model_name(cfg.model.name)
    dctx = distributed.init(cfg.trainer.device, cfg.trainer.dist_timeout_s)
    if cfg.trainer.sync_bn and dctx.device.type != "cuda":
        raise ConfigError(
            "trainer.sync_bn=true is not allowed here: SyncBatchNorm needs CUDA (PyTorch has no "
            "gloo/CPU implementation); use trainer.sync_bn=false"
        )
    set_seed(cfg.seed + dctx.rank, deterministic=cfg.trainer.deterministic)
    run_dir = Path(cfg.output_dir)
    if dctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    model = models.build(cfg.model, dctx.device)
    # data.mean/std null: the model's own normalisation, written into the config so that
    # checkpoints, MLflow params and evaluation all carry the values actually used.
    mean, std = models.normalisation(model)
    cfg.data.mean = list(cfg.data.mean) if cfg.data.mean is not None else mean
    cfg.data.std = list(cfg.data.std) if cfg.data.std is not None else std
    check_input_size(model, cfg.data.image_size, cfg.model.name, dctx.device)
    try:
        bundle = data.build(cfg.data, cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from exc
    train_set = data.make_dataset(bundle, "train", cfg.data, cfg.seed)
    val_set = data.make_dataset(bundle, "val", cfg.data, cfg.seed)
    test_set = data.make_dataset(bundle, "test", cfg.data, cfg.seed)
    try:
        stain = stain_pipeline.build(cfg.stain, bundle.images[bundle.indices("train")], cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"stain: {exc}") from exc
    on_device = stain is not None and cfg.stain.on_device
    if on_device:
        stain.to(dctx.device)

    def collate(ds: Any, is_train: bool) -> Any:
        return None if stain is None or on_device else StainCollate(stain, is_train, ds)

    train_loader = data.train_loader(
        train_set, cfg.data, cfg.seed, dctx.rank, dctx.world_size, dctx.device,
        collate(train_set, True),
    )  # fmt: skip
    shard = (dctx.rank, dctx.world_size)
    val_loader = data.eval_loader(val_set, cfg.data, dctx.device, *shard, collate(val_set, False))
    test_loader = data.eval_loader(
        test_set, cfg.data, dctx.device, *shard, collate(test_set, False)
    )
    criterion = losses.build(cfg.loss, bundle.labels("train")).to(dctx.device)
    cache_features = bool(cfg.model.cache_features)
    if cache_features:  # the head trains on cached embeddings; the backbone never runs again
        train_model, no_sync = distributed.wrap_ddp(model.head, dctx)
    elif cfg.model.compile_before_ddp:
        train_model, no_sync = distributed.wrap_ddp(
            models.maybe_compile(model, cfg.model), dctx, cfg.trainer.sync_bn
        )
    else:
        train_model, no_sync = distributed.wrap_ddp(model, dctx, cfg.trainer.sync_bn)
        train_model = models.maybe_compile(train_model, cfg.model)

    resume = cfg.trainer.resume
    restarts = distributed.restart_count()
    if resume is None and restarts > 0:  # torchrun --max-restarts brought the group back
        log.info("torchrun restart %d: resuming from the run directory's last checkpoint", restarts)
        resume = "auto"
    continue_run = resume == "auto"  # same run directory: continue its MLflow run too
    if resume == "auto":
        resume = checkpoint.find_latest(run_dir)
        if resume is None:
            log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", run_dir)

    try:
        tracker = tracking.build(cfg.tracking, dctx.is_main)
    except tracking.TrackingUnavailable as exc:
        raise ConfigError(str(exc)) from exc
    status = "FAILED"
    summary: dict[str, Any] = {}
    try:
        tags = tracking.run_tags(
            cfg, dctx.device, dctx.world_size, dctx.backend, _hydra_overrides(), bundle.fingerprint,
            model.weights_info,
        )  # fmt: skip
        tags["run_dir"] = str(run_dir.resolve())
        counts = bundle.counts()
        for split, c in counts.items():
            tags[f"data.{split}"] = f"{c['her2_pos']} HER2+ / {c['her2_neg']} HER2-"
        if resume:
            tags["resumed_from"] = str(resume)
        if restarts:
            tags["torchelastic_restart_count"] = str(restarts)
        tracker.start(cfg, tags, run_dir=run_dir, continue_run=continue_run)
        tracker.log_dataset(bundle.manifest, cfg.data.source, bundle.fingerprint, counts)
        if len(bundle.skipped) and dctx.is_main:  # data.on_bad_file=skip: what was left out
            reports.atomic_write_text(
                run_dir / "skipped_files.csv", bundle.skipped.to_csv(index=False)
            )
            tracker.log_artifact(run_dir / "skipped_files.csv", "data")
        cached = None
        if cache_features:
            cached, (train_loader, val_loader, test_loader) = _feature_loaders(
                cfg, model, bundle, run_dir, dctx, stain, tracker
            )
        trainer = Trainer(
            cfg, model, train_model, criterion, train_loader, val_loader, dctx, tracker, run_dir,
            no_sync, stain if on_device else None, features=cache_features,
        )  # fmt: skip
        if stain is not None and stain.normalizer is not None and dctx.is_main:
            _record_stain(stain, run_dir, tracker)
            _count_stain_skips(stain, bundle, tracker)
        if resume:
            trainer.resume_from(resume)
            tracker.log_history(trainer.history)  # the resumed run shows the whole curve
        fit = trainer.fit()

        summary.update({
            "model": cfg.model.name,
            "best_epoch": fit.best_epoch,
            "last_epoch": fit.last_epoch,
            "best_val_auc": fit.best_val_auc,
            "threshold_youden_val": fit.threshold_youden_val,
            "stopped_early": fit.stopped_early,
            "data_fingerprint": bundle.fingerprint,
            "mlflow_run_id": tracker.run_id,
            "tracking_uri": tracker.uri,
            "run_dir": str(run_dir.resolve()),
            "nonfinite_steps_skipped": fit.nonfinite_steps,
        })  # fmt: skip
        if cfg.trainer.on_nonfinite == "skip":
            tracker.log_metrics({"nonfinite_steps_skipped": fit.nonfinite_steps})
        if cached is not None:
            summary["feature_cache"] = {"key": cached.key, "dir": str(cached.directory),
                                        "computed": cached.computed, "reused": cached.reused,
                                        "seconds": cached.seconds}  # fmt: skip
        if fit.interrupted:
            status = "KILLED"
            last = (run_dir / "checkpoints" / "last.pt").resolve()
            command = resume_command(run_dir)
            tags = {"interrupted_after_epoch": fit.last_epoch, "resume_with": last,
                    "resume_command": command}  # fmt: skip
            if fit.stop_signal is not None:
                tags["stop_signal"] = signal.Signals(fit.stop_signal).name
                summary["stop_signal"] = fit.stop_signal
            tracker.set_tags(tags)
            summary["interrupted"] = True
            summary["resume_command"] = command
            if dctx.is_main:
                print(f"her2exp: stopped after epoch {fit.last_epoch} (checkpoint {last}); "
                      f"resume with: {command}")  # fmt: skip
            return summary

        model.load_state_dict(fit.best_state)
        summary.update(final_evaluation(cfg, bundle, val_loader, test_loader, trainer,
                                        fit.threshold_youden_val, tracker, run_dir, summary,
                                        dctx.is_main, stain))  # fmt: skip
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


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run in place (what a requeued job runs)."""
    keep = [o for o in _hydra_overrides()
            if not o.startswith(("trainer.resume=", "hydra.run.dir="))]  # fmt: skip
    prog = "her2exp-train" if not distributed.under_launcher() else "torchrun ... -m her2exp.train"
    return " ".join([prog, *keep, "trainer.resume=auto", f"hydra.run.dir={run_dir.resolve()}"])


def final_evaluation(
    cfg: DictConfig,
    bundle: data.DataBundle,
    val_loader,
    test_loader,
    trainer: Trainer,
    threshold: float,
    tracker: tracking.Tracker,
    run_dir: Path,
    summary: dict[str, Any],
    is_main: bool,
    stain: Any = None,
) -> dict[str, Any]:
    """Best weights scored on val (where the operating points are chosen, then frozen) and on
    test at those frozen thresholds, through the one evaluation path of evaluate.py."""
    val = trainer.evaluate_all(val_loader)
    test = trainer.evaluate_all(test_loader)
    thresholds = metrics.operating_points(val.labels, val.probs, cfg.evaluation.target_sensitivity)
    if abs(thresholds["youden"] - threshold) > 1e-9:  # same weights, same val: must agree
        raise RuntimeError(f"Youden threshold drifted: {thresholds['youden']} vs {threshold}")
    out: dict[str, Any] = {"thresholds": thresholds}
    if not is_main:
        return out
    scored = [
        ScoredSplit(
            split,
            bundle.manifest.iloc[bundle.indices(split)].reset_index(names="row"),
            s.probs,
            bundle.images[bundle.indices(split)],
        )  # fmt: skip
        for split, s in (("val", val), ("test", test))
    ]
    for split, s in zip(scored, (val, test), strict=True):
        if not np.array_equal(split.labels, s.labels):
            raise RuntimeError("gathered scores are not in dataset order")
    git = tracking.git_info()
    header = {
        **summary,
        "seed": cfg.seed,
        "git_commit": git["git_commit"],
        "git_dirty": git["git_dirty"],
        "test_loss": test.loss,
    }
    evs = report_cohorts(scored, thresholds, cfg.evaluation, run_dir / "reports", tracker,
                         header, cfg.seed)  # fmt: skip
    tracker.log_metrics(
        {
            "best_epoch": summary["best_epoch"],
            "best_val_auc": summary["best_val_auc"],
            "threshold_youden_val": threshold,
            "test_loss": test.loss,
        }
    )
    best_ckpt = run_dir / "checkpoints" / "best.pt"
    if best_ckpt.is_file():  # freeze the operating points into the model file evaluations load
        state = checkpoint.load(best_ckpt)
        state["thresholds"] = thresholds
        state["stain"] = None if stain is None else stain.state_dict()
        checkpoint.save(state, best_ckpt)
    reports.atomic_write_text(
        run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True)
    )
    tracker.log_artifact(run_dir / "config_resolved.yaml")
    tracker.log_artifact(run_dir / ".hydra", "hydra")
    if cfg.tracking.get("log_checkpoint", True) and best_ckpt.is_file():
        tracker.log_artifact(best_ckpt, "checkpoints")
    if cfg.tracking.get("log_model", True):
        size = cfg.data.image_size
        tracker.log_model(
            trainer.model.eval(),
            np.zeros((1, 3, size, size), dtype=np.float32),
            {
                "thresholds": thresholds,
                "class_names": ["HER2-", "HER2+"],
                "output": "logits; softmax column 1 is P(HER2+)",
                "image_size": size,
                "mean": list(cfg.data.mean),
                "std": list(cfg.data.std),
                "backbone_weights": dict(getattr(trainer.model, "weights_info", {})),
            },
        )
    out.update({"val_evaluation": evs["val"], "test_evaluation": evs["test"],
                "test_auc": evs["test"].auc.auc})  # fmt: skip
    return out


def _feature_loaders(
    cfg: DictConfig,
    model: models.Her2Classifier,
    bundle: data.DataBundle,
    run_dir: Path,
    dctx: distributed.DistContext,
    stain: Any,
    tracker: tracking.Tracker,
) -> tuple[features.CachedFeatures, tuple[Any, Any, Any]]:
    """model.cache_features: embed every image once (or read the cache), then loaders over the
    embeddings with the same batches and shuffling as the image loaders."""
    # Only the head is DDP-wrapped (and so synchronised): every rank must embed with rank 0's
    # backbone, or a random-init backbone would differ per rank (seeded seed + rank).
    distributed.broadcast_module_state(model)
    root = Path(cfg.model.feature_cache_dir or run_dir / "features").expanduser()
    autocast_dtype, _ = resolve_amp(cfg.trainer.amp, dctx.device)
    cached = features.build(model, bundle, cfg, root, dctx, autocast_dtype, stain)
    tracker.set_tags({"features.cache_key": cached.key, "features.dir": cached.directory})
    tracker.log_metrics({"features_computed": cached.computed, "features_reused": cached.reused,
                         "feature_seconds": cached.seconds})  # fmt: skip
    fcfg = features.loader_config(cfg.data)
    sets = {
        s: features.FeatureDataset(cached.features[s], bundle.labels(s)) for s in features.SPLITS
    }
    shard = (dctx.rank, dctx.world_size)
    return cached, (
        data.train_loader(sets["train"], fcfg, cfg.seed, *shard, dctx.device),
        data.eval_loader(sets["val"], fcfg, dctx.device, *shard),
        data.eval_loader(sets["test"], fcfg, dctx.device, *shard),
    )


def _record_stain(stain: Any, run_dir: Path, tracker: tracking.Tracker) -> None:
    """The fitted Macenko reference, saved with the run and logged, so evaluation reuses it."""
    state = stain.state_dict()
    path = checkpoint.save(state, run_dir / "checkpoints" / "stain_reference.pt")
    tracker.log_artifact(path, "stain")
    ref = state["normalizer"]
    tags = {}
    for key in ("stain_matrix", "max_concentrations", "stains", "max_conc"):
        if key in ref and hasattr(ref[key], "tolist"):
            tags[f"stain.reference.{key}"] = str([round(float(v), 4) for v in ref[key].flatten()])
    tracker.set_tags(tags)


def _count_stain_skips(stain: Any, bundle: data.DataBundle, tracker: tracking.Tracker) -> None:
    """Patches returned unchanged (too little tissue, degenerate stains), counted per split."""
    counts = {}
    for split in ("train", "val", "test"):
        images = torch.from_numpy(bundle.images[bundle.indices(split)]).permute(0, 3, 1, 2)
        skipped = 0
        for i in range(0, len(images), 256):
            skipped += stain.normalizer.normalize(images[i : i + 256])[1].n_skipped
        counts[f"stain_skipped_{split}"] = skipped
    tracker.log_metrics(counts)
    log.info("stain normalisation left unchanged: %s", counts)


def _worker(container: dict[str, Any]) -> dict[str, Any]:
    """Entry point of each worker started by `trainer.nproc_per_node=N` (spawned: no Hydra)."""
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
        summary = train(cfg)
    except ConfigError as exc:
        if distributed.env_rank() == 0:
            print(f"her2exp: configuration error: {exc}", file=sys.stderr)
        raise
    return summary


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train in this process, under torchrun, or by starting `trainer.nproc_per_node` workers."""
    n = cfg.trainer.nproc_per_node
    if n > 1 and not distributed.under_launcher():
        validate(cfg)  # fail in the parent, before any worker starts
        container = OmegaConf.to_container(cfg, resolve=True)  # resolvers don't cross spawn
        log.info("starting %d workers (trainer.nproc_per_node)", n)
        with distributed.env(**tracking.export_sweep_context()):
            return distributed.launch(
                _worker, n, (container,), Path(cfg.output_dir), cfg.trainer.dist_timeout_s
            )
    return train(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        summary = run(cfg)
    except ConfigError as exc:
        if distributed.env_rank() == 0:
            print(f"her2exp: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except checkpoint.CheckpointWriteError as exc:
        print(f"her2exp: disk full: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as exc:
        if exc.errno not in checkpoint.FULL_DISK_ERRNOS:
            raise
        print(f"her2exp: disk full: {exc}; the checkpoints in {cfg.output_dir}/checkpoints are "
              "intact: free space and resume with trainer.resume=auto", file=sys.stderr)  # fmt: skip
        raise SystemExit(1) from None
    if summary.get("stop_signal"):  # pre-empted: non-zero, as a scheduler expects
        if distributed.env_rank() == 0 and summary.get("tracking_deferred"):
            print(f"her2exp: warning: {summary['tracking_deferred']}", file=sys.stderr)
        raise SystemExit(128 + int(summary["stop_signal"]))
    if distributed.env_rank() != 0:
        return float(summary["best_val_auc"])
    if summary.get("tracking_deferred"):
        print(f"her2exp: warning: {summary['tracking_deferred']}", file=sys.stderr)
    if not summary.get("interrupted"):
        th = summary["thresholds"]
        test = summary["test_evaluation"]
        print(
            f"her2exp: best val AUC {summary['best_val_auc']:.4f} at epoch {summary['best_epoch']}"
            f" | Youden threshold (val) {th['youden']:.4f} | test AUC {test.auc.auc:.4f}"
        )
        print("her2exp: operating points chosen on validation, then frozen: "
              + ", ".join(f"{k}={v:.4f}" for k, v in th.items()))  # fmt: skip
        print(format_table(summary["val_evaluation"], "validation (thresholds chosen here)"))
        print(format_table(test, "test (frozen thresholds)"))
        where = summary["tracking_uri"]
        if where:
            print(f"her2exp: MLflow run {summary['mlflow_run_id']} in {where}")
            print(f"her2exp: rerun from MLflow alone with: her2exp-rerun "
                  f"{summary['mlflow_run_id']} tracking.uri={where}")  # fmt: skip
        print(f"her2exp: run directory {summary['run_dir']}")
        if summary.get("tracking_errors"):
            print(f"her2exp: MLflow logging failed {len(summary['tracking_errors'])} time(s), "
                  f"first: {summary['tracking_errors'][0]}; checkpoints and reports are in the "
                  "run directory", file=sys.stderr)  # fmt: skip
    return float(summary["best_val_auc"])


if __name__ == "__main__":
    main()
