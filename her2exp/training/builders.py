"""The parts of one run, each built by one function and returned as a small typed object.

`train.train` calls these in order (docs/architecture.md, "The data flow of one run"):
runtime -> model -> data -> tracker -> wrapped model -> trainer. Each builder reads the config
groups it needs and nothing else, so a part can be built and tested alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from her2exp import data, models, tracking
from her2exp.config import ConfigError, validate
from her2exp.core import checkpoint
from her2exp.core.seed import set_seed
from her2exp.data import bags as mil_bags
from her2exp.engine import OptimizerUpdate, Preprocess, StepPolicy, features
from her2exp.evaluation.scorer import Scorer
from her2exp.models import losses
from her2exp.runtime import distributed, rundir, runlock
from her2exp.runtime.amp import resolve_amp
from her2exp.runtime.distributed import DistContext
from her2exp.runtime.hydra_run import HydraRun
from her2exp.runtime.rundir import RunDir
from her2exp.stain import pipeline as stain_pipeline
from her2exp.stain.pipeline import StainCollate
from her2exp.tracking.store import require_store, sqlite_file
from her2exp.training.checkpointer import Checkpointer
from her2exp.training.optimizer import build_optimizer
from her2exp.training.trainer import Trainer
from her2exp.training.validator import Validator

log = logging.getLogger("her2exp")


# -- runtime ---------------------------------------------------------------------------------
@dataclass
class Runtime:
    """Where and how this process runs: its rank, the shared run directory, what to resume."""

    dctx: DistContext
    run_dir: Path
    resume: (
        rundir.ResumePlan
    )  # the checkpoint to continue from, checked (her2exp/runtime/rundir.py)
    restarts: int  # torchrun --max-restarts attempts so far
    autocast_dtype: torch.dtype | None
    use_scaler: bool
    lock: runlock.RunLock = field(default_factory=runlock.RunLock)  # rank 0's, for the run

    @property
    def continue_run(self) -> bool:
        """resume=auto: continue the run directory's MLflow run too."""
        return self.resume.continue_run


def build_runtime(cfg: DictConfig) -> Runtime:
    """Validate, resolve `trainer.resume` against what the run directory holds (rundir.plan,
    reads only, so a refused start writes nothing: a torchrun restart resumes its last.pt; an
    earlier run is never overwritten by accident), lock it (rank 0: runtime.runlock), join the
    process group, agree on rank 0's lock answer, seed (seed + rank). The lock is the
    Runtime's: `train` releases it when the run ends."""
    validate(cfg)
    models.check_model_name(cfg.model.name)
    if cfg.tracking.backend == "mlflow" and distributed.env_rank() == 0:
        check_local_store(cfg.tracking.uri)
    run_dir = Path(cfg.output_dir)
    restarts = distributed.restart_count()
    resume = rundir.plan(cfg, run_dir, restarts, distributed.env_rank() == 0)  # reads only
    lock, refusal = runlock.take(run_dir, distributed.env_rank())
    try:
        dctx = distributed.init(cfg.trainer.device, cfg.trainer.dist_timeout_s)
        refusal = distributed.broadcast_object(refusal)  # rank 0 decided: every rank refuses
        if refusal is not None:
            distributed.teardown()
            raise ConfigError(refusal)
        runtime = _runtime(cfg, dctx, run_dir, resume, restarts)
    except BaseException:
        lock.release()
        raise
    runtime.lock = lock
    return runtime


def _runtime(
    cfg: DictConfig, dctx: DistContext, run_dir: Path, resume: rundir.ResumePlan, restarts: int
) -> Runtime:
    """The rest of build_runtime, once the run directory is this run's: the device's checks,
    the seed, the directory (cleared for trainer.overwrite=true), AMP."""
    if cfg.trainer.sync_bn and dctx.device.type != "cuda":
        raise ConfigError(
            "trainer.sync_bn=true is not allowed here: SyncBatchNorm needs CUDA (PyTorch has no "
            "gloo/CPU implementation); use trainer.sync_bn=false"
        )
    set_seed(cfg.seed + dctx.rank, deterministic=cfg.trainer.deterministic)
    if dctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.remove_stale_temps(run_dir)  # the lock is held: no other writer is mid-write
        if resume.path is None and cfg.trainer.overwrite:
            rundir.clear_earlier_run(run_dir)
    dtype, use_scaler = resolve_amp(cfg.trainer.amp, dctx.device)
    return Runtime(dctx, run_dir, resume, restarts, dtype, use_scaler)


