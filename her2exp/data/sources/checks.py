"""Checks of a source's usable rows as a whole, after each file has been checked: a patient
whose patches carry both labels, nothing left, a split (or the cohort) missing a class. Shared
by the patch sources and the slide tile manifest (`data=slides`), so both refuse the same data
sets with the same words."""

from __future__ import annotations

import logging

import pandas as pd

from her2exp.data import splits

log = logging.getLogger("her2exp.data")


def patient_labels(good: pd.DataFrame, rule: str) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """HER2 status belongs to the patient (one tumour): a patient whose patches carry both labels
    is a problem listed with its files (`data.patient_label=error`), or every patch takes the
    patient's label by `max` (HER2+ if any patch is) or `majority` (a tie is HER2+)."""
    if not len(good):
        return good, []
    per = good.groupby("patient_id", sort=True)["label"].agg(["sum", "count"])
    mixed = per[(per["sum"] > 0) & (per["sum"] < per["count"])]
    if not len(mixed):
        return good, []
    if rule == "error":
        return good, [_mixed_line(good, str(pid)) for pid in mixed.index]
    if rule == "max":
        status = pd.Series(1, index=mixed.index)
    else:
        status = (2 * mixed["sum"] >= mixed["count"]).astype(int)
    rows = good["patient_id"].isin(mixed.index)
    new = good.loc[rows, "patient_id"].map(status)
    changed = int((good.loc[rows, "label"] != new).sum())
    good = good.copy()
    good.loc[rows, "label"] = new.to_numpy()
    log.warning(
        "data: %d patients had patches of both labels (%s); data.patient_label=%s relabelled %d "
        "patches to their patient's label",
        len(mixed),
        ", ".join(str(p) for p in mixed.index[:10]),
        rule,
        changed,
    )
    return good, []


def _mixed_line(good: pd.DataFrame, pid: str) -> tuple[str, str]:
    rows = good[good["patient_id"] == pid]
    parts = []
    for cls, name in ((1, "HER2+"), (0, "HER2-")):
        files = rows.loc[rows["label"] == cls, "display"].astype(str).tolist()
        more = f", ... ({len(files)} files)" if len(files) > 3 else ""
        parts.append(f"{len(files)} {name} ({', '.join(files[:3])}{more})")
    return (
        f"patient {pid!r}",
        f"patches carry both labels: {'; '.join(parts)}; HER2 status is the patient's: fix "
        "the labels, or set data.patient_label=max|majority",
    )


def structural_problems(
    good: pd.DataFrame, explicit_split: bool, cohort: bool
) -> list[tuple[str, str]]:
    """What makes the usable rows unusable as a whole: nothing left, a class or split missing.
    `good` needs label, patient_id, split and display (how a row is named in messages)."""
    if not len(good):
        return [("(all)", "no usable patches left")]
    if cohort:
        return [
            ("(cohort)", f"no {name} (label {cls}) patch: AUC needs both")
            for cls, name in ((0, "HER2-"), (1, "HER2+"))
            if cls not in set(good["label"])
        ]
    frame = good.assign(path=good["display"])
    hint = (
        ": fill in the split column so that each split has both"
        if explicit_split
        else ": add patients or change data.split (fractions)"
    )
    return [("(split)", p) for p in splits.problems(frame, hint)]
