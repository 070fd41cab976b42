"""The Clinical Evaluation Checklist: each item judged from the numbers (AUC, sensitivity and
specificity at the val-chosen operating point, the galleries, thresholds re-derived from
validation, decision curves, external cohorts, seed and commit), as rows and a markdown table.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from her2exp.metrics import (
    LEVELS,
    SplitEvaluation,
    as_level_thresholds,
    choose_threshold,
    level_groups,
)
from her2exp.reports.formatting import fmt

#: The Clinical Evaluation Checklist's criteria, defined here once: a run's checklist and a
#: cross-validation sweep's pooled one (evaluation.sweep_markdown) judge against the same values.
AUC_MIN = 0.95
RECALL_MIN = 0.90
SPECIFICITY_MIN = 0.85


def val_level_scores(val: SplitEvaluation, level: str) -> tuple[Any, Any] | None:
    if level == "tile":
        return None if val.labels is None else (val.labels, val.scores)
    ev = val.levels().get(level)
    return None if ev is None else (ev.scores.labels, ev.scores.scores)


def val_level_groups(val: SplitEvaluation, level: str) -> Any:
    """The patient of each unit of `level` on val (what the promised point's bound counts)."""
    return level_groups(level, val.slide_ids, val.patient_ids)


def thresholds_from_validation(
    evaluations: dict[str, SplitEvaluation], header: dict[str, Any]
) -> tuple[bool | None, str]:
    """Were the thresholds applied to every split, at every level, the ones validation chooses?

    With a val split, each level's operating points are re-derived from val's own labels and
    scores at that level (``metrics.choose_threshold`` on tiles, slide or patient aggregates)
    and compared with the threshold each split's reports were actually computed at, so
    thresholds tuned anywhere else fail even when every split was scored at the same (wrong)
    values. Without one (``her2exp-eval`` on a cohort), the reference is
    ``header["thresholds"]``, the values frozen into the training run's checkpoint.
    """
    val = evaluations.get("val")
    chosen: dict[str, dict[str, float]] = {}
    if val is not None:
        if val.labels is None or val.scores is None:
            return None, "val split without its scores: its thresholds cannot be re-derived"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # one class: choose_threshold falls back to 0.5
                confidence = float(header.get("lcb_confidence") or 0.95)
                for level in LEVELS:
                    pair = val_level_scores(val, level)
                    names = val.level_reports(level)
                    groups = val_level_groups(val, level)
                    if pair is not None and names:
                        chosen[level] = {
                            n: choose_threshold(n, *pair, groups, confidence) for n in names
                        }
        except ValueError as exc:
            return None, f"cannot re-derive the val thresholds: {exc}"
        source = "chosen on val"
    elif header.get("thresholds"):
        chosen = as_level_thresholds(header["thresholds"])
        source = "frozen from the training run's validation split"
    else:
        return False, "no validation split and no frozen thresholds given"
    mismatches = []
    for split, ev in evaluations.items():
        for level in LEVELS:
            want_level, reports_ = chosen.get(level, {}), ev.level_reports(level)
            if level != "tile" and not want_level and not reports_:
                continue  # neither frozen nor reported at this level
            for name in dict.fromkeys([*want_level, *reports_]):
                want, rep = want_level.get(name), reports_.get(name)
                used = None if rep is None else rep.threshold
                if want is None or used is None or not math.isclose(used, want, abs_tol=1e-12):
                    where = split if level == "tile" else f"{split} {level}"
                    mismatches.append(f"{where} {name} {fmt(used, 4)} vs {fmt(want, 4)}")
    if mismatches:
        return False, f"thresholds used differ from those {source}: " + "; ".join(mismatches[:4])
    levels = ", ".join(chosen) or "tile"
    return True, f"thresholds {source} ({levels} level), used unchanged on every split"


def checklist_item(name: str, passed: bool | None, evidence: str) -> dict[str, str]:
    """One checklist row: PASS, FAIL or n/a (None: not applicable) with its evidence."""
    status = "n/a" if passed is None else ("PASS" if passed else "FAIL")
    return {"item": name, "status": status, "evidence": evidence}


def checklist_table(checklist: list[dict[str, str]]) -> list[str]:
    """The checklist as markdown table lines (summary.md, the sweep parent's summaries)."""
    lines = ["| item | status | evidence |", "|---|---|---|"]
    return lines + [f"| {c['item']} | {c['status']} | {c['evidence']} |" for c in checklist]


def clinical_checklist(
    evaluations: dict[str, SplitEvaluation],
    header: dict[str, Any],
    galleries_written: bool,
    decision_curve_written: bool,
) -> list[dict[str, str]]:
    """The seed's Clinical Evaluation Checklist, each item judged from the numbers."""
    val, test = evaluations.get("val"), evaluations.get("test")
    op = header.get("operating_point") or (
        "youden" if val is None or "youden" in val.thresholds else next(iter(val.thresholds))
    )

    item = checklist_item
    off = "" if header.get("figures", True) else "figures off (evaluation.figures=false)"
    level = header.get("decision_level") or "tile"

    def at_op(ev: SplitEvaluation | None, field: str) -> float:
        rep = None if ev is None else ev.level_reports(level).get(op)
        return math.nan if rep is None else float(getattr(rep, field))

    # An external-only evaluation has no val/test split: those items are not applicable there.
    def judged(ok: bool, ev: SplitEvaluation | None) -> bool | None:
        return None if ev is None else ok

    val_auc = math.nan if val is None else val.auc.auc
    sens, spec = at_op(test, "sensitivity"), at_op(test, "specificity")
    external = [k for k in evaluations if k not in ("val", "test")]
    commit = str(header.get("git_commit") or "")
    return [
        item(
            f"AUC >= {AUC_MIN:.2f} on validation",
            judged(val_auc >= AUC_MIN, val),
            f"val AUC {fmt(val_auc)}",
        ),
        item(
            f"HER2+ recall >= {RECALL_MIN:.2f} (test, val-chosen operating point)",
            judged(sens >= RECALL_MIN, test),
            f"test sensitivity {fmt(sens)} at {op}, {level} level (the decision level)",
        ),
        item(
            f"Specificity >= {SPECIFICITY_MIN:.2f} (test, val-chosen operating point)",
            judged(spec >= SPECIFICITY_MIN, test),
            f"test specificity {fmt(spec)} at {op}, {level} level (the decision level)",
        ),
        item(
            "False-negative analysis present",
            galleries_written,
            "false-negative gallery written" if galleries_written else off or "no gallery given",
        ),
        item(
            "Threshold tuned on validation and documented",
            *thresholds_from_validation(evaluations, header),
        ),
        item(
            "Decision curve analysis present",
            decision_curve_written,
            "decision_curve.png" if decision_curve_written else off or "missing",
        ),
        item(
            "External cohort evaluated",
            bool(external),
            ", ".join(external) if external else "no external cohort given",
        ),
        item(
            "Seed and git commit recorded",
            header.get("seed") is not None and commit not in ("", "unknown", "None"),
            f"seed {header.get('seed')}, commit {commit or 'missing'}",
        ),
    ]
