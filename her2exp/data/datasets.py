"""Patch stores (where pixels come from) and the dataset over them, with cheap, deterministic,
rotation-invariant augmentation.

A `PatchStore` is the only thing the dataset asks for pixels: `InMemoryPatches` holds the array
decoded up front (data.cache=true); `sources.FilePatches` decodes files in the DataLoader workers
(data.cache=false), and a store that reads tiles from slides implements the same two methods and
plugs in without touching the bundle, the splits or the loaders (docs/architecture.md, "Data").
`RowView` is some rows of a store, read only when indexed.

Augmentation draws from an RNG keyed by (seed, epoch, index), so a batch looks the same whatever
the worker count, rank or resume point: resumed runs replay exactly.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset


@runtime_checkable
class PatchStore(Protocol):
    """Patches by row of the manifest, as uint8 RGB; may read lazily (in a worker process)."""

    def __len__(self) -> int: ...

    def read(self, row: int) -> torch.Tensor:
        """One patch as a uint8 (3, H, W) tensor."""
        ...

    def read_many(self, rows: np.ndarray) -> np.ndarray:
        """Patches as a uint8 (N, H, W, 3) array (stain fitting, galleries, feature caching)."""
        ...


class InMemoryPatches:
    """Every patch decoded once, up front, held as one (N, H, W, 3) uint8 array."""

    def __init__(self, images: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expected uint8 (N, H, W, 3) patches, got {images.dtype} {images.shape}"
            )
        self.array = images
        self._chw = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)

    def __len__(self) -> int:
        return len(self.array)

    def read(self, row: int) -> torch.Tensor:
        return self._chw[row]

    def read_many(self, rows: np.ndarray) -> np.ndarray:
        return self.array[np.asarray(rows, dtype=np.int64)]


class RowView:
    """Some rows of a store, read only when indexed: a split's patches for stain fitting (which
    samples `fit_patches` of them) and the galleries (which show at most `gallery_max`) without
    decoding the whole split. Indexes like the (N, H, W, 3) array it stands for: an int gives
    one (H, W, 3) patch, a slice or an index array an (n, H, W, 3) array."""

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, store: PatchStore, rows: np.ndarray) -> None:
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self._patch_shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, H, W, 3); H and W from the first patch (one decode, remembered)."""
        if self._patch_shape is None:
            first = self.store.read_many(self.rows[:1])
            self._patch_shape = first.shape[1:] if len(first) else (0, 0, 3)
        return (len(self.rows), *self._patch_shape)

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(key, int | np.integer):
            return self.store.read_many(self.rows[[key]])[0]
        return self.store.read_many(self.rows[key])

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        """Every row at once (small sets and tests only: this is what the view avoids)."""
        out = self.store.read_many(self.rows)
        return out if dtype is None else out.astype(dtype)


class PatchDataset(Dataset):
    """Rows of a patch store -> uint8 CHW tensors (augmented for training), label and index.

    Normalisation to float (mean/std) happens on the training device (engine.Preprocess), so
    stain normalisation can act on uint8 batches in between and host-to-device copies are 4x
    smaller. `index` is the position in this dataset (the augmentation key), not the row.
    """

    def __init__(
        self,
        store: PatchStore | np.ndarray,
        labels: np.ndarray,
        augment: bool = False,
        seed: int = 0,
        rows: np.ndarray | None = None,
    ) -> None:
        self.store = store if isinstance(store, PatchStore) else InMemoryPatches(store)
        self.rows = np.arange(len(self.store)) if rows is None else np.asarray(rows, np.int64)
        if len(self.rows) != len(labels):
            raise ValueError(f"{len(self.rows)} images but {len(labels)} labels")
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.augment = augment
        self.seed = seed
        # In shared memory: persistent DataLoader workers hold their own copy of the dataset,
        # and must still see the epoch the trainer sets.
        self._epoch = torch.zeros(1, dtype=torch.long).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x = self.store.read(int(self.rows[index]))
        if self.augment:
            # Dihedral group D4: histology has no up, down, left or right.
            k, flip = divmod(hash((self.seed, self.epoch, index)) % 8, 2)
            x = torch.rot90(x, k, dims=(1, 2))
            if flip:
                x = torch.flip(x, dims=(2,))
        return x.contiguous(), self.labels[index], index
