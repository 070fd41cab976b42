"""`make bench`: images/s of her2exp's training epoch vs a bare PyTorch loop, same process.

Both train the same architecture from the same initial weights on the same patches with the
same batch size; rounds alternate so drift in machine load hits both alike. The ratio (her2exp /
bare) is the framework's overhead: loader, augmentation, scheduler, clipping, bookkeeping.

    python -m her2exp.bench [--rounds 3] [hydra overrides, e.g. model=resnet10t data.batch_size=32]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from her2exp import data, losses, models
from her2exp.config import register_configs, validate
from her2exp.engine import EpochState, OptimizerUpdate, Preprocess, StepPolicy, train_one_epoch
from her2exp.seed import set_seed
from her2exp.train import CONFIG_DIR
from her2exp.trainer import build_optimizer, resolve_amp


def bare_epoch(model, optimizer, images: torch.Tensor, labels: torch.Tensor, batch: int,
               device: torch.device, gen: torch.Generator) -> float:  # fmt: skip
    """The loop anyone would write by hand: shuffled, pre-normalised tensors, no extras."""
    model.train()
    order = torch.randperm(len(labels), generator=gen)
    start = time.perf_counter()
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        x, y = images[idx].to(device), labels[idx].to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(order) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-extras", action="store_true", help="training throughput only")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["output_dir=/tmp/unused", *args.overrides])
    validate(cfg)
    set_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bundle = data.build(cfg.data, cfg.seed)
    train_set = data.make_dataset(bundle, "train", cfg.data, cfg.seed)
    loader = data.train_loader(train_set, cfg.data, cfg.seed, 0, 1, device)
    criterion = losses.build(cfg.loss, bundle.labels("train")).to(device)

    template = models.build(cfg.model, device)
    ours, bare = copy.deepcopy(template), copy.deepcopy(template)
    ours_opt, ours_sched = build_optimizer(ours, cfg.trainer, len(loader))
    bare_opt = torch.optim.AdamW(bare.parameters(), lr=cfg.trainer.lr)
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
    # The bare loop gets float tensors normalised once, up front: the best case for it.
    raw = torch.stack([plain[i][0] for i in range(len(plain))]).float()
    images = (raw - torch.tensor(mean).view(1, 3, 1, 1) * 255.0) / (
        torch.tensor(std).view(1, 3, 1, 1) * 255.0
    )
    labels = plain.labels.clone()
    gen = torch.Generator().manual_seed(cfg.seed)

    print(f"bench: {cfg.model.name}, {len(train_set)} train patches of {cfg.data.image_size} px, "
          f"batch {cfg.data.batch_size}, device {device}, torch threads "
          f"{torch.get_num_threads()}, {args.rounds} rounds after one warm-up epoch each")  # fmt: skip
    ours_ips, bare_ips = [], []
    for rnd in range(args.rounds + 1):
        loader.sampler.set_epoch(rnd)
        train_set.set_epoch(rnd)
        stats = train_one_epoch(ours, loader, criterion, update, preprocess, EpochState(rnd))
        b = bare_epoch(bare, bare_opt, images, labels, cfg.data.batch_size, device, gen)
        if rnd > 0:
            ours_ips.append(stats.images_per_second)
            bare_ips.append(b)
            print(f"  round {rnd}: her2exp {stats.images_per_second:8.1f} img/s   "
                  f"bare loop {b:8.1f} img/s   ratio {stats.images_per_second / b:.3f}")  # fmt: skip
    o, b = statistics.median(ours_ips), statistics.median(bare_ips)
    print(f"bench: median her2exp {o:.1f} img/s, bare PyTorch {b:.1f} img/s, "
          f"ratio {o / b:.3f} (target >= 0.97)")  # fmt: skip

    if args.skip_extras:
        return
    from her2exp import metrics

    ci = min((metrics.bench_ci() for _ in range(3)), key=lambda r: r["total_seconds"])
    print(f"bench: DeLong CI on 100,000 scores {ci['delong_seconds']:.3f} s + stratified "
          f"bootstrap (2,000 resamples) {ci['bootstrap_seconds']:.3f} s = "
          f"{ci['total_seconds']:.3f} s (best of 3; target < 1 s); DeLong "
          f"[{ci['delong_low']:.4f}, {ci['delong_high']:.4f}] vs bootstrap "
          f"[{ci['bootstrap_low']:.4f}, {ci['bootstrap_high']:.4f}]")  # fmt: skip
    from her2exp.stain import bench as stain_bench

    print("bench: stain normalisation, 256 patches of 128 px (her2exp.stain.bench)")
    stain_bench.main([])


if __name__ == "__main__":
    main()