def check_local_store(uri: str) -> None:
    """A SQLite store that cannot work (unwritable, not a database) fails now, in one line, not
    after the data is built; a server is probed later, where `tracking.fallback` applies."""
    if sqlite_file(uri) is not None:
        require_store(uri)


# -- model -----------------------------------------------------------------------------------
def build_model(cfg: DictConfig, dctx: DistContext) -> models.Her2Classifier:
    """The backbone + head on the run's device. `data.mean/std` null: the model's own
    normalisation is written into the config here, once, so checkpoints, MLflow params,
    evaluation and predict all carry the values actually used."""
    model = models.build(cfg.model, dctx.device)
    mean, std = models.normalisation(model)
    cfg.data.mean = list(cfg.data.mean) if cfg.data.mean is not None else mean
    cfg.data.std = list(cfg.data.std) if cfg.data.std is not None else std
    check_input_size(model, cfg.data.image_size, cfg.model.name, dctx.device)
    if mil_bags.mil_name(cfg) != "none":  # the bag head replaces the tile head (her2exp/mil)
        mil_bags.attach_head(model, cfg.mil)
    return model


def check_input_size(model: nn.Module, image_size: int, name: str, device: torch.device) -> None:
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


@dataclass
class WrappedModel:
    """What trains (`train_model`: compiled and/or DDP) beside what is saved (`model`)."""

    model: models.Her2Classifier
    train_model: nn.Module
    score_model: nn.Module  # the head alone on cached features, else the model
    no_sync: Callable[[], contextlib.AbstractContextManager] | None


def wrap_model(cfg: DictConfig, model: models.Her2Classifier, dctx: DistContext) -> WrappedModel:
    """DDP (and torch.compile, before or after it). Cached features: only the head trains."""
    if cfg.model.cache_features and not any(p.requires_grad for p in model.head.parameters()):
        return WrappedModel(model, model.head, model.head, None)  # the kNN probe: nothing trains
    if cfg.model.cache_features:
        train_model, no_sync = distributed.wrap_ddp(model.head, dctx)
        return WrappedModel(model, train_model, model.head, no_sync)
    if cfg.model.compile_before_ddp:
        compiled = models.maybe_compile(model, cfg.model)
        train_model, no_sync = distributed.wrap_ddp(compiled, dctx, cfg.trainer.sync_bn)
    else:
        train_model, no_sync = distributed.wrap_ddp(model, dctx, cfg.trainer.sync_bn)
        train_model = models.maybe_compile(train_model, cfg.model)
    return WrappedModel(model, train_model, model, no_sync)


# -- data ------------------------------------------------------------------------------------
@dataclass
class DataParts:
    """The bundle, the fitted stain pipeline, the loaders per split, the criterion and the one
    preprocessing path every batch takes to the model."""

    bundle: data.DataBundle
    stain: stain_pipeline.StainPipeline | None
    loaders: dict[str, torch.utils.data.DataLoader]
    criterion: nn.Module
    preprocess: Preprocess
    cached: features.CachedFeatures | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    bags: dict[str, mil_bags.Bags] | None = None  # mil != none: each split's bags


