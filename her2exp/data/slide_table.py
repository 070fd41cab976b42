"""The slide table `her2exp-tile` reads: one row per slide -> checked, picklable jobs.

Why its own module: the table is where a leak between splits starts. Labels, patients and
splits are checked as a patch manifest's are (unknown labels, a patient in two splits, a slide
id twice), and each slide is known by its content (`slides.signature`), not only by its path or
id: one scan listed under two slide ids or two patients - or twice with opposite labels - would
put the same tissue in train and test, so every such group is listed with its rows before any
slide is tiled. The signatures travel with the jobs: the tiler records them, and a slide whose
file changed after tiling is tiled again (and `data=slides` refuses it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from her2exp.core.errors import UserError
from her2exp.data.sources import DataValidationError, label_of, read_manifest
from her2exp.slides.signature import slide_signature


@dataclass(frozen=True)
class SlideJob:
    """One row of the slide table, resolved: what tiling a slide needs, picklable for workers."""

    slide_id: str
    path: str
    label: int
    her2_score: str
    patient_id: str
    site: str
    split: str
    annotation: str | None
    signature: str = ""  # slides.signature of the file; "" where it could not be read
    row: int = 0  # the table's row number as a spreadsheet shows it (the header is row 1)


def read_table(table: Path, what: str = "input") -> pd.DataFrame:
    """A CSV or Parquet table as text cells; an unreadable, empty or header-only file is one
    UserError line naming it (not a pandas or pyarrow traceback)."""
    try:
        frame = read_manifest(table)
    except Exception as exc:  # noqa: BLE001 - pandas, pyarrow, csv, OS: one line naming the file
        reason = " ".join(str(exc).split()) or type(exc).__name__
        kind = "Parquet" if table.suffix.lower() in (".parquet", ".pq") else "CSV"
        raise UserError(f"{what}={table}: not a readable {kind} table ({reason})") from None
    if not len(frame):
        got = ", ".join(frame.columns) or "none"
        raise UserError(f"{what}={table}: no rows (columns: {got}): one row per slide needed")
    return frame


def read_slide_table(table: Path, data: DictConfig) -> list[SlideJob]:
    """The slide table (CSV or Parquet; paths relative to it) -> jobs; every problem of the
    table listed at once: missing columns or files, unknown labels, duplicate slides (by id or
    by content), a patient in two splits."""
    frame = read_table(table)
    if "path" not in frame.columns or not ({"label", "score"} & set(frame.columns)):
        got = ", ".join(frame.columns)
        raise DataValidationError(
            str(table),
            [(str(table), f"needs a path column and a label or score column (columns: {got})")],
        )
    column = "label" if "label" in frame.columns else "score"
    problems, jobs = [], []
    for i, row in enumerate(frame.to_dict("records")):
        path = Path(str(row["path"]))
        # Absolute in the manifest: training reads it from any working directory.
        path = path if path.is_absolute() else table.resolve().parent / path
        slide_id = _cell(row, "slide_id") or path.stem
        try:
            label, score = label_of(row[column], data, column)
        except KeyError:
            problems.append((str(path), f"row {i + 2}: unknown {column} {row[column]!r}"))
            continue
        if label is None:  # an equivocal score excluded by data.equivocal
            continue
        annotation = _cell(row, "annotation")
        if annotation and not Path(annotation).is_absolute():
            annotation = str(table.parent / annotation)
        patient = _cell(row, "patient_id") or slide_id
        jobs.append(
            SlideJob(
                slide_id,
                str(path),
                label,
                score or _cell(row, "her2_score"),
                patient,
                _cell(row, "site") or "site",
                _cell(row, "split"),
                annotation or None,
                row=i + 2,
            )  # fmt: skip
        )
    problems += _table_problems(jobs)
    jobs, unreadable = _signed(jobs)
    problems += unreadable + duplicate_problems(jobs)
    if problems:
        raise DataValidationError(str(table), problems)
    return jobs


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _table_problems(jobs: list[SlideJob]) -> list[tuple[str, str]]:
    problems = [
        (j.path, "a folder, not a slide file" if Path(j.path).is_dir() else "no such file")
        for j in jobs
        if not Path(j.path).is_file()
    ]
    problems += [
        (j.annotation, "annotation: no such file")
        for j in jobs
        if j.annotation and not Path(j.annotation).is_file()
    ]
    ids = pd.Series([j.slide_id for j in jobs])
    problems += [(s, "slide_id appears more than once") for s in sorted(set(ids[ids.duplicated()]))]
    splits: dict[str, set[str]] = {}
    for j in jobs:
        if j.split:
            splits.setdefault(j.patient_id, set()).add(j.split)
    problems += [
        (p, f"patient in more than one split: {', '.join(sorted(s))}")
        for p, s in sorted(splits.items())
        if len(s) > 1
    ]
    return problems


def _signed(jobs: list[SlideJob]) -> tuple[list[SlideJob], list[tuple[str, str]]]:
    """The jobs with their files' signatures, and the files that could not be read for one."""
    signed, problems = [], []
    for job in jobs:
        if not Path(job.path).is_file():  # already listed as "no such file"
            signed.append(job)
            continue
        try:
            signed.append(replace(job, signature=slide_signature(job.path)))
        except OSError as exc:
            problems.append((job.path, f"unreadable: {exc.strerror or type(exc).__name__}"))
    return signed, problems


def duplicate_problems(jobs: list[SlideJob]) -> list[tuple[str, str]]:
    """One problem per slide file listed in more than one row (the same content under any
    path, id, patient or label), naming every row; rows that only repeat a slide_id are
    already listed by the id check."""
    groups: dict[str, list[SlideJob]] = {}
    for job in jobs:
        if job.signature:
            groups.setdefault(job.signature, []).append(job)
    problems = []
    for group in groups.values():
        if len(group) < 2 or len({j.slide_id for j in group}) < 2:
            continue
        rows = "; ".join(
            f"row {j.row}: slide_id {j.slide_id}, patient {j.patient_id}, label {j.label}"
            + (f", split {j.split}" if j.split else "")
            + ("" if j.path == group[0].path else f", {j.path}")
            for j in group
        )
        problems.append(
            (group[0].path, f"one slide file (same content) in {len(group)} rows ({rows}): "
             "its tissue would be in more than one slide, patient or split; keep one row")
        )  # fmt: skip
    return problems
