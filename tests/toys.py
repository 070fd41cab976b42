"""Small datasets shared by tests in several packages (tests/ is on sys.path, as for conftest)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class Patches(Dataset):
    """Fixed uint8 patches (3, 8, 8), label and index, as PatchDataset yields them."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
        self.y = torch.arange(n) % 2

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i
