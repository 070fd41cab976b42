"""Bag heads on cached features: seconds of one training epoch, and the feature cache's read rate.

(a) One epoch (forward, backward, AdamW) of each bag head over `--bags` bags of `--tiles` tiles
of `--dim` features (default 1,000 x 500 x 1,536, the size of a UNI2-h / H-optimus cohort of
1,000 slides subsampled to 500 tiles): abmil against mean_pool, the cheapest head, in the same
process. The features are synthetic, drawn per batch from a seeded generator: held at once they
would be 3.1 GB in float32. Drawing them costs time of its own, so it is timed apart (the same
draws without a model) and the epoch's compute is the difference.

(b) The cached-feature read rate: a shard written as `her2exp.engine.features` writes it
(`checkpoint.save` of hashes + an (N, D) float32 tensor), read back by `checkpoint.load` (the
sha256 check, then `torch.load(weights_only=True)`) and by the cache's own `features._load`
(which also builds the hash -> embedding table). Read right after writing, so from the page
cache: an upper bound for a cold disk. Reading the file's bytes alone is the baseline.

    python -m her2exp.bench.mil [--bags 1000] [--tiles 500] [--dim 1536] [--batch-bags 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from her2exp.core import checkpoint
from her2exp.engine import features
from her2exp.models.mil import build_head

HEADS = ("mean_pool", "abmil")


@dataclass
class EpochResult:
    head: str
    bags: int
    tiles: int
    dim: int
    batch_bags: int
    seconds: float  # the whole epoch, drawing the features included
    draw_seconds: float  # drawing the same features alone
    first_loss: float
    last_loss: float

    @property
    def compute_seconds(self) -> float:
        return max(self.seconds - self.draw_seconds, 0.0)

    @property
    def bags_per_second(self) -> float:
        return self.bags / self.seconds


@dataclass
class ReadResult:
    features: int
    dim: int
    megabytes: float  # the shard file's size
    load_seconds: float  # checkpoint.load: checksum + torch.load
    verify_seconds: float  # the checksum alone
    cache_seconds: float  # features._load: the load + the hash table
    raw_seconds: float  # reading the file's bytes alone: the ceiling

    @property
    def features_per_second(self) -> float:
        return self.features / self.load_seconds

    @property
    def megabytes_per_second(self) -> float:
        return self.megabytes / self.load_seconds


def synthetic_bags(
    bags: int, tiles: int, dim: int, batch_bags: int, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x (b, tiles, dim), mask, labels) batches; in a HER2+ bag one tile is shifted along a
    fixed direction (something to learn; one epoch is too short for the loss to move much)."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.zeros(dim)
    direction[: min(dim, 16)] = 2.0
    for start in range(0, bags, batch_bags):
        b = min(batch_bags, bags - start)
        x = torch.randn(b, tiles, dim, generator=gen)
        labels = torch.randint(0, 2, (b,), generator=gen)
        where = torch.randint(0, tiles, (b,), generator=gen)
        x[torch.arange(b), where] += labels[:, None] * direction
        yield x, torch.ones(b, tiles, dtype=torch.bool), labels


def draw_seconds(bags: int, tiles: int, dim: int, batch_bags: int, seed: int = 0) -> float:
    """Seconds to draw an epoch's synthetic features without a model: subtracted as overhead."""
    start = time.perf_counter()
    for _ in synthetic_bags(bags, tiles, dim, batch_bags, seed):
        pass
    return time.perf_counter() - start