def build_data(cfg: DictConfig, dctx: DistContext) -> DataParts:
    """Data set and split, stain fitted on train, loaders (train sharded by a sampler, eval in
    exact-once shards), and the criterion weighted on the training labels."""
    try:
        bundle = data.build(cfg.data, cfg.seed)
    except data.splits.FoldError as exc:  # names its own data.split.* keys
        raise ConfigError(str(exc)) from exc
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from exc
    try:
        # A lazy view: fitting decodes only the `fit_patches` rows it samples.
        stain = stain_pipeline.build(cfg.stain, bundle.view("train"), cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"stain: {exc}") from exc
    on_device = stain is not None and cfg.stain.on_device
    if on_device:
        stain.to(dctx.device)
    loaders = {}
    for split in data.splits.SPLITS:
        ds = data.make_dataset(bundle, split, cfg.data, cfg.seed)
        is_train = split == "train"
        collate = None if stain is None or on_device else StainCollate(stain, is_train, ds)
        if is_train:
            loaders[split] = data.train_loader(
                ds, cfg.data, cfg.seed, dctx.rank, dctx.world_size, dctx.device, collate
            )
        else:
            loaders[split] = data.eval_loader(
                ds, cfg.data, dctx.device, dctx.rank, dctx.world_size, collate
            )
    criterion = losses.build(cfg.loss, bundle.labels("train")).to(dctx.device)
    preprocess = Preprocess(
        dctx.device,
        tuple(cfg.data.mean),
        tuple(cfg.data.std),
        channels_last=cfg.model.channels_last and not cfg.model.cache_features,
        stain=stain if on_device and not cfg.model.cache_features else None,
    )
    parts = DataParts(bundle, stain, loaders, criterion, preprocess, counts=bundle.counts())
    if mil_bags.mil_name(cfg) != "none":
        form_bags(cfg, parts, dctx)
    return parts


def form_bags(cfg: DictConfig, parts: DataParts, dctx: DistContext) -> None:
    """mil != none: every split's tiles grouped into bags by data.bag_by (refused now, before
    any embedding, when the manifest cannot form them), and the criterion weighted on the
    training bags' labels."""
    if cfg.mil.batch_size % dctx.world_size:
        raise ConfigError(
            f"mil.batch_size={cfg.mil.batch_size} is the global number of bags per step and "
            f"must divide by the world size {dctx.world_size}"
        )
    bundle, bags = parts.bundle, {}
    for split in data.splits.SPLITS:
        rows = bundle.manifest.iloc[bundle.indices(split)].reset_index(names="row")
        try:
            bags[split] = mil_bags.group_bags(rows, cfg.data.bag_by)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    parts.bags = bags
    parts.criterion = losses.build(cfg.loss, bags["train"].labels).to(dctx.device)


def use_cached_features(
    cfg: DictConfig,
    parts: DataParts,
    model: models.Her2Classifier,
    runtime: Runtime,
    tracker: tracking.Tracker,
) -> None:
    """model.cache_features: embed every image once (or read the cache), then swap in loaders
    over the embeddings with the same batches and shuffling as the image loaders."""
    dctx = runtime.dctx
    # Only the head is DDP-wrapped (and so synchronised): every rank must embed with rank 0's
    # backbone, or a random-init backbone would differ per rank (seeded seed + rank).
    distributed.broadcast_module_state(model)
    root = Path(cfg.model.feature_cache_dir or runtime.run_dir / "features").expanduser()
    cached = features.build(
        model, parts.bundle, cfg, root, dctx, runtime.autocast_dtype, parts.stain
    )
    tracker.set_tags({"features.cache_key": cached.key, "features.dir": cached.directory})
    tracker.log_metrics(
        {
            "features_computed": cached.computed,
            "features_reused": cached.reused,
            "feature_seconds": cached.seconds,
        }
    )
    parts.cached = cached
    if parts.bags is not None:
        use_bags(cfg, parts, dctx)
        return
    fcfg = features.loader_config(cfg.data)
    sets = {
        s: features.FeatureDataset(cached.features[s], parts.bundle.labels(s))
        for s in features.SPLITS
    }
    shard = (dctx.rank, dctx.world_size)
    parts.loaders = {
        "train": data.train_loader(sets["train"], fcfg, cfg.seed, *shard, dctx.device),
        "val": data.eval_loader(sets["val"], fcfg, dctx.device, *shard),
        "test": data.eval_loader(sets["test"], fcfg, dctx.device, *shard),
    }


