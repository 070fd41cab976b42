"""Checkpoints that survive a crash mid-write and load with `weights_only=True`.

Only tensors, numbers, strings, lists and dicts go in, so loading never unpickles arbitrary code.
A write goes to a temporary file in the same directory, is fsynced, then `os.replace`d over the
target: a reader sees the old checkpoint or the new one, never half of one.

Each file has a `sha256sum`-style sidecar (`last.pt.sha256`) checked on load, so a file damaged
after the fact (a bad copy, a failing disk) is refused with its name instead of resuming from
garbage. Two files cannot be replaced atomically together, so the sidecar is rewritten *before*
the replace to accept both the new and the current file, and narrowed to the new one after it: a
process killed at any instant leaves a checkpoint that matches its sidecar.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from her2exp.core.fileio import atomic_write, atomic_write_text, name_the_file  # noqa: F401


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states in weights_only-safe types."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npst["bit_generator"],
            "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
            "has_gauss": npst["has_gauss"],
            "gauss": npst["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, file-size limit); the previous one is
    intact."""

    def __str__(self) -> str:
        return str(self.strerror)


class CheckpointCorruptError(RuntimeError):
    """A checkpoint does not match the checksum written with it."""


FULL_DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _accepted(sidecar: Path) -> list[str]:
    """The digests a sidecar accepts (first one: the file's current content)."""
    try:
        lines = sidecar.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [ln.split()[0] for ln in lines if ln.strip()]


def save(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically write `state` to `path` with its checksum sidecar.

    A failed write (disk full, EFBIG under a file-size limit) removes the temporary file and
    raises CheckpointWriteError naming the file; the previous checkpoint is untouched.
    """
    path = Path(path)
    sidecar = checksum_path(path)
    digest = ""

    def accept_both(tmp: Path) -> None:
        nonlocal digest
        digest = sha256_file(tmp)
        current = _accepted(sidecar)
        if not current and path.is_file():  # a checkpoint written before sidecars existed
            current = [sha256_file(path)]
        # Accept the new and the current content while the replace is pending ...
        atomic_write_text(sidecar, "".join(f"{d}  {path.name}\n" for d in [digest, *current[:2]]))

    try:
        atomic_write(path, lambda fh: torch.save(state, fh), before_replace=accept_both)
        # ... then only the new one (`sha256sum -c last.pt.sha256` checks it).
        atomic_write_text(sidecar, f"{digest}  {path.name}\n")
    except BaseException as exc:
        code = _full_disk_errno(exc)
        if code is not None:
            raise CheckpointWriteError(
                code,
                f"checkpoint {path} could not be written ({os.strerror(code)}, errno {code}); "
                "the previous "
                f"{path.name} is intact. Free disk space (or raise the quota / file-size limit) "
                "and resume with trainer.resume=auto",
                str(path),
            ) from exc
        raise
    return path


def _full_disk_errno(exc: BaseException) -> int | None:
    """ENOSPC/EFBIG/EDQUOT behind `exc`, also when torch's zip writer wrapped the OSError in a
    RuntimeError ("unexpected pos ...") with the original as its context."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL_DISK_ERRNOS:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


def verify(path: str | Path) -> None:
    """Compare `path` with its sidecar; a file without one (an MLflow download) is accepted."""
    path = Path(path)
    sidecar = checksum_path(path)
    accepted = _accepted(sidecar)
    if not accepted:
        return
    actual = sha256_file(path)
    if actual not in accepted:
        raise CheckpointCorruptError(
            f"checkpoint {path} does not match its checksum in {sidecar.name} "
            f"(sha256 {actual[:16]}..., expected {accepted[0][:16]}...): the file is damaged or "
            "was replaced. Restore it, or delete it (and its .sha256) to start that run afresh"
        )


def load(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Verify the checksum, then load with `weights_only=True`; every failure names the file.

    `mmap=True`: tensors stay in the file's pages (private, copy-on-write) until used, so a
    17 GB last.pt is not read into memory at once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    verify(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise RuntimeError(
            f"checkpoint {path} could not be loaded ({_load_failure(exc)}): it is truncated, "
            "damaged, or not a PyTorch checkpoint"
        ) from exc


def _load_failure(exc: BaseException) -> str:
    """torch.load's reason in one short line: its messages run over many lines, and the
    weights_only one advises weights_only=False, which would run the file's code."""
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    if text.startswith("Weights only load failed"):
        text = "the weights_only unpickler refused it"
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