def head_epoch(
    name: str, bags: int, tiles: int, dim: int, batch_bags: int, draw: float, seed: int = 0
) -> EpochResult:
    """One epoch of head `name` (the default `mil` sizes: hidden 128, attention 128, dropout
    0.25, gated) with AdamW at lr 1e-3."""
    torch.manual_seed(seed)
    cfg = {"name": name, "hidden": 128, "attention_dim": 128, "dropout": 0.25, "gated": True}
    head = build_head(OmegaConf.create(cfg), dim).train()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    losses = []
    start = time.perf_counter()
    for x, mask, labels in synthetic_bags(bags, tiles, dim, batch_bags, seed):
        logits, _ = head(x, mask)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    seconds = time.perf_counter() - start
    window = max(1, len(losses) // 10)  # first and last tenth: one batch's loss is noisy
    first = float(torch.stack(losses[:window]).mean())
    last = float(torch.stack(losses[-window:]).mean())
    return EpochResult(name, bags, tiles, dim, batch_bags, seconds, draw, first, last)


def read_rate(folder: Path, n: int, dim: int, seed: int = 0) -> ReadResult:
    """Write one feature shard of n (dim) embeddings into `folder` as the cache does; time its
    reads."""
    gen = torch.Generator().manual_seed(seed)
    hashes = [f"{i:032x}" for i in range(n)]
    state = {"key": "bench", "hashes": hashes, "features": torch.randn(n, dim, generator=gen)}
    path = checkpoint.save(state, folder / "bench" / "shard.pt")
    start = time.perf_counter()
    path.read_bytes()
    raw = time.perf_counter() - start
    start = time.perf_counter()
    checkpoint.verify(path)
    verify = time.perf_counter() - start
    start = time.perf_counter()
    loaded = checkpoint.load(path)
    load = time.perf_counter() - start
    if not torch.equal(loaded["features"], state["features"]):
        raise RuntimeError(f"{path}: the features read back differ from those written")
    start = time.perf_counter()
    table = features._load(path.parent, "bench")
    cache = time.perf_counter() - start
    if len(table) != n:
        raise RuntimeError(f"{path}: the cache read {len(table)} of {n} embeddings")
    return ReadResult(n, dim, path.stat().st_size / 1e6, load, verify, cache, raw)


def epoch_lines(results: list[EpochResult]) -> list[str]:
    """What `make bench` prints for (a): each head, then abmil against mean_pool."""
    first = results[0]
    lines = [
        f"bench: bag heads, one epoch over {first.bags:,} bags of {first.tiles} tiles x "
        f"{first.dim} features (synthetic, drawn per batch; {first.batch_bags} bags a step, "
        f"AdamW, {torch.get_num_threads()} threads); drawing them alone {first.draw_seconds:.2f} s"
    ]
    for r in results:
        lines.append(
            f"  {r.head}: {r.seconds:.2f} s ({r.compute_seconds:.2f} s compute), "
            f"{r.bags_per_second:.1f} bags/s, loss {r.first_loss:.3f} -> {r.last_loss:.3f}"
        )
    by_name = {r.head: r for r in results}
    if {"abmil", "mean_pool"} <= set(by_name):
        abmil, mean = by_name["abmil"], by_name["mean_pool"]
        ratio = abmil.compute_seconds / max(mean.compute_seconds, 1e-9)
        lines.append(f"  abmil / mean_pool compute: {ratio:.2f}x")
    return lines


def read_line(r: ReadResult) -> str:
    """What `make bench` prints for (b)."""
    return (
        f"bench: cached-feature read, one shard of {r.features:,} x {r.dim} float32 "
        f"({r.megabytes:.0f} MB, page cache): checkpoint.load {r.load_seconds:.2f} s = "
        f"{r.features_per_second:,.0f} features/s, {r.megabytes_per_second:,.0f} MB/s (sha256 "
        f"check {r.verify_seconds:.2f} s of it); features._load with the hash table "
        f"{r.cache_seconds:.2f} s = {r.features / r.cache_seconds:,.0f} features/s; the "
        f"file's bytes alone {r.megabytes / r.raw_seconds:,.0f} MB/s (checkpoint.load at "
        f"{r.raw_seconds / r.load_seconds:.2f} of it)"
    )


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run (a) and (b); print their lines; return the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=1000)
    parser.add_argument("--tiles", type=int, default=500)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--batch-bags", type=int, default=8)
    parser.add_argument("--read-features", type=int, default=20_000)
    args = parser.parse_args(argv)
    sizes = (args.bags, args.tiles, args.dim, args.batch_bags)
    draw = draw_seconds(*sizes)
    epochs = [head_epoch(name, *sizes, draw) for name in HEADS]
    for line in epoch_lines(epochs):
        print(line)
    with tempfile.TemporaryDirectory(prefix="her2exp-bench-mil-") as tmp:
        read = read_rate(Path(tmp), args.read_features, args.dim)
    print(read_line(read))
    return {"epochs": epochs, "read": read}


if __name__ == "__main__":
    main()
