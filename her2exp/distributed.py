"""Rank, world size and device in one place, so no other module reads RANK or calls dist directly.

A run started by torchrun (RANK/LOCAL_RANK/WORLD_SIZE set) joins a process group: nccl on CUDA,
gloo otherwise. Without those variables the run is a plain single process with no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files, logs to MLflow and draws progress bars."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError(f"trainer.device={requested} but CUDA is not available here")
        index = int(requested.split(":")[1]) if ":" in requested else local_rank
        return torch.device("cuda", index)
    return torch.device("cpu")


def init(requested_device: str = "auto") -> DistContext:
    """Detect torchrun and join its process group; otherwise a single-process context."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = _pick_device(requested_device, local_rank)
    backend = None
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
    return DistContext(rank, local_rank, world_size, device, backend)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
