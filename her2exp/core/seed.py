"""Seeding for repeatable runs: python, numpy, torch (and DataLoader workers)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed every RNG a run touches; `deterministic` also forbids nondeterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)


def worker_init_fn(worker_id: int) -> None:
    """Give each DataLoader worker distinct numpy/python seeds derived from torch's per-worker seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea & Flood 2014): a bijective 64-bit mix, vectorised."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def keyed_uniform(seed: int, epoch: int, index: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
    """`n` uniforms in [0, 1) per sample, a pure function of (seed, epoch, dataset index).

    A counter-based draw: a sample's augmentation is the same whatever batch, rank, worker,
    device or resume point it lands in, and a batch of 256 costs microseconds (one
    torch.Generator per sample would cost ~10 us each, on the step's critical path). Returns
    float64 of shape (len(index), n).
    """
    idx = np.asarray(index, dtype=np.int64).reshape(-1).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
        key = _splitmix64(key ^ np.uint64(epoch % 2**64))
        base = _splitmix64(key ^ idx)
        counters = base[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None, :] * _GOLDEN
        bits = _splitmix64(counters)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
