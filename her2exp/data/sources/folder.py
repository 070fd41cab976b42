"""`data=folder`: class (or HER2 score) sub-folders of patches under `data.root`.

Each sub-folder names a class (`her2_neg/`, `her2_pos/`) or a score (`0/ 1+/ 2+/ 3+/`), read
recursively; a patch's patient comes from `data.patient_regex` over its path inside the class
folder, or is the file itself (with a warning: patients may then straddle splits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from her2exp.data.sources.images import IMAGE_SUFFIXES
from her2exp.data.sources.labels import allowed_labels, label_of
from her2exp.data.sources.scan import META_COLUMNS, UNKNOWN_SITE, DataValidationError, Scan


def patient_from(rel: str, pattern: re.Pattern[str]) -> str | None:
    """The patient id `pattern` finds in a relative path: its `patient` group, else its first
    named group, else group 1; None when it does not match (or matches empty)."""
    match = pattern.search(rel)
    if match is None:
        return None
    if "patient" in pattern.groupindex:
        value = match.group("patient")
    elif pattern.groupindex:
        value = match.group(min(pattern.groupindex.values()))
    else:
        value = match.group(1)
    return value or None


def _checked_root(cfg: DictConfig) -> tuple[Path, str]:
    """`data.root` as a folder, and how messages name it; a missing one stops here."""
    if not cfg.root:
        raise DataValidationError("data=folder", [("data.root", "not set: data.root=DIR")])
    root = Path(str(cfg.root)).expanduser()
    where = f"data.root={root}"
    if not root.is_dir():
        problem = "does not exist" if not root.exists() else "is not a folder"
        raise DataValidationError(where, [(str(root), problem)])
    return root, where


def image_files(folder: Path) -> list[Path]:
    """The images under `folder`, recursively, sorted; hidden files and folders (`.DS_Store`,
    macOS `._x.png` copies) left out. A training class folder and her2exp-predict's input are
    read by this one function, so predict scores exactly the files training would take."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


@dataclass
class _FolderScan:
    """The rows and problems gathered while walking `root`, one class folder at a time."""

    root: Path
    cfg: DictConfig
    pattern: re.Pattern[str] | None
    records: list[dict[str, Any]] = field(default_factory=list)
    problems: dict[int, list[str]] = field(default_factory=dict)
    folder_problems: list[tuple[str, str]] = field(default_factory=list)
    excluded: int = 0

    def add_entry(self, entry: Path) -> None:
        """A top-level entry: a class folder's files become rows; a stray image is a problem."""
        if entry.name.startswith("."):
            return
        if entry.is_file():
            if entry.suffix.lower() in IMAGE_SUFFIXES:
                self.folder_problems.append(
                    (entry.name, "not inside a class sub-folder (her2_neg/, her2_pos/, 0/ ...)")
                )
            return
        files = image_files(entry)
        if not files:
            self.folder_problems.append(
                (f"{entry.name}/", f"empty folder: no {'/'.join(IMAGE_SUFFIXES)} files")
            )
            return
        try:
            label, score = label_of(entry.name, self.cfg)
        except KeyError:
            label, score = -1, ""
        if label is None:  # 2+ with data.equivocal=exclude
            self.excluded += len(files)
            return
        for file in files:
            self.add_file(file, entry, label, score)

    def add_file(self, file: Path, folder: Path, label: int, score: str) -> None:
        """One patch of a class folder (label -1: the folder's name is not a known label)."""
        rel = file.relative_to(folder).as_posix()
        display = file.relative_to(self.root).as_posix()
        row = len(self.records)
        if label == -1:
            self.problems.setdefault(row, []).append(
                f"unknown label folder {folder.name!r} (known: {allowed_labels(self.cfg)}; "
                "set data.label_map or data.score_map)"
            )
        patient = display
        if self.pattern is not None:
            patient = patient_from(rel, self.pattern)
            if patient is None:
                patient = display
                self.problems.setdefault(row, []).append(
                    f"data.patient_regex={self.cfg.patient_regex!r} finds no patient id in {rel!r}"
                )
        self.records.append(
            {
                "file": str(file.resolve()),
                "display": display,
                "label": label,
                "her2_score": score,
                "patient_id": patient,
                "slide_id": patient,
                "site": UNKNOWN_SITE,
                "split": "",
            }
        )


def scan_folder(cfg: DictConfig) -> Scan:
    """The rows of `data.root`'s class folders and what is wrong with each (files not opened)."""
    root, where = _checked_root(cfg)
    pattern = re.compile(cfg.patient_regex) if cfg.patient_regex else None
    found = _FolderScan(root, cfg, pattern)
    for entry in sorted(root.iterdir()):
        found.add_entry(entry)
    if not found.records and not found.folder_problems:
        raise DataValidationError(
            where,
            [(str(root), f"empty folder: no class sub-folders of {'/'.join(IMAGE_SUFFIXES)}")],
        )
    rows = pd.DataFrame(found.records, columns=["file", "display", *META_COLUMNS])
    return Scan(
        where,
        rows,
        found.problems,
        found.folder_problems,
        excluded_equivocal=found.excluded,
        own_patient=len(rows) if pattern is None else 0,
    )
