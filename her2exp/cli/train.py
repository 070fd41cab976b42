"""`her2exp-train`: train a HER2 classifier (conf/train.yaml, its groups and key=value
overrides), evaluate it at thresholds frozen on validation and log the run to MLflow.

    her2exp-train model=resnet18 loss=focal trainer.epochs=50 stain=macenko
    her2exp-train experiment=smoke tracking=off               # a few seconds on the CPU
    her2exp-train -m data.split.folds=5 'data.split.fold=range(5)'   # patient-grouped CV

`her2exp-train --help` lists every group and key (cli/help.py). Returns the best validation AUC: the objective a Hydra sweeper maximises. The training stack
(torch, timm) is imported inside `main`, once Hydra has composed the config, so importing this
module stays light; her2exp.training.run validates the config before any work.
"""

from __future__ import annotations

import sys
from typing import Any

from omegaconf import DictConfig

from her2exp.cli.common import hydra_command, register_run_dir_resolvers

register_run_dir_resolvers()  # conf/hydra/default.yaml's run directory


def start_check(cfg: DictConfig) -> None:
    """Asked before Hydra writes the run directory (hydra_command's pre-check): a model name
    timm does not know, and what the run directory holds (training.run.check_start)."""
    from her2exp.training.run import check_start  # start-up time: torch, after composing

    check_start(cfg)


@hydra_command("train", start_check=start_check)
def main(cfg: DictConfig) -> float:
    """A user's mistake (ConfigError, a Hydra override error) is one line and exit 2 through
    hydra_command; a full disk is one line and exit 1; a pre-empted run exits 128 + signal."""
    from her2exp.core import checkpoint  # start-up time: torch, after the config composed
    from her2exp.runtime import distributed
    from her2exp.runtime.hydra_run import HydraRun
    from her2exp.training.run import run

    try:
        summary = run(cfg, HydraRun.current())  # Hydra's runtime config, read once, here
    except checkpoint.CheckpointWriteError as exc:
        print(f"her2exp: disk full: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as exc:
        if exc.errno not in checkpoint.FULL_DISK_ERRNOS:
            raise
        print(
            f"her2exp: disk full: {exc}; the checkpoints in {cfg.output_dir}/checkpoints are "
            "intact: free space and resume with trainer.resume=auto",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    if summary.get("stop_signal"):  # pre-empted: non-zero, as a scheduler expects
        if distributed.env_rank() == 0 and summary.get("tracking_deferred"):
            print(f"her2exp: warning: {summary['tracking_deferred']}", file=sys.stderr)
        raise SystemExit(128 + int(summary["stop_signal"]))
    if distributed.env_rank() == 0:
        report(summary)
    return float(summary["best_val_auc"])


def report(summary: dict[str, Any]) -> None:
    """The console summary of a finished (or stopped) run."""
    from her2exp.evaluation import format_table  # start-up time: the scoring stack (torch)

    if summary.get("tracking_deferred"):
        print(f"her2exp: warning: {summary['tracking_deferred']}", file=sys.stderr)
    if summary.get("interrupted"):
        return
    levels = summary["thresholds"]
    decision = summary.get("decision_level", "tile")
    test = summary["test_evaluation"]
    print(
        f"her2exp: best val AUC {summary['best_val_auc']:.4f} at epoch {summary['best_epoch']}"
        f" | Youden threshold (val) {levels['tile']['youden']:.4f} | test AUC {test.auc.auc:.4f}"
    )
    for level, th in levels.items():
        mark = " (the decision level)" if level == decision else ""
        print(
            f"her2exp: {level}-level operating points chosen on validation, then frozen{mark}: "
            + ", ".join(f"{k}={v:.4f}" for k, v in th.items())
        )
    print(format_table(summary["val_evaluation"], "validation (thresholds chosen here)", decision))
    print(format_table(test, "test (frozen thresholds)", decision))
    where = summary["tracking_uri"]
    if where:
        print(f"her2exp: MLflow run {summary['mlflow_run_id']} in {where}")
        print(
            f"her2exp: rerun from MLflow alone with: her2exp-rerun "
            f"run_id={summary['mlflow_run_id']} tracking.uri={where}"
        )
    print(f"her2exp: run directory {summary['run_dir']}")
    if summary.get("tracking_errors"):
        print(
            f"her2exp: MLflow logging failed {len(summary['tracking_errors'])} time(s), "
            f"first: {summary['tracking_errors'][0]}; checkpoints and reports are in the "
            "run directory",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
