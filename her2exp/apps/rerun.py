"""Repeat a training run from what MLflow holds, nothing else (the library part of
`her2exp-rerun`, her2exp/cli/rerun.py).

The run's resolved config (artifact `config_resolved.yaml`) is trained again with the same seed,
world size and data; the new run is tagged `user.rerun_of` and the two runs' headline numbers are
printed side by side. A different git commit, or a dirty original checkout (its diff is the
`audit/git_diff.patch` artifact), is reported, since code is the one input MLflow cannot replay.

    her2exp-rerun run_id=<run id> [tracking.uri=sqlite:///mlflow.db] [out=DIR]
"""

from __future__ import annotations

import datetime
import logging
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from her2exp import tracking
from her2exp.config import TrainConfig
from her2exp.runtime.rundir import ARTIFACTS, artifact

log = logging.getLogger("her2exp")


def rerun(run_id: str, uri: str, output_dir: str | None = None) -> tuple[dict, dict[str, Any]]:
    """Retrain `run_id` from its logged config; returns (original metrics, new summary)."""
    # Here, not at the top: importing training.run registers the configs and loads torch, timm and
    # MLflow, which `her2exp-rerun --help` and a bad argument should not wait for.
    from her2exp.training.run import run as run_training

    with tempfile.TemporaryDirectory(prefix="her2exp-rerun-") as tmp:
        original, local = tracking.download_from_run(
            uri, run_id, artifact(ARTIFACTS.config_resolved), tmp, "not a training run"
        )
        logged = OmegaConf.load(local)
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), logged)
    tags = original.data.tags
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    cfg.output_dir = output_dir or f"outputs/rerun/{run_id}/{stamp}"
    cfg.tracking.uri = uri
    cfg.tracking.run_name = f"rerun of {original.info.run_name or run_id}"
    cfg.tags = {**(cfg.tags or {}), "rerun_of": run_id}
    cfg.trainer.resume = None
    world = int(tags.get("world_size", "1"))
    if world > 1 and cfg.trainer.nproc_per_node == 1:
        cfg.trainer.nproc_per_node = world  # same data split per rank and global batch
    head = tracking.git_info()["git_commit"]
    if tags.get("git_commit") not in (None, head):
        log.warning(
            "run %s was trained at commit %s; this checkout is at %s",
            run_id,
            tags.get("git_commit"),
            head,
        )
    if tags.get("git_dirty") == "true":
        log.warning("run %s came from a dirty checkout: apply its audit/git_diff.patch", run_id)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    return dict(original.data.metrics), run_training(cfg)
