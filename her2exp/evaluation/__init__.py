"""Evaluation: a trained run loaded, scored and called at the thresholds it froze on validation.

Owns what turns a trained run into decisions and reports: loading best.pt and its frozen
thresholds (`trained_run`), the one `Scorer` every path from pixels or features to
probabilities goes through (`scorer`), cohorts and her2exp-eval (`cohort`, `evaluate`),
metrics at frozen thresholds and the reports (`scored`, `reporting`), an eval's MLflow run
(`record`), bags (`bags`), ensembles of a sweep's members (`ensemble`), a sweep's pooled
results (`crossval`) and the Hydra sweep callback that records them (`sweep_callback`), and the
MLflow pyfunc model (`served`).

May import the floors below it: engine, data, tracking, runtime, models, reports, metrics,
stain, slides, config, core. Never training, apps, cli or bench (they import it).

| module           | holds                                                                    |
|------------------|--------------------------------------------------------------------------|
| `trained_run`    | `TrainedRun`, `load_run`, `load_model`, `run_stain`, the frozen checks  |
| `scorer`         | `Scorer`, `build_scorer`, `score` (a split), `calibrate`, `prepare_patches` |
| `scored`         | `ScoredSplit`, `thresholds_on_rows`, `evaluate_scored`, `level_table`   |
| `reporting`      | `report_cohorts`, `remove_stale_reports`, `format_table`                 |
| `cohort`         | `Cohort`, `load_cohort`, `score_cohort`, `prepare_evaluation`            |
| `record`         | `EvalRecord`, `record_eval`                                              |
| `evaluate`       | `evaluate_cohort` (her2exp-eval's library part)                          |

This `__init__` only re-exports; the modules import each other, never the package.
"""

from her2exp.evaluation.cohort import (
    Cohort,
    load_cohort,
    prepare_evaluation,
    rebuild_run_data,
    score_cohort,
)
from her2exp.evaluation.evaluate import evaluate_cohort
from her2exp.evaluation.record import EvalRecord, record_eval
from her2exp.evaluation.reporting import (
    PER_SPLIT_REPORTS,
    format_table,
    remove_stale_reports,
    report_cohorts,
)
from her2exp.evaluation.scored import (
    ScoredSplit,
    evaluate_scored,
    level_table,
    thresholds_on_rows,
)
from her2exp.evaluation.scorer import Scorer, build_scorer, calibrate, calibrated, score
from her2exp.evaluation.trained_run import (
    CHECKPOINT_KEYS,
    TrainedRun,
    by_model_uri,
    check_frozen_aggregation,
    check_frozen_scoring,
    describe_source,
    level_thresholds,
    load_checkpoint,
    load_model,
    load_run,
    load_source,
    one_line,
    resolve_evaluation,
    run_stain,
)

__all__ = [
    "CHECKPOINT_KEYS",
    "PER_SPLIT_REPORTS",
    "Cohort",
    "EvalRecord",
    "ScoredSplit",
    "Scorer",
    "TrainedRun",
    "build_scorer",
    "calibrate",
    "calibrated",
    "check_frozen_aggregation",
    "check_frozen_scoring",
    "describe_source",
    "evaluate_cohort",
    "evaluate_scored",
    "format_table",
    "level_table",
    "level_thresholds",
    "load_checkpoint",
    "load_cohort",
    "load_model",
    "by_model_uri",
    "load_run",
    "load_source",
    "one_line",
    "prepare_evaluation",
    "rebuild_run_data",
    "record_eval",
    "remove_stale_reports",
    "report_cohorts",
    "resolve_evaluation",
    "run_stain",
    "score",
    "score_cohort",
    "thresholds_on_rows",
]
