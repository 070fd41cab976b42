"""images/s of her2exp's training epoch vs a bare PyTorch loop, same process.

Both train the same architecture from the same initial weights on the same patches with the
same batch size, autocast dtype, memory format, gradient clipping and torch.compile setting;
rounds alternate so drift in machine load hits both alike. The ratio (her2exp / bare) is the
framework's overhead: loader, augmentation, scheduler, non-finite checks, bookkeeping. The bare
loop gets its tensors normalised once, up front: the best case for it.

`run_clip_pair` measures twice, clipping on (both loops clip to the same norm) and off (neither
clips), so clipping's own cost never counts as overhead. `run_cuda` is the GPU preset of
`make gpu-check`: resnet18 at 224 px, batch 128, amp auto, channels_last, compile off and on.

Not matched on purpose: her2exp's AdamW has two parameter groups (weight decay on weights, none
on norms and biases) and a LambdaLR warmup-cosine schedule stepped every update; the bare loop
uses one plain AdamW group at a constant lr. The extra group and schedule step are part of the
overhead measured; they change the numbers each loop computes, not the work per step.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from her2exp import data, models
from her2exp.config import register_configs, validate
from her2exp.core.seed import set_seed
from her2exp.engine import (
    EpochState,
    EpochStats,
    OptimizerUpdate,
    Preprocess,
    StepPolicy,
    train_one_epoch,
)
from her2exp.models import losses
from her2exp.runtime.amp import resolve_amp
from her2exp.training.run import CONFIG_DIR
from her2exp.training.trainer import build_optimizer

CLIP_KEY = "trainer.grad_clip_norm"
DEFAULT_CLIP = 1.0  # trainer.grad_clip_norm of conf/trainer/default.yaml
# The GPU preset (issue 16): what a single-GPU run of resnet18 at full resolution uses. Fewer
# patients than the default so the embedded data renders once in about a minute; workers and
# pinned memory as docs/scaling.md recommends for one GPU.
CUDA_PRESET = (
    "model=resnet18",
    "data.image_size=224",
    "data.batch_size=128",
    "data.n_patients=60",
    "data.num_workers=8",
    "data.persistent_workers=true",
    "data.pin_memory=true",
    "trainer.amp=auto",
    "model.channels_last=true",
)
TARGET = {"cpu": 0.97, "cuda": 0.98}
NO_CUDA = (
    "bench --cuda: no CUDA device here (torch.cuda.is_available() is false); the GPU preset "
    "measures only on a GPU: run `make bench` without --cuda for the CPU figures"
)


@dataclass(frozen=True)
class EpochBench:
    """Timed rounds (warm-up excluded) of both loops, and how far each moved its weights."""

    model: str
    train_patches: int
    ours: list[EpochStats]
    bare: list[EpochStats]
    ours_weight_change: float  # L2 distance of the trained parameters from the shared start
    bare_weight_change: float
    grad_clip_norm: float | None = None  # clipping of both loops (None: neither clips)
    compiled: bool = False  # model.compile, applied to both loops alike
    device: str = "cpu"

    @property
    def ours_images_per_second(self) -> float:
        return statistics.median(s.images_per_second for s in self.ours)

    @property
    def bare_images_per_second(self) -> float:
        return statistics.median(s.images_per_second for s in self.bare)

    @property
    def ratio(self) -> float:
        """Median her2exp img/s over median bare-loop img/s (1.0: no overhead)."""
        return self.ours_images_per_second / self.bare_images_per_second

    @property
    def label(self) -> str:
        """What both loops did, as the summary lines name it."""
        clip = "clip off" if self.grad_clip_norm is None else f"clip {self.grad_clip_norm:g}"
        return f"{clip}, compile {'on' if self.compiled else 'off'}"


def bare_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    gen: torch.Generator,
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip: float | None = None,
) -> EpochStats:
    """The loop anyone would write by hand: shuffled, pre-normalised tensors, no extras.

    Like her2exp's loader it drops a last batch of a single sample (BatchNorm cannot train on
    it), so both loops see the same images. With ``clip`` it clips the gradient norm as
    her2exp does (unscaled first when a GradScaler is on). The loss is summed on the device
    and read once.
    """
    device = next(model.parameters()).device
    model.train()
    order = torch.randperm(len(labels), generator=gen)
    if len(order) % batch == 1:
        order = order[:-1]
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    total = torch.zeros((), device=device)
    start = time.perf_counter()
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        x = images[idx].to(device, non_blocking=True)
        y = labels[idx].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach().float() * len(idx)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return EpochStats(float(total) / max(len(order), 1), len(order), seconds)


def _weight_change(model: torch.nn.Module, start: dict[str, torch.Tensor]) -> float:
    """L2 distance of the parameters from ``start`` (buffers excluded: a forward pass in train
    mode moves BatchNorm's running statistics without any optimizer step)."""
    now = dict(model.named_parameters())
    return (
        sum(float((now[k].detach().float() - v.float()).pow(2).sum()) for k, v in start.items())
        ** 0.5
    )


def compose_bench(overrides: list[str]) -> Any:
    """The training config of ``overrides``, validated as her2exp-train validates it."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["output_dir=/tmp/unused", *overrides])
    validate(cfg)
    return cfg


def _bundle(cfg: Any, cache: dict[str, Any] | None) -> Any:
    """The data of ``cfg.data``, rendered once per data config when a cache dict is given
    (224 px patches take a minute to render; the GPU preset measures four settings on them)."""
    key = OmegaConf.to_yaml(cfg.data) + str(cfg.seed)
    if cache is not None and key in cache:
        return cache[key]
    bundle = data.build(cfg.data, cfg.seed)
    if cache is not None:
        cache[key] = bundle
    return bundle


def _bare_images(bundle: Any, cfg: Any, mean: list[float], std: list[float]) -> Any:
    """The train split as the bare loop gets it: unaugmented, normalised float, on the host."""
    plain = data.make_dataset(bundle, "train", cfg.data, cfg.seed)
    raw = torch.stack([plain[i][0] for i in range(len(plain))]).float()
    images = (raw - torch.tensor(mean).view(1, 3, 1, 1) * 255.0) / (
        torch.tensor(std).view(1, 3, 1, 1) * 255.0
    )
    if cfg.model.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, plain.labels.clone()


def _setup(overrides: list[str], bundles: dict[str, Any] | None = None) -> SimpleNamespace:
    """Config, data, the two identical models with their optimizers, and the bare tensors."""
    cfg = compose_bench(overrides)
    set_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bundle = _bundle(cfg, bundles)
    train_set = data.make_dataset(bundle, "train", cfg.data, cfg.seed)
    loader = data.train_loader(train_set, cfg.data, cfg.seed, 0, 1, device)
    template = models.build(cfg.model, device)
    ours, bare = copy.deepcopy(template), copy.deepcopy(template)
    ours_opt, ours_sched = build_optimizer(ours, cfg.trainer, len(loader))
    dtype, use_scaler = resolve_amp(cfg.trainer.amp, device)
    # data.mean/std null: the model's own normalisation, as train.py resolves it.
    own_mean, own_std = models.normalisation(template)
    mean = list(cfg.data.mean) if cfg.data.mean is not None else own_mean
    std = list(cfg.data.std) if cfg.data.std is not None else own_std
    policy = StepPolicy(dtype, cfg.trainer.accumulation_steps, cfg.trainer.grad_clip_norm)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    update = OptimizerUpdate(ours_opt, ours_sched, scaler, policy)
    preprocess = Preprocess(device, tuple(mean), tuple(std), cfg.model.channels_last)
    images, labels = _bare_images(bundle, cfg, mean, std)
    return SimpleNamespace(
        cfg=cfg,
        device=device,
        loader=loader,
        train_set=train_set,
        criterion=losses.build(cfg.loss, bundle.labels("train")).to(device),
        start={k: p.detach().clone() for k, p in template.named_parameters()},
        # (module whose weights are measured, module that trains: compiled when asked)
        ours=(ours, models.maybe_compile(ours, cfg.model), update, preprocess),
        bare=(
            bare,
            models.maybe_compile(bare, cfg.model),
            torch.optim.AdamW(bare.parameters(), lr=cfg.trainer.lr),
            dtype,
            use_scaler,
        ),
        images=images,
        labels=labels,
    )


def run(overrides: list[str], rounds: int = 3, bundles: dict[str, Any] | None = None) -> EpochBench:
    """Warm-up epoch then ``rounds`` timed epochs of each loop, alternating; prints each round."""
    s = _setup(overrides, bundles)
    cfg, gen = s.cfg, torch.Generator().manual_seed(s.cfg.seed)
    ours_raw, ours, update, preprocess = s.ours
    bare_raw, bare, bare_opt, dtype, use_scaler = s.bare
    clip = cfg.trainer.grad_clip_norm
    scaler = torch.amp.GradScaler(s.device.type, enabled=use_scaler)
    print(
        f"bench: {cfg.model.name}, {len(s.train_set)} train patches of {cfg.data.image_size} px, "
        f"batch {cfg.data.batch_size}, device {s.device}, amp {cfg.trainer.amp} "
        f"({dtype or 'fp32'}), channels_last {cfg.model.channels_last}, compile "
        f"{cfg.model.compile}, grad_clip_norm {clip} (both loops), torch threads "
        f"{torch.get_num_threads()}, {rounds} rounds after one warm-up epoch each"
    )
    ours_stats, bare_stats = [], []
    for rnd in range(rounds + 1):
        s.loader.sampler.set_epoch(rnd)
        s.train_set.set_epoch(rnd)
        o = train_one_epoch(ours, s.loader, s.criterion, update, preprocess, EpochState(rnd))
        b = bare_epoch(
            bare, bare_opt, s.images, s.labels, cfg.data.batch_size, gen, dtype, scaler, clip
        )
        if rnd > 0:
            ours_stats.append(o)
            bare_stats.append(b)
            print(
                f"  round {rnd}: her2exp {o.images_per_second:8.1f} img/s   "
                f"bare loop {b.images_per_second:8.1f} img/s   "
                f"ratio {o.images_per_second / b.images_per_second:.3f}"
            )
    result = EpochBench(
        cfg.model.name,
        len(s.train_set),
        ours_stats,
        bare_stats,
        _weight_change(ours_raw, s.start),
        _weight_change(bare_raw, s.start),
        clip,
        bool(cfg.model.compile),
        s.device.type,
    )
    print(
        f"bench: median her2exp {result.ours_images_per_second:.1f} img/s, bare PyTorch "
        f"{result.bare_images_per_second:.1f} img/s, ratio {result.ratio:.3f} "
        f"(target >= {TARGET.get(result.device, 0.97)})"
    )
    return result


def _split_clip(overrides: list[str]) -> tuple[list[str], float]:
    """The overrides without trainer.grad_clip_norm, and the norm to clip to when clipping is
    on (the one given, else the default config's 1.0; a given null means the default)."""
    rest, clip = [], DEFAULT_CLIP
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key == CLIP_KEY:
            if value not in ("", "null", "None"):
                clip = float(value)
            continue
        rest.append(o)
    return rest, clip


def run_clip_pair(
    overrides: list[str], rounds: int = 3, bundles: dict[str, Any] | None = None
) -> dict[str, EpochBench]:
    """Two benches on one rendering of the data: clipping on in both loops, then off in both."""
    rest, clip = _split_clip(overrides)
    bundles = {} if bundles is None else bundles
    return {
        "clip on": run([*rest, f"{CLIP_KEY}={clip}"], rounds, bundles),
        "clip off": run([*rest, f"{CLIP_KEY}=null"], rounds, bundles),
    }


def run_cuda(overrides: list[str], rounds: int = 3) -> dict[str, EpochBench]:
    """The GPU preset (CUDA_PRESET), compile off then on, clipping on and off for each.

    Raises RuntimeError on a machine without CUDA: the preset only measures what a GPU does.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(NO_CUDA)
    bundles: dict[str, Any] = {}
    out: dict[str, EpochBench] = {}
    for compiled in ("false", "true"):
        pair = run_clip_pair(
            [*CUDA_PRESET, f"model.compile={compiled}", *overrides], rounds, bundles
        )
        out.update({r.label: r for r in pair.values()})
    return out


def summary_lines(results: dict[str, EpochBench]) -> list[str]:
    """One line per setting: her2exp / bare ratio with the images/s of both loops."""
    return [
        f"bench summary [{r.label}]: ratio {r.ratio:.3f}  her2exp "
        f"{r.ours_images_per_second:.1f} img/s  bare {r.bare_images_per_second:.1f} img/s"
        for r in results.values()
    ]
