"""The audit tags a reviewer needs to trust and repeat a run: pure functions, no MLflow.

Git tags are set here rather than by MLflow, whose own git tag follows sys.argv[0] and records
no dirty flag.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

#: The checkout the package is imported from (her2exp/tracking/audit.py -> the repository).
REPO_DIR = Path(__file__).resolve().parents[2]


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"trainer.lr": 0.001, ...}; lists kept as their string form."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


#: MLflow's limit on the characters of a param value.
PARAM_VALUE_CHARS = 6000


def as_params(flat: Mapping[str, Any]) -> dict[str, str]:
    """A flattened config as MLflow params hold it: keys in the characters MLflow accepts,
    values as strings cut to its limit. The run-directory view of a sweep's child
    (tracking.sweep_model) goes through this too, so both views compare the same strings."""
    return {re.sub(r"[^\w\-. /]", "_", k): str(v)[:PARAM_VALUE_CHARS] for k, v in flat.items()}


def _git(repo: Path, *args: str, timeout_s: float = 10) -> str | None:
    """stdout of a git command, None when git is missing or the command fails."""
    try:
        res = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def git_info(repo: Path = REPO_DIR) -> dict[str, str]:
    """Commit, branch and dirty flag of the repository the package is imported from."""
    commit = _git(repo, "rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": "unknown", "git_branch": "unknown", "git_dirty": "unknown"}
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    branch = _git(repo, "rev-parse", "--abbrev-ref", "HEAD")
    return {
        "git_commit": commit.strip(),
        "git_branch": branch.strip() if branch else "unknown",
        "git_dirty": "unknown" if status is None else str(bool(status.strip())).lower(),
    }


def git_diff(repo: Path = REPO_DIR) -> str:
    """The uncommitted changes of a dirty checkout: what a rerun must apply on top of the commit."""
    return _git(repo, "diff", "HEAD", timeout_s=30) or ""


def pip_freeze() -> str:
    """`pip freeze` of the running interpreter (read from package metadata: no subprocess)."""
    lines = {
        f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]
    }
    return "\n".join(sorted(lines, key=str.lower)) + "\n"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def environment_tags(device: torch.device) -> dict[str, str]:
    """Software versions, host and determinism settings: what decides whether a rerun agrees."""
    cudnn = str(torch.backends.cudnn.version()) if torch.cuda.is_available() else "none"
    return {
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "timm_version": _version("timm"),
        "hydra_version": _version("hydra-core"),
        "mlflow_version": _version("mlflow-skinny"),
        "cuda_version": str(torch.version.cuda),
        "cudnn_version": cudnn,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": _device_name(device),
        "cpu_count": str(os.cpu_count()),
        "cuda_device_count": str(torch.cuda.device_count()),
        "cudnn_deterministic": str(torch.backends.cudnn.deterministic).lower(),
        "torch_deterministic_algorithms": str(torch.are_deterministic_algorithms_enabled()).lower(),
        "torch_threads": str(torch.get_num_threads()),
    }


def command_line() -> str:
    """The command as typed: `her2exp-train experiment=smoke ...`."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def cv_tags(cfg: DictConfig) -> dict[str, str]:
    """`cv.fold`, `cv.folds`, `cv.by` of a cross-validation child (none outside CV), so a
    search finds the folds of one sweep without parsing params."""
    split = cfg.get("data", {}).get("split", {})
    if split.get("folds") is None:
        return {}
    return {"cv.fold": str(split.fold), "cv.folds": str(split.folds), "cv.by": str(split.by)}


def run_tags(
    cfg: DictConfig,
    device: torch.device,
    world_size: int,
    backend: str | None,
    overrides: list[str],
    data_fingerprint: str,
    weights: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The audit tags every run carries; `weights`: where the backbone's weights came from
    (`weights.source`, and for a local file `weights.file` and `weights.sha256`)."""
    tags = {
        "seed": str(cfg.seed),
        "overrides": " ".join(overrides),
        "command": command_line(),
        "world_size": str(world_size),
        "backend": backend or "none",
        "data_fingerprint": data_fingerprint,
        "model_name": cfg.model.name,
        "task_name": cfg.task_name,
        "deterministic": str(bool(cfg.trainer.deterministic)).lower(),
        **git_info(),
        **environment_tags(device),
        **{f"user.{k}": str(v) for k, v in (cfg.tags or {}).items()},
        **{f"weights.{k}": str(v) for k, v in (weights or {"source": "random init"}).items()},
    }
    tags["mlflow.source.git.commit"] = tags["git_commit"]  # what the MLflow UI shows
    tags.update(cv_tags(cfg))
    return tags
