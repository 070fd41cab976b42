"""`data=manifest`: a CSV or Parquet table of patches (path, label or score, patient_id,
slide_id, site, split; other columns are kept).

Paths are relative to the manifest's folder unless absolute. A filled `split` column is honoured
(every row must then name train, val or test); under cross-validation it is refused, or ignored
with `data.split.ignore_column=true`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from her2exp.data import splits
from her2exp.data.sources.labels import allowed_labels, label_of
from her2exp.data.sources.scan import (
    MANIFEST_COLUMNS,
    META_COLUMNS,
    UNKNOWN_SITE,
    DataValidationError,
    Scan,
)


def _cell(value: Any) -> str:
    """A manifest cell as text: NaN/None -> "", 1.0 -> "1", surrounding spaces dropped."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def read_manifest(path: Path) -> pd.DataFrame:
    """A CSV or Parquet manifest as text cells with lower-case column names."""
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                f"data.path={path}: reading Parquet needs pyarrow (pip install pyarrow), "
                "or save the manifest as CSV"
            ) from exc
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    return frame.map(_cell) if len(frame) else frame.astype(str)


def cv_ignores_column(cfg: DictConfig, where: str) -> bool:
    """A filled split column under cross-validation: refused, or ignored when
    `data.split.ignore_column=true` (the folds then split the patients)."""
    if not splits.is_cv(cfg.get("split")):
        return False
    if not cfg.split.get("ignore_column", False):
        raise splits.FoldError(
            f"{where} has its own split column, which data.split.folds would override: empty "
            "it, or set data.split.ignore_column=true"
        )
    return True


def _checked_manifest(cfg: DictConfig) -> tuple[Path, str, pd.DataFrame]:
    """`data.path` read, with the columns a manifest needs and at least one row: the problems
    of the table as a whole, which stop the scan before any row is looked at."""
    if not cfg.path:
        raise DataValidationError("data=manifest", [("data.path", "not set: data.path=FILE.csv")])
    path = Path(str(cfg.path)).expanduser()
    where = f"data.path={path}"
    if not path.is_file():
        raise DataValidationError(where, [(str(path), "manifest file not found")])
    try:
        frame = read_manifest(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        if "pyarrow" in str(exc):
            raise
        raise DataValidationError(where, [(str(path), f"unreadable manifest: {exc}")]) from None
    structural = []
    if "path" not in frame.columns:
        structural.append(("columns", "no 'path' column"))
    if "label" not in frame.columns and "score" not in frame.columns:
        structural.append(("columns", "neither a 'label' nor a 'score' column (0, 1+, 2+, 3+)"))
    if structural:
        got = ", ".join(frame.columns) or "none"
        raise DataValidationError(where, [(c, f"{p} (columns: {got})") for c, p in structural])
    if not len(frame):
        raise DataValidationError(where, [(str(path), "empty manifest: no rows")])
    return path, where, frame


def _row_label(rec: dict[str, str], cfg: DictConfig) -> tuple[int | None, str, str]:
    """(label, score, problem) of a row: its `label` column when filled, else its `score`;
    label -1 with a problem when unknown, None when an excluded 2+."""
    use_label = "label" in rec and rec["label"] != ""
    column = "label" if use_label or "score" not in rec else "score"
    raw = rec[column]
    problem = ""
    try:
        label, score = label_of(raw, cfg, column)
    except KeyError:
        what = f"unknown {column} {raw!r}" if raw else f"empty {column}"
        label, score = -1, ""
        problem = f"{what} (allowed: {allowed_labels(cfg, column)})"
    if use_label and "score" in rec and rec["score"]:
        score = rec["score"]
    return label, score, problem


def _split_problem(rec: dict[str, str]) -> str:
    """What is wrong with a row's split when the split column is used ("" when nothing)."""
    split = rec.get("split", "").lower()
    if split in splits.SPLITS:
        return ""
    return f"split {rec.get('split', '')!r} is not one of {', '.join(splits.SPLITS)}" + (
        " (the split column is filled for other rows)" if not split else ""
    )


def _row_record(
    rec: dict[str, str],
    display: str,
    label: tuple[int, str],
    patient: str,
    base: Path,
    explicit: bool,
) -> dict[str, Any]:
    """A scan row of a manifest row: `label` is (label, HER2 score); extra columns kept."""
    file = Path(os.path.expanduser(rec["path"]))
    file = os.path.normpath(str(file if file.is_absolute() else base / file))
    extra = {k: v for k, v in rec.items() if k not in (*MANIFEST_COLUMNS, "score", "file")}
    return {
        **extra,
        "file": file if rec["path"] else "",
        "display": display,
        "label": label[0],
        "her2_score": label[1],
        "patient_id": patient,
        "slide_id": rec.get("slide_id", "") or patient,
        "site": rec.get("site", "") or UNKNOWN_SITE,
        "split": rec.get("split", "").lower() if explicit else "",
    }


def scan_manifest(cfg: DictConfig, cohort: bool) -> Scan:
    """The rows of `data.path` and what is wrong with each (files not opened). cohort=True
    ignores the split column: every row is then scored as one external cohort."""
    path, where, frame = _checked_manifest(cfg)
    base = path.resolve().parent
    explicit = not cohort and "split" in frame.columns and (frame["split"] != "").any()
    explicit = explicit and not cv_ignores_column(cfg, where)
    has_patient = "patient_id" in frame.columns
    records: list[dict[str, Any]] = []
    problems: dict[int, list[str]] = {}
    excluded = own = 0
    for i, rec in enumerate(frame.to_dict("records")):
        display = rec["path"] or f"(row {i + 1})"
        wrong = [] if rec["path"] else ["empty path"]
        label, score, label_problem = _row_label(rec, cfg)
        if label is None:
            excluded += 1
            continue
        wrong += [label_problem] if label_problem else []
        split_problem = _split_problem(rec) if explicit else ""
        wrong += [split_problem] if split_problem else []
        patient = rec.get("patient_id", "") if has_patient else ""
        if not patient:
            own += 1
            patient = display
        if wrong:
            problems[len(records)] = wrong
        records.append(_row_record(rec, display, (label, score), patient, base, explicit))
    rows = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=META_COLUMNS)
    if not records:
        rows["file"], rows["display"] = [], []
    return Scan(where, rows, problems, [], explicit, excluded, own)
