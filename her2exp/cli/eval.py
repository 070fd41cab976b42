"""`her2exp-eval`: a trained run scored at its frozen thresholds (her2exp/evaluation/).

    her2exp-eval run_id=<MLflow run id> 'data.sites=[external]'     # a new cohort
    her2exp-eval checkpoint=.../best.pt data=folder data.root=/path/site2
    her2exp-eval run_id=<MLflow run id> split=test                  # the run's own test split
    her2exp-eval sweep_run_id=<sweep parent run id> 'data.sites=[external]'   # an ensemble

The run's evaluation settings (decision level, operating point, aggregations, bootstrap, ...) and its
trainer.amp stand unless given here (`evaluation.n_boot=2000`, `trainer.amp=off`).
"""

from __future__ import annotations

from omegaconf import DictConfig

from her2exp.cli.common import hydra_command, register_run_dir_resolvers
from her2exp.config import commands as schemas

register_run_dir_resolvers()  # conf/hydra/default.yaml's run directory


def start_check(cfg: DictConfig) -> None:
    """Asked before Hydra writes the run directory (hydra_command's pre-check): an output
    directory that holds a training run is refused (rundir.refuse_a_training_run)."""
    from pathlib import Path

    from her2exp.runtime.rundir import refuse_a_training_run  # after composing: torch

    refuse_a_training_run(Path(cfg.output_dir), "her2exp-eval")


@hydra_command("eval", start_check=start_check)
def main(cfg: DictConfig) -> float:
    """Evaluate, print the table, say where the MLflow run and the report are."""
    from her2exp.evaluation import evaluate_cohort, format_table
    from her2exp.runtime.hydra_run import HydraRun

    schemas.check_eval(cfg)
    out = evaluate_cohort(cfg, HydraRun.current())  # Hydra's runtime config, read once, here
    ev = out["evaluation"]
    s = out["settings"]
    ens = out.get("ensemble")
    source = (
        f"the ensemble's: {ens.chosen_on}" if ens else "frozen thresholds from the training run"
    )
    title = f"{out['cohort']} ({source})"
    print(format_table(ev, title, s.decision_level))
    print(
        f"her2exp: decision level {s.decision_level}, operating point {s.operating_point}, "
        f"slide aggregation {s.slide_aggregation}, patient aggregation {s.patient_aggregation}"
        f" (topk {s.topk}), {s.n_boot} bootstrap resamples"
    )
    if out["mlflow_run_id"]:
        print(f"her2exp: MLflow run {out['mlflow_run_id']} in {out['tracking_uri']}")
    print(f"her2exp: report in {out['report_dir']}")
    return float(ev.auc.auc)


if __name__ == "__main__":
    main()
