"""Loading a file source: scan it, open every file once (content hash, decode or header check),
check the usable rows as a whole, split them, and fingerprint what the model will see.

Every problem is collected before anything is raised, so one `DataValidationError` lists them
all; with `data.on_bad_file=skip` the bad files are dropped and returned as a (path, problem)
table, while problems of the data set as a whole still stop the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from her2exp.data import splits
from her2exp.data.sources.checks import patient_labels, structural_problems
from her2exp.data.sources.folder import scan_folder
from her2exp.data.sources.images import ImageProblem, check_header, decode
from her2exp.data.sources.manifest import scan_manifest
from her2exp.data.sources.scan import SKIPPED_COLUMNS, DataValidationError, Scan

log = logging.getLogger("her2exp.data")


@dataclass
class Loaded:
    """What a file source yields: the manifest, its patches, and what was skipped or noted."""

    manifest: pd.DataFrame
    images: np.ndarray | None  # None: not kept (data.cache=false), read from manifest.path
    skipped: pd.DataFrame
    notes: list[str]
    fingerprint: str


def scan_source(cfg: DictConfig, cohort: bool = False) -> Scan:
    """The rows of `data.source` (folder or manifest), before their files are opened."""
    if cfg.source == "folder":
        return scan_folder(cfg)
    if cfg.source == "manifest":
        return scan_manifest(cfg, cohort)
    raise ValueError(f"data.source={cfg.source!r} is not a file source (folder or manifest)")


def _duplicate(scan: Scan, row: int, first: int) -> None:
    """Row `row` names the same file as row `first`: a problem of both if labels differ."""
    displays, labels = scan.rows["display"], scan.rows["label"]
    msg = f"duplicate path: the same file as {displays.iloc[first]!r}"
    if labels.iloc[first] != labels.iloc[row]:
        msg += " with a different label"
        scan.problems.setdefault(first, []).append("listed more than once, with different labels")
    scan.problems.setdefault(row, []).append(msg)


def _read_bytes(scan: Scan, row: int, file: str) -> bytes | None:
    """A file's bytes, or None with the problem recorded on its row."""
    try:
        return Path(file).read_bytes()
    except FileNotFoundError:
        scan.problems.setdefault(row, []).append("missing file")
    except OSError as exc:
        scan.problems.setdefault(row, []).append(f"unreadable file: {exc.strerror or exc}")
    return None


def _read_files(
    scan: Scan, size: int, keep_images: bool, verify: str = "full"
) -> tuple[list[np.ndarray | None], list[str], Counter, dict[str, str]]:
    """Open every file once: content hash, then a full decode (`verify="full"`) or a header
    check (`"header"`: format, mode, size), and the conversions; problems go into `scan`."""
    images: list[np.ndarray | None] = []
    hashes: list[str] = []
    notes: Counter = Counter()
    example: dict[str, str] = {}
    first_row: dict[str, int] = {}
    displays = scan.rows["display"].tolist()
    for row, (file, display) in enumerate(zip(scan.rows["file"], displays, strict=True)):
        key = os.path.normcase(file)
        data = None
        if file and key in first_row:
            _duplicate(scan, row, first_row[key])
        elif file:  # an empty path is already a problem of its row
            first_row[key] = row
            data = _read_bytes(scan, row, file)
        if data is None:
            images.append(None)
            hashes.append("")
            continue
        hashes.append(hashlib.sha256(data).hexdigest())
        image = None
        try:
            if verify == "full":
                image, applied = decode(data, size)
            else:
                applied = check_header(data, size)
        except ImageProblem as exc:
            scan.problems.setdefault(row, []).append(str(exc))
            images.append(None)
            continue
        for note in applied:
            notes[note] += 1
            example.setdefault(note, display)
        images.append(image if keep_images else None)
    return images, hashes, notes, example


def _log_notes(
    scan: Scan, counts: dict, example: dict, file_problems: list[tuple[str, str]]
) -> list[str]:
    """Log what was excluded, converted or skipped; returns the conversion notes."""
    if scan.excluded_equivocal:
        log.info(
            "data: %d patches scored 2+ excluded (data.equivocal=exclude)", scan.excluded_equivocal
        )
    if scan.own_patient:
        log.warning(
            "data: %d of %d patches have no patient id (data.patient_regex or a patient_id "
            "column): each is its own patient, so patches of one patient may land in different "
            "splits and inflate the metrics",
            scan.own_patient,
            len(scan.rows),
        )
    notes = [f"{n} files: {note} (e.g. {example[note]})" for note, n in sorted(counts.items())]
    for note in notes:
        log.info("data: %s", note)
    if file_problems:
        log.warning(
            "data: skipped %d bad files (data.on_bad_file=skip): %s",
            len(file_problems),
            "; ".join(f"{p}: {m}" for p, m in file_problems[:5]),
        )
    return notes


