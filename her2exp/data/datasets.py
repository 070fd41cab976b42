"""In-memory patch dataset with cheap, deterministic, rotation-invariant augmentation.

Augmentation draws from an RNG keyed by (seed, epoch, index), so a batch looks the same whatever
the worker count, rank or resume point: resumed runs replay exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class PatchDataset(Dataset):
    """uint8 HWC patches -> uint8 CHW tensors (augmented for training), label and row index.

    Normalisation to float (mean/std) happens on the training device (engine.StepContext), so
    stain normalisation can act on uint8 batches in between and host-to-device copies are 4x
    smaller.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool = False,
                 seed: int = 0) -> None:  # fmt: skip
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
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
        x = self.images[index]
        if self.augment:
            # Dihedral group D4: histology has no up, down, left or right.
            k, flip = divmod(hash((self.seed, self.epoch, index)) % 8, 2)
            x = torch.rot90(x, k, dims=(1, 2))
            if flip:
                x = torch.flip(x, dims=(2,))
        return x.contiguous(), self.labels[index], index
