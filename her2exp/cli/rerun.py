"""`her2exp-rerun`: train a logged run again from its MLflow record alone, side by side.

    her2exp-rerun run_id=<MLflow run id>                 # -> outputs/rerun/<run id>/<time>
    her2exp-rerun run_id=<MLflow run id> tracking.uri=http://host:5000 out=DIR

(`her2exp-rerun <run id> ...`, the older spelling, still works.)
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from her2exp.cli.common import hydra_command
from her2exp.config import commands as schemas


@hydra_command("rerun", positional="run_id")
def main(cfg: DictConfig) -> None:
    """Retrain, then print the original's and the rerun's headline numbers."""
    from her2exp.apps.rerun import rerun

    schemas.check_rerun(cfg)
    logging.getLogger("her2exp").setLevel(logging.INFO)
    # Hydra's runtime config is not passed on: the retrained run records the original's
    # overrides, not this command line's (training reads it only as its entry hands it over).
    before, after = rerun(str(cfg.run_id), cfg.tracking.uri, cfg.out)
    print(f"her2exp: rerun of {cfg.run_id} is MLflow run {after['mlflow_run_id']}")
    for key, new in (("best_val_auc", after["best_val_auc"]), ("test_auc", after["test_auc"])):
        print(f"  {key:>13}: original {before.get(key, float('nan')):.6f}  rerun {new:.6f}")


if __name__ == "__main__":
    main()