def _raise_problems(
    cfg: DictConfig,
    where: str,
    file_problems: list[tuple[str, str]],
    structural: list[tuple[str, str]],
) -> None:
    """Stop on the problems found: all of them, or (`data.on_bad_file=skip`) only those of the
    data set as a whole, the bad files being skipped."""
    if cfg.on_bad_file == "skip":
        if structural:
            advice = f" (after skipping {len(file_problems)} bad files)" if file_problems else ""
            raise DataValidationError(where, structural, advice)
    elif file_problems or structural:
        advice = ""
        if file_problems:
            advice = " (fix them, or data.on_bad_file=skip drops the bad files and lists them)"
        raise DataValidationError(where, file_problems + structural, advice)


def _manifest_of(good: pd.DataFrame) -> pd.DataFrame:
    """The usable rows as the manifest every source fills: path first, her2_score only when a
    score was given, the manifest's own extra columns last."""
    manifest = good.drop(columns=["display"]).rename(columns={"file": "path"})
    if not (manifest["her2_score"] != "").any():
        manifest = manifest.drop(columns=["her2_score"])
    first = ["path", "label", "patient_id", "slide_id", "site", "split"]
    manifest = manifest[first + [c for c in manifest.columns if c not in first]]
    manifest["label"] = manifest["label"].astype(np.int64)
    return manifest


def load(
    cfg: DictConfig, seed: int, cohort: bool = False, keep_images: bool | None = None
) -> Loaded:
    """Read, validate and split a folder or manifest source; every problem in one exception.

    cohort=False: the split column is honoured, else patients are split by `data.split`
    (seed-controlled, stratified, grouped); every split must hold both classes. cohort=True:
    every row is split "cohort" (an external evaluation), which must hold both classes.
    keep_images (None: `data.cache`) keeps the decoded patches; when they are not kept because
    `data.cache=false`, `data.verify` says whether each file is decoded once or only its header
    read. The content hash (the fingerprint) is the same either way.
    """
    cache = bool(cfg.get("cache", True))
    keep = cache if keep_images is None else keep_images
    verify = "full" if cache else str(cfg.get("verify", "header"))
    scan = scan_source(cfg, cohort)
    images, hashes, counts, example = _read_files(scan, int(cfg.image_size), keep, verify)
    rows = scan.rows
    file_problems = list(scan.folder_problems)
    for row in sorted(scan.problems):
        file_problems += [(rows["display"][row], p) for p in scan.problems[row]]
    bad = np.zeros(len(rows), dtype=bool)
    bad[list(scan.problems)] = True
    good = rows[~bad].reset_index(drop=True)

    good, mixed = patient_labels(good, str(cfg.get("patient_label", "error")))
    if cohort:
        good["split"] = "cohort"
    elif not scan.explicit_split and len(good):
        good["split"] = splits.split_column(good, cfg.split, seed).to_numpy()
    structural = mixed + structural_problems(good, scan.explicit_split, cohort)
    _raise_problems(cfg, scan.where, file_problems, structural)
    notes = _log_notes(scan, counts, example, file_problems)

    kept = np.flatnonzero(~bad)
    # Not kept: her2exp-manifest (validated only), data.cache=false (read lazily, by path).
    stacked = np.stack([images[i] for i in kept]) if keep else None
    hashes_kept = [hashes[i] for i in kept]
    fingerprint = _fingerprint(cfg, seed, good, hashes_kept, cohort or scan.explicit_split)
    skipped = pd.DataFrame(file_problems, columns=list(SKIPPED_COLUMNS))
    return Loaded(_manifest_of(good), stacked, skipped, notes, fingerprint)


def _fingerprint(
    cfg: DictConfig, seed: int, good: pd.DataFrame, hashes: list[str], split_fixed: bool
) -> str:
    """SHA-256 of what the model sees: the decoding settings, each row's (path relative to the
    source, label, patient, slide, site, split) and the SHA-256 of each file's bytes. Content,
    not (size, mtime): a re-export or a copy to another disk keeps the fingerprint; one changed
    pixel changes it."""
    keys = ("source", "image_size", "label_map", "score_map", "equivocal", "patient_regex")
    container = OmegaConf.to_container(cfg, resolve=True)
    settings = {k: container[k] for k in keys}
    settings["seed"] = None if split_fixed else seed
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    table = good[["display", "label", "patient_id", "slide_id", "site", "split"]].astype(str)
    for values, content in zip(table.itertuples(index=False), hashes, strict=True):
        digest.update("\x1f".join((*values, content)).encode() + b"\x1e")
    return digest.hexdigest()[:16]
