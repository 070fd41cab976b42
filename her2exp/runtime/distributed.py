"""Everything that knows about ranks: process-group set-up, the shared run directory, broadcasts,
all-reduces, exact-once evaluation shards and the in-process launcher used by sweeps.

Two ways in, one code path: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; `trainer.nproc_per_node=N`
makes the Hydra process start N workers with PyTorch's elastic launcher. Without either the run is
a plain single process with no process group. Backend nccl on CUDA, gloo otherwise.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

RUN_DIR_KEY = "her2exp/run_dir"


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


def env_rank() -> int:
    return int(os.environ.get("RANK", 0))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def under_launcher() -> bool:
    """True inside a torchrun (or elastic_launch) worker."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError(f"trainer.device={requested} but CUDA is not available here")
        index = int(requested.split(":")[1]) if ":" in requested else local_rank
        return torch.device("cuda", index)
    return torch.device("cpu")


def init(requested_device: str = "auto", timeout_s: float = 300.0) -> DistContext:
    """Join torchrun's process group (bounded timeout, so a lost rank cannot hang the others)."""
    rank, world_size = env_rank(), env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _pick_device(requested_device, local_rank)
    backend = None
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            # torchrun's agent keeps one key-value store across `--max-restarts` restarts, and
            # gloo/nccl publish each rank's address under fixed keys: a restarted group could
            # read a dead worker's address and fail to connect. One key prefix per attempt.
            timeout = datetime.timedelta(seconds=timeout_s)
            store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
            store = dist.PrefixStore(f"her2exp/attempt_{restart_count()}", store)
            dist.init_process_group(
                backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout
            )
    return DistContext(rank, local_rank, world_size, device, backend)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# -- one run directory for every rank ------------------------------------------------------------
def _launcher_store() -> dist.TCPStore | None:
    if not under_launcher() or env_world_size() < 2 or "MASTER_ADDR" not in os.environ:
        return None
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=120),
    )


def shared_run_dir(proposed: str) -> str:
    """Hydra resolver: every rank of one torchrun job gets rank 0's run directory.

    Ranks compose their configs independently, so `${now:}` can differ by a second between them.
    Rank 0 publishes its choice in the launcher's key-value store (the first attempt's choice is
    kept across torchrun restarts, so a restarted job resumes in the same folder); the others read
    it. Outside torchrun this returns `proposed` unchanged.
    """
    store = _launcher_store()
    if store is None:
        return proposed
    key = f"{RUN_DIR_KEY}/{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}"
    if env_rank() == 0:
        return store.compare_set(key, "", proposed).decode()
    return store.get(key).decode()


def rank_log_name(job_name: str) -> str:
    """`train.log` for a single process, `train_rank{N}.log` for each rank of a DDP job."""
    return f"{job_name}_rank{env_rank()}.log" if env_world_size() > 1 else f"{job_name}.log"


def main_rank_subdir(subdir: str) -> str | None:
    """Hydra's `.hydra/` folder is written by rank 0 only."""
    return subdir if env_rank() == 0 else None


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("her2exp_run_dir", shared_run_dir, replace=True)
    OmegaConf.register_new_resolver("her2exp_log_name", rank_log_name, replace=True)
    OmegaConf.register_new_resolver("her2exp_main_subdir", main_rank_subdir, replace=True)


