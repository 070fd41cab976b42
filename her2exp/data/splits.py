"""Patient-grouped, stratified train/val/test assignment: no patient ever spans two splits.

Patches of one patient share stain, scanner and biology; letting them straddle train and test
inflates AUC. Stratification is by patient status so each split keeps the HER2+ prevalence.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


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


def check(frame: pd.DataFrame) -> None:
    """Refuse splits that would make metrics meaningless, naming the split and the class."""
    leaked = frame.groupby("patient_id")["split"].nunique()
    leaked = leaked[leaked > 1]
    if len(leaked):
        raise ValueError(f"patients in more than one split: {', '.join(leaked.index[:10])}")
    for split in SPLITS:
        labels = set(frame.loc[frame["split"] == split, "label"].tolist())
        for cls, name in ((0, "HER2-"), (1, "HER2+")):
            if cls not in labels:
                raise ValueError(
                    f"split {split!r} has no {name} (label {cls}) sample; every split needs both "
                    "classes: add patients (data.n_patients) or change data.split fractions"
                )