def use_bags(cfg: DictConfig, parts: DataParts, dctx: DistContext) -> None:
    """Loaders over bags of the cached embeddings: train shuffled by the DistributedSampler,
    val/test in exact-once shards, `mil.batch_size` bags a batch, padded with a mask."""
    bcfg = OmegaConf.merge(
        features.loader_config(cfg.data),
        {"batch_size": cfg.mil.batch_size, "eval_batch_size": cfg.mil.batch_size},
    )
    sets = {
        s: mil_bags.BagDataset(parts.cached.features[s], parts.bags[s]) for s in features.SPLITS
    }
    shard, collate = (dctx.rank, dctx.world_size), mil_bags.collate_bags
    parts.loaders = {
        "train": data.train_loader(sets["train"], bcfg, cfg.seed, *shard, dctx.device, collate),
        "val": data.eval_loader(sets["val"], bcfg, dctx.device, *shard, collate),
        "test": data.eval_loader(sets["test"], bcfg, dctx.device, *shard, collate),
    }


# -- tracking --------------------------------------------------------------------------------
def build_tracker(cfg: DictConfig, runtime: Runtime) -> tracking.Tracker:
    """MLflow on rank 0 (a no-op elsewhere or with tracking=off); unreachable: a config error."""
    try:
        return tracking.build(cfg.tracking, runtime.dctx.is_main)
    except tracking.TrackingUnavailable as exc:
        raise ConfigError(str(exc)) from exc


def start_tracking(
    tracker: tracking.Tracker,
    cfg: DictConfig,
    runtime: Runtime,
    parts: DataParts,
    model: models.Her2Classifier,
    hydra: HydraRun,
) -> None:
    """Open (or continue) the run with its audit tags (the command line's overrides among
    them), its sweep and job (`hydra`), the data set and what was skipped."""
    dctx, bundle = runtime.dctx, parts.bundle
    tags = tracking.run_tags(
        cfg,
        dctx.device,
        dctx.world_size,
        dctx.backend,
        list(hydra.overrides),
        bundle.fingerprint,
        model.weights_info,
    )
    tags["run_dir"] = str(runtime.run_dir.resolve())
    data_seed, split_seed = data.seeds(cfg.data, cfg.seed)
    tags["data_seed"], tags["split_seed"] = str(data_seed), str(split_seed)
    for split, c in parts.counts.items():
        tags[f"data.{split}"] = f"{c['her2_pos']} HER2+ / {c['her2_neg']} HER2-"
    if runtime.resume.path:
        tags["resumed_from"] = str(runtime.resume.path)
    if runtime.resume.forced_changes:  # trainer.resume_force=true: what differed, for the audit
        tags["resume_forced_changes"] = "; ".join(runtime.resume.forced_changes)[:5000]
    if runtime.restarts:
        tags["torchelastic_restart_count"] = str(runtime.restarts)
    tracker.start(cfg, tags, runtime.run_dir, runtime.continue_run, hydra)
    tracker.log_dataset(bundle.manifest, cfg.data.source, bundle.fingerprint, parts.counts)
    if len(bundle.skipped) and dctx.is_main:  # data.on_bad_file=skip: what was left out
        path = checkpoint.atomic_write_text(
            runtime.run_dir / "skipped_files.csv", bundle.skipped.to_csv(index=False)
        )
        tracker.log_artifact(path, "data")