# -- collectives ---------------------------------------------------------------------------------
def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (identity for a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on at least one (a stop request, say)."""
    agreed = any_rank_tensor(torch.tensor([1.0 if flag else 0.0], device=device))
    return bool(agreed.item() > 0)


def any_rank_tensor(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise max across ranks, in place and without a host sync: flags agreed by all.

    The engine packs every per-step decision (skip a non-finite step, stop on a signal) into one
    small tensor and agrees it with this single collective, so every rank does the same.
    """
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


@dataclass(frozen=True)
class _TensorSlot:
    """Where a tensor sits in a broadcast structure: shape, dtype, on the host or not."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    on_host: bool


def _map_leaves(obj: Any, fn: Callable[[Any], Any], kind: type) -> Any:
    """`obj` with every `kind` leaf (a tensor, or its slot) replaced by fn(leaf), in order."""
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_leaves(v, fn, kind) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_leaves(v, fn, kind) for v in obj)
    return obj


def broadcast_state(
    obj: Any, device: torch.device, to: torch.device | None = None, src: int = 0
) -> Any:
    """Rank `src`'s nested dict/list of tensors on every rank, one tensor at a time.

    Only the structure (keys, numbers, shapes) is pickled; each tensor is broadcast in place
    through a buffer on `device` (NCCL needs the GPU) and lands where `src` keeps it: on this
    rank's `device`, or on the host for a host tensor (AdamW's `step`), or on `to` when given.
    So no rank ever holds a pickled copy of a model or its optimizer state (docs/scaling.md).
    Returns `obj` itself on `src` and without a process group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    is_src = dist.get_rank() == src

    def slot(t: torch.Tensor) -> _TensorSlot:
        return _TensorSlot(tuple(t.shape), t.dtype, t.device.type == "cpu")

    skeleton = broadcast_object(_map_leaves(obj, slot, torch.Tensor) if is_src else None, src)
    sources: list[torch.Tensor] = []
    if is_src:
        _map_leaves(obj, sources.append, torch.Tensor)
    pending = iter(sources)

    def receive(s: _TensorSlot) -> torch.Tensor:
        if is_src:
            buf = next(pending).to(device)  # no copy when it is already there
        else:
            buf = torch.empty(s.shape, dtype=s.dtype, device=device)
        dist.broadcast(buf, src=src)
        target = to if to is not None else (torch.device("cpu") if s.on_host else device)
        return buf.to(target)

    received = _map_leaves(skeleton, receive, _TensorSlot)
    return obj if is_src else received


def restart_count() -> int:
    """How many times torchrun (`--max-restarts`) has restarted this worker group."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums across ranks, used for sample-weighted loss means."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Parameters and buffers (BatchNorm running stats) from rank `src` to all ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src)


def shard_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous, non-overlapping, unpadded shard: every sample scored exactly once."""
    return np.array_split(np.arange(n), world_size)[rank]


def gather_in_order(parts: np.ndarray) -> np.ndarray:
    """Concatenate every rank's contiguous shard in rank order, i.e. in dataset order."""
    gathered = all_gather_object(np.asarray(parts))
    nonempty = [g for g in gathered if len(g)]  # an empty shard may not have the others' shape
    return np.concatenate(nonempty) if nonempty else np.asarray(parts)


# -- DDP wrapping --------------------------------------------------------------------------------
def wrap_ddp(
    model: nn.Module, dctx: DistContext, sync_bn: bool = False
) -> tuple[nn.Module, Callable[[], contextlib.AbstractContextManager] | None]:
    """DDP-wrap `model` for a multi-process run; returns (model, no_sync or None)."""
    if not dctx.is_distributed:
        return model, None
    if sync_bn:
        if dctx.device.type != "cuda":
            raise ValueError(
                "trainer.sync_bn=true needs CUDA (SyncBatchNorm has no gloo/CPU implementation);"
                " set trainer.sync_bn=false on the CPU"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[dctx.local_rank] if dctx.device.type == "cuda" else None
    )
    return ddp, ddp.no_sync


# -- in-process launch (sweeps) ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    entrypoint: Callable[..., Any], nproc: int, args: tuple, log_dir: Path, timeout_s: float = 300
) -> Any:
    """Start `nproc` local workers with PyTorch's elastic launcher; return rank 0's result."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"her2exp-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_configs={"timeout": int(timeout_s)},
        max_restarts=0,
        monitor_interval=0.5,
    )
    results = elastic_launch(config, entrypoint)(*args)
    return results[0]


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    """Temporarily set environment variables (for workers spawned by `launch`)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
