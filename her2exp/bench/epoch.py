"""images/s of her2exp's training epoch vs a bare PyTorch loop, same process.

Both train the same architecture from the same initial weights on the same patches with the
same batch size, autocast dtype and memory format; rounds alternate so drift in machine load
hits both alike. The ratio (her2exp / bare) is the framework's overhead: loader, augmentation,
scheduler, clipping, bookkeeping. The bare loop gets its tensors normalised once, up front: the
best case for it.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from her2exp import data, losses, models
from her2exp.config import register_configs, validate
from her2exp.engine import (
    EpochState,
    EpochStats,
    OptimizerUpdate,
    Preprocess,
    StepPolicy,
    train_one_epoch,
)
from her2exp.seed import set_seed
from her2exp.train import CONFIG_DIR
from her2exp.trainer import build_optimizer, resolve_amp


@dataclass(frozen=True)
class EpochBench:
    """Timed rounds (warm-up excluded) of both loops, and how far each moved its weights."""

    model: str
    train_patches: int
    ours: list[EpochStats]
    bare: list[EpochStats]
    ours_weight_change: float  # L2 distance of the trained parameters from the shared start
    bare_weight_change: float

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


def bare_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    gen: torch.Generator,
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> EpochStats:
    """The loop anyone would write by hand: shuffled, pre-normalised tensors, no extras.

    Like her2exp's loader it drops a last batch of a single sample (BatchNorm cannot train on
    it), so both loops see the same images. The loss is summed on the device and read once.
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
        x, y = images[idx].to(device), labels[idx].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
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


def _setup(overrides: list[str]) -> SimpleNamespace:
    """Config, data, the two identical models with their optimizers, and the bare tensors."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["output_dir=/tmp/unused", *overrides])
    validate(cfg)
    set_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bundle = data.build(cfg.data, cfg.seed)
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
    plain = data.make_dataset(bundle, "train", cfg.data, cfg.seed)
    raw = torch.stack([plain[i][0] for i in range(len(plain))]).float()
    images = (raw - torch.tensor(mean).view(1, 3, 1, 1) * 255.0) / (
        torch.tensor(std).view(1, 3, 1, 1) * 255.0
    )
    if cfg.model.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return SimpleNamespace(
        cfg=cfg,
        device=device,
        loader=loader,
        train_set=train_set,
        criterion=losses.build(cfg.loss, bundle.labels("train")).to(device),
        start={k: p.detach().clone() for k, p in template.named_parameters()},
        ours=(ours, update, preprocess),
        bare=(bare, torch.optim.AdamW(bare.parameters(), lr=cfg.trainer.lr), dtype, use_scaler),
        images=images,
        labels=plain.labels.clone(),
    )


def run(overrides: list[str], rounds: int = 3) -> EpochBench:
    """Warm-up epoch then ``rounds`` timed epochs of each loop, alternating; prints each round."""
    s = _setup(overrides)
    cfg, gen = s.cfg, torch.Generator().manual_seed(s.cfg.seed)
    ours, update, preprocess = s.ours
    bare, bare_opt, dtype, use_scaler = s.bare
    scaler = torch.amp.GradScaler(s.device.type, enabled=use_scaler)
    print(
        f"bench: {cfg.model.name}, {len(s.train_set)} train patches of {cfg.data.image_size} px, "
        f"batch {cfg.data.batch_size}, device {s.device}, torch threads "
        f"{torch.get_num_threads()}, {rounds} rounds after one warm-up epoch each"
    )
    ours_stats, bare_stats = [], []
    for rnd in range(rounds + 1):
        s.loader.sampler.set_epoch(rnd)
        s.train_set.set_epoch(rnd)
        o = train_one_epoch(ours, s.loader, s.criterion, update, preprocess, EpochState(rnd))
        b = bare_epoch(bare, bare_opt, s.images, s.labels, cfg.data.batch_size, gen, dtype, scaler)
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
        _weight_change(ours, s.start),
        _weight_change(bare, s.start),
    )
    print(
        f"bench: median her2exp {result.ours_images_per_second:.1f} img/s, bare PyTorch "
        f"{result.bare_images_per_second:.1f} img/s, ratio {result.ratio:.3f} (target >= 0.97)"
    )
    return result
