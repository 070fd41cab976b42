"""Patient-grouped, stratified train/val/test assignment: no patient ever spans two splits.

Patches of one patient share stain, scanner and biology; letting them straddle train and test
inflates AUC. Stratification is by patient status so each split keeps the HER2+ prevalence.
"""

from __future__ import annotations

from typing import Any

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


class FoldError(ValueError):
    """Cross-validation settings this data set cannot meet (one line, naming the values)."""


def is_cv(split_cfg: Any) -> bool:
    """Whether `data.split` asks for cross-validation (data.split.folds set)."""
    return split_cfg is not None and split_cfg.get("folds") is not None


def split_column(frame: pd.DataFrame, split_cfg: Any, seed: int) -> pd.Series:
    """The `split` column every source assigns: today's fractions, or fold k of K under CV."""
    fractions = (split_cfg.train, split_cfg.val, split_cfg.test)
    if not is_cv(split_cfg):
        return assign(frame, fractions, seed)
    return assign_fold(
        frame, fractions, seed, int(split_cfg.folds), int(split_cfg.fold), str(split_cfg.by)
    )


def assign_fold(
    frame: pd.DataFrame,
    fractions: tuple[float, float, float],
    seed: int,
    folds: int,
    fold: int,
    by: str = "patient",
) -> pd.Series:
    """A `split` column for fold `fold` of `folds`: its patients are the test split.

    by="patient": scikit-learn's StratifiedGroupKFold over patients (y = patient status,
    shuffled by `seed`). by="site": leave-one-site-out, fold k holds the k-th site (sorted) out.
    Validation is carved from the other patients, grouped and stratified, taking
    val / (train + val) of them; the test fraction is not used.
    """
    patients = frame.groupby("patient_id", sort=True)["label"].max()
    if by == "site":
        test_ids = _site_fold(frame, folds, fold)
    else:
        test_ids = _patient_fold(patients, seed, folds, fold)
    rest = patients[~patients.index.isin(test_ids)]
    val_fraction = fractions[1] / (fractions[0] + fractions[1])
    rng = np.random.default_rng(seed)
    split_of = dict.fromkeys(test_ids, "test")
    for status in sorted(rest.unique()):
        ids = rest.index[rest == status].to_numpy().copy()
        rng.shuffle(ids)
        n_val = int(round(val_fraction * len(ids)))
        if len(ids) >= 2:
            n_val = min(max(n_val, 1), len(ids) - 1)
        split_of.update({pid: "val" if i < n_val else "train" for i, pid in enumerate(ids)})
    return frame["patient_id"].map(split_of).rename("split")


def _patient_fold(patients: pd.Series, seed: int, folds: int, fold: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedGroupKFold

    counts = patients.value_counts()
    for cls, name in ((0, "HER2-"), (1, "HER2+")):
        if int(counts.get(cls, 0)) < folds:
            raise FoldError(
                f"data.split.folds={folds} is more than the {int(counts.get(cls, 0))} {name} "
                f"patients: every test fold needs one of each class (fewer folds or more patients)"
            )
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    ids = patients.index.to_numpy()
    status = patients.to_numpy()
    _, test = list(cv.split(ids, status, groups=ids))[fold]
    return ids[test]


def _site_fold(frame: pd.DataFrame, folds: int, fold: int) -> np.ndarray:
    sites_of = frame.groupby("patient_id", sort=True)["site"].unique()
    spanning = [str(p) for p, s in sites_of.items() if len(s) > 1]
    if spanning:
        raise FoldError(
            f"data.split.by=site: patients at more than one site cannot be held out with a "
            f"site: {', '.join(spanning[:5])}"
        )
    sites = sorted(str(s) for s in frame["site"].unique())
    if len(sites) < 2:
        raise FoldError(
            f"data.split.by=site needs at least two sites: the data has one ({sites[0]!r})"
        )
    if folds != len(sites):
        raise FoldError(
            f"data.split.folds={folds} with data.split.by=site: must equal the {len(sites)} "
            f"sites ({', '.join(sites)})"
        )
    site = sites_of.map(lambda s: str(s[0]))
    return site.index[site == sites[fold]].to_numpy()


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
