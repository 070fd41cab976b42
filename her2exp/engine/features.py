"""Cached embeddings of a frozen backbone (`model.cache_features=true`): each image seen once.

A frozen backbone computes the same embedding for an image every epoch, so it is computed once
and the head trains on the stored vectors: epochs of seconds instead of hours. The cache is a
directory per *key* - a hash of everything that shapes an embedding: architecture and kwargs,
weights (file sha256, or a digest of the parameters), embedding mode, normalisation mean/std,
stain normalisation (settings and fitted reference) and precision. Change any of them and the key
changes, so a stale embedding is never read. Inside, entries are keyed by a hash of the image's
pixels; a run adds one shard file for what it computed (atomic write), so runs that point
`model.feature_cache_dir` at one shared directory reuse each other's work. Under DDP each rank
embeds a contiguous share of the missing images and the shares are gathered to every rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from her2exp.core import checkpoint, progress
from her2exp.core.fileio import atomic_write_text
from her2exp.data import DataBundle, RowView
from her2exp.engine.preprocess import Preprocess
from her2exp.engine.step import StepPolicy
from her2exp.models.backbones import Her2Classifier, state_digest, update_digest
from her2exp.runtime import distributed
from her2exp.runtime.distributed import DistContext

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CHUNK = 256  # patches decoded at a time while hashing


@dataclass
class CachedFeatures:
    features: dict[str, torch.Tensor]  # split -> (N, D) float32, in the split's dataset order
    key: str
    directory: Path
    computed: int  # distinct images embedded by this run
    reused: int  # distinct images read from the cache
    seconds: float


class FeatureDataset(Dataset):
    """Embeddings and labels, shaped like PatchDataset items (x, label, index)."""

    def __init__(self, features: torch.Tensor, labels: np.ndarray) -> None:
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} embeddings but {len(labels)} labels")
        self.features = features
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # nothing is drawn per epoch: no augmentation
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.features[index], self.labels[index], index


def loader_config(data_cfg: DictConfig) -> DictConfig:
    """data config for feature loaders: same batches and shuffling, no worker processes
    (indexing a tensor in memory is faster than shipping it between processes)."""
    return OmegaConf.merge(
        data_cfg,
        {
            "num_workers": 0,
            "persistent_workers": False,
            "prefetch_factor": None,
            "pin_memory": False,
        },
    )


def hashes_of(images: np.ndarray | RowView) -> list[str]:
    """`image_hashes` of every image, read CHUNK at a time (data.cache=false never holds them
    all), with a progress bar: every patch of the data set is read for it."""
    out: list[str] = []
    with progress.bar(total=len(images), desc="features: hashing", unit="image") as shown:
        for start in range(0, len(images), CHUNK):
            chunk = images[start : start + CHUNK]
            out += image_hashes(chunk)
            shown.update(len(chunk))
    return out


def image_hashes(images: np.ndarray) -> list[str]:
    """sha256 of each uint8 patch's pixels (and shape): the cache's per-image key."""
    out = []
    for img in images:
        digest = hashlib.sha256(str(img.shape).encode())
        digest.update(np.ascontiguousarray(img).tobytes())
        out.append(digest.hexdigest()[:32])
    return out


def cache_key(
    model: Her2Classifier,
    model_cfg: DictConfig,
    mean: list[float],
    std: list[float],
    stain_cfg: DictConfig | None,
    stain: Any,
    autocast_dtype: torch.dtype | None,
) -> tuple[str, dict[str, Any]]:
    """(key, what it hashes): the model, its weights and the transform in front of it."""
    info = model.weights_info
    weights = info.get("sha256") or info.get("state_sha256") or state_digest(model.backbone)
    stain_desc: Any = None
    if stain is not None and getattr(stain, "normalizer", None) is not None:
        digest = hashlib.sha256()
        update_digest(digest, stain.state_dict())
        stain_desc = {
            "config": OmegaConf.to_container(stain_cfg, resolve=True) if stain_cfg else None,
            "reference": digest.hexdigest(),
        }
    description = {
        "model": model_cfg.name,
        "kwargs": OmegaConf.to_container(model_cfg.kwargs, resolve=True),
        "embedding": model_cfg.embedding,
        "weights": weights,
        "weights_source": model.weights_info.get("source"),
        "mean": [round(float(v), 8) for v in mean],
        "std": [round(float(v), 8) for v in std],
        "stain_normalisation": stain_desc,
        "precision": str(autocast_dtype or torch.float32),
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    return key.hexdigest()[:24], description


@torch.no_grad()
def embed(
    model: Her2Classifier,
    images: np.ndarray | RowView,
    preprocess: Preprocess,
    stain: Any = None,
    batch_size: int = 256,
    autocast_dtype: torch.dtype | None = None,
    desc: str = "embedding",
) -> torch.Tensor:
    """uint8 (N, H, W, 3) patches (an array, or a RowView read a batch at a time) -> (N, D)
    float32 embeddings on the CPU, through the same transform as training batches: stain
    normalisation (on the CPU here, or on the device by `preprocess.stain`), then mean/std on
    the device. `desc`: the progress bar's (a large backbone over a cohort takes hours)."""
    out = []
    starts = range(0, len(images), batch_size)
    for start in progress.bar(starts, desc=desc, unit="batch"):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        x = x.permute(0, 3, 1, 2).contiguous()
        out.append(embed_batch(model, x, preprocess, stain, autocast_dtype))
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def embed_batch(
    model: Her2Classifier,
    x: torch.Tensor,
    preprocess: Preprocess,
    stain: Any = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One uint8 NCHW batch -> (N, D) float32 embeddings on the CPU: the host stain step (if
    any), the input path, the backbone under the run's autocast. The one embedding step of the
    feature cache and of `evaluation.Scorer.embed` (MIL bags in eval and predict)."""
    model.eval()
    if stain is not None:
        x = stain(x, False)
    with StepPolicy(autocast_dtype=autocast_dtype).autocast(preprocess.device):
        return model.embed(preprocess(x)).float().cpu()


def _load(directory: Path, key: str) -> dict[str, torch.Tensor]:
    table: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.pt")):
        state = checkpoint.load(shard)
        if state.get("key") != key:
            continue
        table.update(zip(state["hashes"], state["features"], strict=True))
    return table


def build(
    model: Her2Classifier,
    bundle: DataBundle,
    cfg: DictConfig,
    root: Path,
    dctx: DistContext,
    autocast_dtype: torch.dtype | None,
    stain: Any = None,
) -> CachedFeatures:
    """Embeddings of every split: read from the cache where the key and image match, the rest
    computed once per distinct image (rank-sharded) and added to the cache by rank 0."""
    start = time.perf_counter()
    on_device = stain is not None and cfg.stain.on_device
    key, description = cache_key(
        model, cfg.model, cfg.data.mean, cfg.data.std, cfg.stain, stain, autocast_dtype
    )
    directory = Path(root) / key
    hashes = hashes_of(bundle.view())
    known = _load(directory, key) if dctx.is_main and directory.is_dir() else {}
    known = distributed.broadcast_object(known)
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h not in known and h not in first:
            first[h] = i
    missing = list(first)
    mine = distributed.shard_indices(len(missing), dctx.rank, dctx.world_size)
    preprocess = Preprocess(
        dctx.device,
        tuple(cfg.data.mean),
        tuple(cfg.data.std),
        cfg.model.channels_last,
        stain if on_device else None,
    )
    rows = np.array([first[missing[i]] for i in mine], dtype=np.int64)
    local = embed(
        model,
        RowView(bundle.patches, rows),
        preprocess,
        None if on_device else stain,
        cfg.data.eval_batch_size,
        autocast_dtype,
        "features: embedding",
    )
    new = distributed.gather_in_order(local.numpy()) if missing else np.zeros((0, 0))
    table = dict(known)
    table.update(zip(missing, torch.from_numpy(np.ascontiguousarray(new)), strict=True))
    if missing and dctx.is_main:
        name = hashlib.sha256("".join(missing).encode()).hexdigest()[:16]
        state = {"key": key, "hashes": missing, "features": torch.from_numpy(new).contiguous()}
        checkpoint.save(state, directory / f"{name}.pt")
        atomic_write_text(directory / "key.json", json.dumps(description, indent=2, default=str))
    all_features = torch.stack([table[h] for h in hashes]).float()
    features = {s: all_features[bundle.indices(s)] for s in SPLITS}
    seconds = time.perf_counter() - start
    reused = len(set(hashes)) - len(missing)
    log.info(
        "features: %d images embedded, %d read from the cache %s, in %.1f s",
        len(missing),
        reused,
        directory,
        seconds,
    )
    return CachedFeatures(features, key, directory, len(missing), reused, seconds)
