"""Compatibility names: the evaluation path now lives in her2exp/evaluation.py and the
`her2exp-eval` command in her2exp/cli/eval.py."""

from her2exp.evaluation import (
    ScoredSplit,
    evaluate_cohort,
    format_table,
    load_source,
    report_cohorts,
)

__all__ = ["ScoredSplit", "evaluate_cohort", "format_table", "load_source", "report_cohorts"]
