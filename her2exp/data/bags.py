"""Bags of cached tile embeddings: grouped by `data.bag_by`, padded per batch with a mask.

A bag is every tile of one patient (or slide) in one split, in the split's dataset order; its
label is the patient's (a bag whose tiles disagree is refused). A batch of bags travels the
engine's one path as a single float tensor (B, n, D + 1): the embeddings padded to the longest
bag of the batch and, in the last column, the mask (1 = a real tile). So `engine.train_one_epoch`
and `engine.score` take bag batches unchanged, and `BagModel` splits the column off again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from her2exp.models.mil import build_head


def mil_name(cfg: Any) -> str:
    """The run's `mil.name` ("none" for a run from before MIL)."""
    return str(OmegaConf.select(cfg, "mil.name", default=None) or "none")


def bag_by(cfg: Any) -> str:
    return str(OmegaConf.select(cfg, "data.bag_by", default=None) or "patient")


@dataclass(frozen=True)
class Bags:
    """One split's tiles as bags: bag i holds the split positions `members[i]`."""

    by: str  # patient | slide
    ids: list[str]
    members: list[np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def group_bags(rows: pd.DataFrame, by: str) -> Bags:
    """Bags of `rows` (one split, in dataset order) by `<by>_id`, in order of first appearance."""
    column = f"{by}_id"
    if column not in rows:
        raise ValueError(f"data.bag_by={by}: the manifest has no {column} column to form bags")
    codes, uniques = pd.factorize(rows[column].astype(str), sort=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes, minlength=len(uniques)))[:-1]
    members = np.split(order, bounds) if len(order) else []
    labels = rows["label"].to_numpy()
    bag_labels = np.array([labels[m[0]] for m in members], dtype=np.int64)
    mixed = [str(uniques[i]) for i, m in enumerate(members) if (labels[m] != bag_labels[i]).any()]
    if mixed:
        raise ValueError(
            f"data.bag_by={by}: {len(mixed)} bag(s) hold tiles of both labels "
            f"({', '.join(mixed[:5])}): a bag needs one label"
        )
    return Bags(by, [str(u) for u in uniques], members, bag_labels)


def bag_rows(rows: pd.DataFrame, bags: Bags) -> pd.DataFrame:
    """One row per bag for the evaluation path: bag_id, label, n_tiles and its patient (and
    slide for slide bags) and site, taken from its first tile. Patient bags carry no slide_id,
    so no slide level is made up from them."""
    first = np.array([m[0] for m in bags.members], dtype=np.int64)
    out = pd.DataFrame({"bag_id": bags.ids, "label": bags.labels})
    keep = ["patient_id", "slide_id", "site"] if bags.by == "slide" else ["patient_id", "site"]
    for column in keep:
        if column in rows:
            out[column] = rows[column].to_numpy()[first]
    out["n_tiles"] = [len(m) for m in bags.members]
    return out


def pack(features: list[torch.Tensor]) -> torch.Tensor:
    """Bags (n_i, D) -> (B, max n_i, D + 1): zero padding, the mask in the last column."""
    n = max((len(f) for f in features), default=0)
    dim = features[0].shape[1] if features else 0
    out = torch.zeros(len(features), n, dim + 1, dtype=torch.float32)
    for i, f in enumerate(features):
        out[i, : len(f), :dim] = f
        out[i, : len(f), dim] = 1.0
    return out


def unpack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n, D + 1) -> features (B, n, D), mask (B, n) bool (True = real tile)."""
    return x[..., :-1], x[..., -1] > 0.5


class BagDataset(Dataset):
    """(embeddings of the bag's tiles (n_i, D), its label, its index), like PatchDataset items."""

    def __init__(self, features: torch.Tensor, bags: Bags) -> None:
        self.features, self.bags = features, bags
        self.labels = torch.as_tensor(bags.labels, dtype=torch.long)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # nothing is drawn per epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        rows = torch.from_numpy(self.bags.members[index])
        return self.features[rows], self.labels[index], index


def collate_bags(
    batch: list[tuple[torch.Tensor, torch.Tensor, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A list of bags -> (packed (B, n, D + 1), labels (B,), indices (B,))."""
    x = pack([b[0] for b in batch])
    return x, torch.stack([b[1] for b in batch]), torch.tensor([b[2] for b in batch])


class BagModel(nn.Module):
    """The MIL head behind the packed-batch interface: `forward` gives logits (what the engine
    trains and scores), `attend` logits and attention (what the reports save)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(*unpack(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(x)[0]


def attach_head(model: Any, mil_cfg: Any) -> None:
    """Replace a Her2Classifier's tile head by the bag head (`model.head` = BagModel), so a
    checkpoint is still the whole model (backbone.* + head.*) and eval rebuilds it alike."""
    n = model.backbone.num_features * (2 if model.embedding == "cls_mean" else 1)
    device = next(model.backbone.parameters()).device
    model.head = BagModel(build_head(mil_cfg, n)).to(device)


@torch.no_grad()
def attention(
    model: BagModel, loader: torch.utils.data.DataLoader, device: torch.device
) -> np.ndarray:
    """Every bag's attention over its real tiles, concatenated in loader order (flat)."""
    model.eval()
    out = []
    for x, *_ in loader:
        x = x.to(device)
        _, weights = model.attend(x)
        mask = unpack(x)[1]
        out.extend(w[m].float().cpu().numpy() for w, m in zip(weights, mask, strict=True))
    return np.concatenate(out) if out else np.zeros(0)


def attention_table(rows: pd.DataFrame, bags: Bags, weights: np.ndarray) -> pd.DataFrame:
    """reports/attention_<split>.csv: bag_id, row (the manifest row, as in predictions_<split>.csv),
    attention, and the tile's slide_id, patient_id, x, y where the rows have them."""
    positions = np.concatenate(bags.members) if len(bags) else np.zeros(0, dtype=np.int64)
    out = pd.DataFrame(
        {
            "bag_id": np.repeat(bags.ids, [len(m) for m in bags.members]),
            "row": rows["row"].to_numpy()[positions] if "row" in rows else positions,
            "attention": weights,
        }
    )
    for column in ("slide_id", "patient_id", "x", "y"):
        if column in rows:
            out[column] = rows[column].to_numpy()[positions]
    return out
