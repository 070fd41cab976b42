"""Patient-grouped, stratified train/val/test assignment: no patient ever spans two splits.

Patches of one patient share stain, scanner and biology; letting them straddle train and test
inflates AUC. Stratification is by patient status so each split keeps the HER2+ prevalence.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
#: What to change when a split lacks a class (the synthetic source; file sources pass their own).
DEFAULT_HINT = ": add patients (data.n_patients) or change data.split fractions"


def assign(frame: pd.DataFrame, fractions: tuple[float, float, float], seed: int) -> pd.Series:
    """Return a `split` column: patients shuffled within each status, cut at the fractions.

    Each split gets at least one patient of each status when the stratum has >= 3 patients, so
    validation AUC and the val-chosen threshold always exist.
    """
    patients = frame.groupby("patient_id", sort=True)["label"].max()
    rng = np.random.default_rng(seed)
    split_of: dict[str, str] = {}
    for status in sorted(patients.unique()):
        ids = patients.index[patients == status].to_numpy().copy()
        rng.shuffle(ids)
        n = len(ids)
        n_val = int(round(fractions[1] * n))
        n_test = int(round(fractions[2] * n))
        if n >= 3:
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        n_train = n - n_val - n_test
        for i, pid in enumerate(ids):
            split_of[pid] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return frame["patient_id"].map(split_of).rename("split")


def problems(frame: pd.DataFrame, hint: str = "") -> list[str]:
    """Every reason the split would make metrics meaningless, naming the patient, split and class.

    Patients in two splits come first (with their files when the frame has a `path` column),
    then each split missing a class; `hint` ends the missing-class lines (what to change).
    """
    found: list[str] = []
    per_patient = frame.groupby("patient_id")["split"].nunique()
    for pid in per_patient.index[per_patient > 1]:
        rows = frame[frame["patient_id"] == pid]
        where = []
        for split, group in rows.groupby("split", sort=True):
            files = ""
            if "path" in group.columns:
                shown = [str(p) for p in group["path"].head(3)]
                more = f", ... ({len(group)} files)" if len(group) > 3 else ""
                files = f" ({', '.join(shown)}{more})"
            where.append(f"{split}{files}")
        found.append(f"patient {pid!r} is in more than one split: {'; '.join(where)}")
    if found:
        leaked = [str(p) for p in per_patient.index[per_patient > 1]]
        found.insert(0, f"patients in more than one split: {', '.join(leaked[:10])}")
    for split in SPLITS:
        labels = set(frame.loc[frame["split"] == split, "label"].tolist())
        for cls, name in ((0, "HER2-"), (1, "HER2+")):
            if cls not in labels:
                found.append(
                    f"split {split!r} has no {name} (label {cls}) sample; every split needs both "
                    f"classes{hint}"
                )
    return found


def check(frame: pd.DataFrame, hint: str = DEFAULT_HINT) -> None:
    """Refuse splits that would make metrics meaningless: one ValueError listing every problem."""
    found = problems(frame, hint)
    if found:
        raise ValueError("\n".join(found))