def record_stain(parts: DataParts, runtime: Runtime, tracker: tracking.Tracker) -> None:
    """The fitted Macenko reference, saved with the run and logged (evaluation reuses it), and
    the patches it left unchanged (too little tissue, degenerate stains) counted per split."""
    stain = parts.stain
    if stain is None or stain.normalizer is None or not runtime.dctx.is_main:
        return
    state = stain.state_dict()
    path = checkpoint.save(state, RunDir(runtime.run_dir).stain_reference)
    tracker.log_artifact(path, "stain")
    ref = state["normalizer"]
    tags = {}
    for key in ("stain_matrix", "max_concentrations", "stains", "max_conc"):
        if key in ref and hasattr(ref[key], "tolist"):
            tags[f"stain.reference.{key}"] = str([round(float(v), 4) for v in ref[key].flatten()])
    tracker.set_tags(tags)
    counts = {}
    for split in data.splits.SPLITS:
        view = parts.bundle.view(split)  # read 256 rows at a time: never a whole split
        skipped = 0
        for i in range(0, len(view), 256):
            chunk = torch.from_numpy(view[i : i + 256]).permute(0, 3, 1, 2)
            skipped += stain.normalizer.normalize(chunk)[1].n_skipped
        counts[f"stain_skipped_{split}"] = skipped
    tracker.log_metrics(counts)
    log.info("stain normalisation left unchanged: %s", counts)


# -- trainer ---------------------------------------------------------------------------------
def step_policy(t: DictConfig, runtime: Runtime) -> StepPolicy:
    """trainer.* resolved once into the frozen policy every optimizer step follows."""
    return StepPolicy(
        autocast_dtype=runtime.autocast_dtype,
        accumulation_steps=t.accumulation_steps,
        grad_clip_norm=t.grad_clip_norm,
        on_nonfinite=t.on_nonfinite,
        max_nonfinite_steps=t.max_nonfinite_steps,
        show_progress=bool(t.progress) and runtime.dctx.is_main,
        debug_nan_at_step=t.debug_nan_at_step,
    )


def build_trainer(
    cfg: DictConfig,
    runtime: Runtime,
    parts: DataParts,
    wrapped: WrappedModel,
    tracker: tracking.Tracker,
) -> Trainer:
    """Optimizer and schedule (stepped per update), the update step, validator, checkpointer."""
    t, dctx = cfg.trainer, runtime.dctx
    steps_per_epoch = math.ceil(len(parts.loaders["train"]) / t.accumulation_steps)
    optimizer, scheduler = build_optimizer(wrapped.model, t, steps_per_epoch)
    scaler = torch.amp.GradScaler(dctx.device.type, enabled=runtime.use_scaler)
    update = OptimizerUpdate(optimizer, scheduler, scaler, step_policy(t, runtime))
    scorer = Scorer(
        wrapped.score_model, dctx.device, parts.preprocess, runtime.autocast_dtype, None, t.amp
    )
    validator = Validator(scorer, parts.criterion, dctx)
    extra = {
        "model_name": cfg.model.name,
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "data_fingerprint": parts.bundle.fingerprint,  # a resume refuses other data (rundir)
    }
    checkpointer = Checkpointer(RunDir(runtime.run_dir), t.save_checkpoints, dctx.is_main, extra)
    return Trainer(
        t,
        wrapped.model,
        wrapped.train_model,
        parts.criterion,
        (parts.loaders["train"], parts.loaders["val"]),
        update,
        parts.preprocess,
        validator,
        checkpointer,
        dctx,
        tracker,
        wrapped.no_sync,
    )


def resume_command(run_dir: Path, overrides: list[str]) -> str:
    """The command line that continues this run in place (what a requeued job runs)."""
    keep = [o for o in overrides if not o.startswith(("trainer.resume=", "hydra.run.dir="))]
    prog = "her2exp-train" if not distributed.under_launcher() else "torchrun ... -m her2exp.train"
    return " ".join([prog, *keep, "trainer.resume=auto", f"hydra.run.dir={run_dir.resolve()}"])


def describe(parts: DataParts) -> dict[str, Any]:
    """The feature cache's figures for the run summary (empty without cached features)."""
    c = parts.cached
    if c is None:
        return {}
    return {
        "feature_cache": {
            "key": c.key,
            "dir": str(c.directory),
            "computed": c.computed,
            "reused": c.reused,
            "seconds": c.seconds,
        }
    }
