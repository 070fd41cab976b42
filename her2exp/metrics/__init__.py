"""Binary HER2 metrics a reviewer can trust: AUC with confidence intervals, operating points
chosen on validation, rates with Wilson intervals at frozen thresholds, calibration, decision
curves and slide- and patient-level aggregation.

Pure functions over numpy arrays, dataclasses out; no plotting and no files
(:mod:`her2exp.reports` draws and writes). Label 1 is HER2+ (the positive class). Every rate is
defined as 0/0 -> NaN rather than raising, so a split with one class or a model that never
predicts a class still yields a complete (if partly NaN) table. Inputs that cannot be scored
at all (NaN scores, mismatched lengths, labels other than 0/1, an empty split) raise a
ValueError naming the problem.

One module per concern; everything public is re-exported here, so ``metrics.X`` is the name
to use:

- :mod:`~her2exp.metrics.ranking`: AUC, DeLong and stratified-bootstrap CIs, ROC and PR curves.
- :mod:`~her2exp.metrics.proportions`: the Wilson interval of a rate.
- :mod:`~her2exp.metrics.operating_points`: thresholds chosen on validation (Youden, a target
  sensitivity, a target the one-sided lower bound reaches) and :class:`BinaryReport`, the
  rates at a frozen threshold.
- :mod:`~her2exp.metrics.probabilities`: calibration (Brier, ECE, reliability), temperature
  scaling (fit on validation, apply downstream) and decision curves.
- :mod:`~her2exp.metrics.levels`: tile scores aggregated per slide and patient (mean, max,
  topk_mean), operating points chosen at each level, thresholds keyed by level.
- :mod:`~her2exp.metrics.split_report`: :func:`evaluate_split`, the single entry point the
  trainer, ``her2exp-eval`` and the reports use, at each level; error lists; JSON.

The speed of the intervals is measured by ``make bench`` (:mod:`her2exp.bench.ci`).

May import: numpy, scipy, scikit-learn, and of her2exp only `config` and `core` (today:
``core.fileio.safe_name`` for a site's metric name); never torch, and never `stain` or `slides`,
its siblings on the floor.
"""

from her2exp.metrics.decision import CALLED_PREFIX, called, called_columns
from her2exp.metrics.levels import (
    AGGREGATIONS,
    LEVELS,
    GroupScores,
    PatientScores,
    aggregate_by_group,
    aggregate_by_patient,
    as_level_thresholds,
    level_groups,
    level_scores,
    operating_points_by_level,
)
from her2exp.metrics.operating_points import (
    BinaryReport,
    Promise,
    at_threshold,
    choose_threshold,
    effective_n,
    lcb_name,
    operating_points,
    positives_needed,
    promise,
    sensitivity_lcb,
    threshold_for_sensitivity,
    threshold_for_sensitivity_lcb,
    youden_threshold,
)
from her2exp.metrics.probabilities import (
    Calibration,
    DecisionCurve,
    apply_calibration,
    apply_temperature,
    calibration,
    decision_curve,
    fit_temperature,
    temperature_nll,
)
from her2exp.metrics.proportions import wilson_interval
from her2exp.metrics.ranking import (
    AucCI,
    PrCurve,
    RocCurve,
    auc,
    auc_ci_bootstrap,
    auc_ci_delong,
    pr_curve,
    roc_with_band,
)
from her2exp.metrics.split_report import (
    LevelEvaluation,
    PatientEvaluation,
    SiteEvaluation,
    SplitEvaluation,
    evaluate_split,
    misclassified,
    to_jsonable,
)

__all__ = [
    "CALLED_PREFIX",
    "called",
    "called_columns",
    "AGGREGATIONS",
    "LEVELS",
    "AucCI",
    "BinaryReport",
    "Calibration",
    "DecisionCurve",
    "GroupScores",
    "LevelEvaluation",
    "PatientEvaluation",
    "PatientScores",
    "PrCurve",
    "Promise",
    "RocCurve",
    "SiteEvaluation",
    "SplitEvaluation",
    "aggregate_by_group",
    "aggregate_by_patient",
    "apply_calibration",
    "apply_temperature",
    "as_level_thresholds",
    "at_threshold",
    "auc",
    "auc_ci_bootstrap",
    "auc_ci_delong",
    "calibration",
    "choose_threshold",
    "decision_curve",
    "effective_n",
    "evaluate_split",
    "lcb_name",
    "level_groups",
    "fit_temperature",
    "level_scores",
    "misclassified",
    "operating_points",
    "operating_points_by_level",
    "positives_needed",
    "pr_curve",
    "promise",
    "roc_with_band",
    "sensitivity_lcb",
    "temperature_nll",
    "threshold_for_sensitivity",
    "threshold_for_sensitivity_lcb",
    "to_jsonable",
    "wilson_interval",
    "youden_threshold",
]
