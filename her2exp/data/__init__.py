"""Data: a manifest (one row per patch) plus datasets and loaders built from it.

The manifest columns are the contract every source fills: label, patient_id, slide_id, site,
split (and latent_score for the synthetic source, which lets tests know the Bayes ceiling; path
and, when scores were given, her2_score for the file sources of `data.sources`).

Owns, besides the bundle and loaders here: `sources/` (the user's files: image decoding, the
folder and manifest sources, validation, fingerprint, the synthetic export), `synthetic` (the
embedded patch generator), `synthetic_slides` (embedded whole-slide files), `slide_tiles`
(`data=slides`: a tile manifest read tile by tile), `splits` (patient-grouped splits and folds),
`datasets` (patch stores, the dataset, augmentation) and `bags` (cached embeddings grouped per
patient or slide for MIL).

May import the floors below it: `tracking`, `runtime`, `models`, `reports`, `metrics`, `stain`,
`slides`, `config` and `core`; never `engine`, `evaluation`, `training`, `apps` or the command
line, which build on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler, Subset

from her2exp.data import slide_tiles, sources, splits, synthetic
from her2exp.data.datasets import InMemoryPatches, PatchDataset, PatchStore, RowView
from her2exp.data.sources import FilePatches

__all__ = [
    "DataBundle",
    "FilePatches",
    "InMemoryPatches",
    "PatchDataset",
    "PatchStore",
    "RowView",
    "build",
    "build_cohort",
    "seeds",
]
from her2exp.core.seed import worker_init_fn
from her2exp.runtime.distributed import shard_indices


def _no_skipped() -> pd.DataFrame:
    return pd.DataFrame(columns=list(sources.SKIPPED_COLUMNS))


@dataclass
class DataBundle:
    """The manifest, where its pixels come from, and the fingerprint an auditor compares."""

    manifest: pd.DataFrame
    patches: PatchStore  # one patch per manifest row, in manifest order
    fingerprint: str
    #: Files dropped by data.on_bad_file=skip: (path, problem); empty otherwise.
    skipped: pd.DataFrame = field(default_factory=_no_skipped)
    #: Conversions applied while decoding (RGBA/grayscale -> RGB, resizes), with counts.
    notes: list[str] = field(default_factory=list)

    @property
    def images(self) -> np.ndarray:
        """The decoded (N, H, W, 3) array of an in-memory store (data.cache=true)."""
        if not isinstance(self.patches, InMemoryPatches):
            raise TypeError("this data set is read lazily: use bundle.view(split)")
        return self.patches.array

    def read(self, split: str) -> np.ndarray:
        """uint8 (N, H, W, 3) patches of one split, all decoded: small sets and tests only (the
        run itself uses `view`, so data.cache=false never holds a split in memory)."""
        return self.patches.read_many(self.indices(split))

    def view(self, split: str | None = None) -> RowView:
        """One split's patches (None: every row), read only when indexed (stain fitting,
        galleries)."""
        rows = self.indices(split) if split is not None else np.arange(len(self.manifest))
        return RowView(self.patches, rows)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.manifest["split"].to_numpy() == split)

    def labels(self, split: str) -> np.ndarray:
        return self.manifest["label"].to_numpy()[self.indices(split)]

    def counts(self) -> dict[str, dict[str, int]]:
        table = self.manifest.groupby(["split", "label"]).size()
        return {
            s: {"her2_neg": int(table.get((s, 0), 0)), "her2_pos": int(table.get((s, 1), 0))}
            for s in splits.SPLITS
        }


def seeds(cfg: DictConfig, seed: int) -> tuple[int, int]:
    """(data seed, split seed): `data.data_seed` renders the embedded data set and
    `data.split_seed` assigns patients to splits; null (the default) means the run's `seed`, so
    old runs and `her2exp-rerun` are unchanged. A repeat sweep (`-m seed=1,2,3`) fixes both to
    vary only the initialisation."""
    data_seed = cfg.get("data_seed")
    split_seed = cfg.get("split_seed")
    return (
        seed if data_seed is None else int(data_seed),
        seed if split_seed is None else int(split_seed),
    )


def build(cfg: DictConfig, seed: int) -> DataBundle:
    """Materialise the data set and its patient-grouped split; fails early on an unusable split.

    File sources (data=folder | data=manifest) raise sources.DataValidationError, a ValueError
    listing every bad file and split problem at once.
    """
    data_seed, split_seed = seeds(cfg, seed)
    if cfg.source == "slides":
        return _from_slides(cfg, split_seed, cohort=False)
    if cfg.source != "synthetic":
        return _from_files(sources.load(cfg, split_seed), cfg)
    bundle = build_cohort(cfg, data_seed)
    manifest = bundle.manifest
    manifest["split"] = splits.split_column(manifest, cfg.split, split_seed)
    splits.check(manifest)
    return DataBundle(manifest, bundle.patches, _fingerprint(cfg, data_seed, manifest))


def build_cohort(cfg: DictConfig, seed: int) -> DataBundle:
    """The whole data set as one cohort (split "cohort"): what an external evaluation scores."""
    if cfg.source == "slides":
        return _from_slides(cfg, seed, cohort=True)
    if cfg.source != "synthetic":
        return _from_files(sources.load(cfg, seed, cohort=True), cfg)
    data = synthetic.generate(
        n_patients=cfg.n_patients,
        patches_per_patient=cfg.patches_per_patient,
        image_size=cfg.image_size,
        sites=list(cfg.sites),
        positive_fraction=cfg.positive_fraction,
        seed=seed,
        positive_patch_fraction=cfg.get("positive_patch_fraction"),
    )
    manifest = data.frame.copy()
    manifest["split"] = "cohort"
    return DataBundle(manifest, InMemoryPatches(data.images), _fingerprint(cfg, seed, manifest))


def _from_files(loaded: sources.Loaded, cfg: DictConfig) -> DataBundle:
    """data.cache=true: the decoded patches in memory; false: decoded from their files when read."""
    if loaded.images is not None:
        store: PatchStore = InMemoryPatches(loaded.images)
    else:
        store = FilePatches(loaded.manifest["path"].to_numpy(), int(cfg.image_size))
    return DataBundle(
        loaded.manifest,
        store,
        loaded.fingerprint,
        loaded.skipped,
        loaded.notes,
    )


def _from_slides(cfg: DictConfig, seed: int, cohort: bool) -> DataBundle:
    loaded = slide_tiles.load(cfg, seed, cohort=cohort)
    store: PatchStore = loaded.store
    if cfg.get("cache", False):  # every tile read once, up front (small cohorts, benchmarks)
        store = InMemoryPatches(loaded.store.read_many(np.arange(len(loaded.store))))
        loaded.store.close()
    return DataBundle(loaded.manifest, store, loaded.fingerprint, loaded.skipped)


def _fingerprint(cfg: DictConfig, seed: int, manifest: pd.DataFrame) -> str:
    """Hash of the generator config, the seed and the manifest (ids, labels, splits).

    The input normalisation (mean/std) is left out: it belongs to the model (null: resolved from
    it at the start of a run) and does not change the data.
    """
    generator_cfg = OmegaConf.to_container(cfg, resolve=True)
    # The seeds enter as the generator's seed and through the manifest's split column.
    # bag_by groups rows into bags (mil): it does not change the data.
    for key in ("mean", "std", "data_seed", "split_seed", "bag_by"):
        generator_cfg.pop(key, None)
    # Unset, the generator is today's: the fingerprint too.
    if generator_cfg.get("positive_patch_fraction") is None:
        generator_cfg.pop("positive_patch_fraction", None)
    # The CV settings enter through the split column only, so runs without folds keep the
    # fingerprint they had before cross-validation existed.
    for key in ("folds", "fold", "by", "ignore_column"):
        generator_cfg.get("split", {}).pop(key, None)
    digest = hashlib.sha256()
    digest.update(json.dumps({"generator": generator_cfg, "seed": seed}, sort_keys=True).encode())
    digest.update(pd.util.hash_pandas_object(manifest, index=True).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def make_dataset(bundle: DataBundle, split: str | None, cfg: DictConfig, seed: int) -> PatchDataset:
    """Dataset of one split (None: every row), augmented only for "train"."""
    idx = bundle.indices(split) if split is not None else np.arange(len(bundle.manifest))
    return PatchDataset(
        bundle.patches,
        bundle.manifest["label"].to_numpy()[idx],
        augment=bool(cfg.augment) and split == "train",
        seed=seed,
        rows=idx,
    )


def _loader_kwargs(cfg: DictConfig, device: torch.device) -> dict:
    kwargs: dict = {
        "num_workers": cfg.num_workers,
        "pin_memory": bool(cfg.pin_memory) and device.type == "cuda",
        "worker_init_fn": worker_init_fn if cfg.num_workers > 0 else None,
    }
    if cfg.num_workers > 0:
        kwargs["persistent_workers"] = bool(cfg.persistent_workers)
        if cfg.prefetch_factor is not None:
            kwargs["prefetch_factor"] = cfg.prefetch_factor
    return kwargs


def train_loader(
    dataset: PatchDataset,
    cfg: DictConfig,
    seed: int,
    rank: int,
    world_size: int,
    device: torch.device,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """Shuffled by a sampler seeded with (seed, epoch): call `sampler.set_epoch` every epoch."""
    if cfg.batch_size % world_size:
        raise ValueError(
            f"data.batch_size={cfg.batch_size} is the global batch and must divide by the "
            f"world size {world_size}"
        )
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    per_rank = cfg.batch_size // world_size
    return DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        # A last batch of one sample breaks BatchNorm in train mode; drop only that case.
        drop_last=len(sampler) % per_rank == 1,
        collate_fn=collate_fn,
        **_loader_kwargs(cfg, device),
    )


def eval_loader(
    dataset: PatchDataset,
    cfg: DictConfig,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """In dataset order, every sample exactly once: rank r scores the r-th contiguous shard
    (no DistributedSampler padding, whose duplicates would bias AUC and thresholds)."""
    shard = Subset(dataset, shard_indices(len(dataset), rank, world_size).tolist())
    return DataLoader(
        shard,
        batch_size=cfg.eval_batch_size,
        shuffle=False,
        collate_fn=collate_fn,
        **_loader_kwargs(cfg, device),
    )
