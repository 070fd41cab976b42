"""`her2exp-compare` / `make compare`: the runs of an experiment or a sweep, best first.

    her2exp-compare [tracking.experiment=her2exp] [sweep=latest|all|<parent run id>] [out=compare.csv]
    her2exp-compare sweep=all tracking.uri=http://127.0.0.1:5000
    her2exp-compare leaderboard=true [sweep=latest|<parent run id>] [out=leaderboard.csv]

The table comes from her2exp/apps/compare.py: each run's decision level and operating point, and
its test sensitivity/specificity and AUC there. It is printed (counts as integers, metrics to 4
places, `-` where a run did not log a value) and written to `out` as CSV at full precision.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from her2exp.cli.common import hydra_command
from her2exp.config import commands as schemas


@hydra_command("compare")
def main(cfg: DictConfig) -> None:
    """Print the table and write it as CSV."""
    from her2exp.apps.compare import compare, format_table
    from her2exp.core.fileio import atomic_write_text

    schemas.check_compare(cfg)
    if cfg.leaderboard:
        show_leaderboard(cfg)
        return
    table = compare(cfg.tracking.experiment, str(cfg.sweep), cfg.tracking.uri)
    print(format_table(table))
    atomic_write_text(Path(cfg.out), table.to_csv(index=False))
    print(f"her2exp: {len(table)} runs, best first -> {cfg.out}")


def show_leaderboard(cfg: DictConfig) -> None:
    """Print the sweep parent's leaderboard (mean +- sd over the seeds) and write it as CSV."""
    from her2exp.apps.compare import leaderboard
    from her2exp.core.fileio import atomic_write_text
    from her2exp.evaluation.crossval import format_pm

    table = leaderboard(cfg.tracking.experiment, str(cfg.sweep), cfg.tracking.uri)
    print(
        "backbone | protocol | level | runs | test AUC mean +- sd [mean DeLong 95% CI] | "
        "sensitivity | specificity (at the frozen operating point)"
    )
    for _, r in table.iterrows():
        ci = f"[{r['test_auc_ci_low']:.3f}, {r['test_auc_ci_high']:.3f}]"
        print(
            f"{r['backbone']} | {r['protocol']} | {r['level']} | {r['n_runs']} | "
            f"{format_pm(r, 'test_auc')} {ci} | {format_pm(r, 'test_sensitivity')} | "
            f"{format_pm(r, 'test_specificity')}"
        )
    atomic_write_text(Path(cfg.out), table.to_csv(index=False))
    print(f"her2exp: leaderboard of {len(table)} backbone x protocol groups -> {cfg.out}")


if __name__ == "__main__":
    main()
