"""The user's own patches: class (or HER2 score) sub-folders, or a CSV/Parquet manifest.

Both sources end in the manifest every source fills (path, label, patient_id, slide_id, site,
split, plus her2_score when a score was given) and the decoded patches, after one validation pass
that lists every problem at once: missing, unreadable or truncated files, unknown labels,
duplicate paths, empty folders, a patient in two explicit splits, a split missing a class.

With `data.on_bad_file=skip` the bad files are dropped and returned as a (path, problem) table
for the run's artifacts; problems of the data set as a whole (leaking patients, a class missing
from a split, nothing left) still stop the run.

Images: PNG, JPEG or TIFF, 8-bit. RGBA is composited on white (transparent tile padding is
background), grayscale, palette and CMYK images are converted to RGB, and a patch is resized
(bilinear) only when its size differs from `data.image_size`; each conversion is noted once in
the log with a count and an example file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageFile, UnidentifiedImageError

from her2exp import fileio
from her2exp.data import splits

log = logging.getLogger("her2exp.data")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SCORES = ("0", "1+", "2+", "3+")
EQUIVOCAL_SCORE = "2+"
MANIFEST_COLUMNS = ("path", "label", "patient_id", "slide_id", "site", "split")
SKIPPED_COLUMNS = ("path", "problem")
UNKNOWN_SITE = "unknown"
#: Lines of problems an error message shows; the exception's `problems` table holds them all.
MAX_LISTED = 200


class DataValidationError(ValueError):
    """Every problem found in the user's data, one line per file: raised before training."""

    def __init__(self, where: str, problems: list[tuple[str, str]], advice: str = "") -> None:
        self.problems = pd.DataFrame(problems, columns=list(SKIPPED_COLUMNS))
        n = len(problems)
        lines = [f"{where}: {n} problem{'s' if n != 1 else ''}{advice}"]
        lines += [f"  {path}: {problem}" for path, problem in problems[:MAX_LISTED]]
        if n > MAX_LISTED:
            lines.append(f"  ... and {n - MAX_LISTED} more")
        super().__init__("\n".join(lines))


class ImageProblem(ValueError):
    """A file that cannot be used as an 8-bit RGB patch."""


@dataclass
class Loaded:
    """What a file source yields: the manifest, its patches, and what was skipped or noted."""

    manifest: pd.DataFrame
    images: np.ndarray | None  # None: not kept (data.cache=false), read from manifest.path
    skipped: pd.DataFrame
    notes: list[str]
    fingerprint: str


@dataclass
class _Scan:
    """Rows read from a folder or a manifest, before their files are opened."""

    where: str  # "data.root=..." / "data.path=...": how messages name the source
    rows: pd.DataFrame  # file, display, label, her2_score, patient_id, slide_id, site, split
    problems: dict[int, list[str]]  # row -> what is wrong with it
    folder_problems: list[tuple[str, str]] = field(default_factory=list)
    explicit_split: bool = False
    excluded_equivocal: int = 0
    own_patient: int = 0  # rows whose patient id is the file itself


# --- labels -------------------------------------------------------------------------------------


def label_of(name: str, cfg: DictConfig, column: str = "folder") -> tuple[int | None, str]:
    """(label, HER2 score) of a class name or score; label None means "excluded 2+".

    Class names go through `data.label_map` (case-insensitive), then HER2 scores (0, 1+, 2+, 3+)
    through `data.score_map`, with 2+ decided by `data.equivocal`. A manifest's `label` column
    also takes 0 and 1 as they are; in a `score` column the bare digits 1, 2, 3 stand for 1+, 2+,
    3+ (a folder named 1 is not a label: 1+ is HER2-). Raises KeyError for anything else.
    """
    text = str(name).strip()
    score_column = column == "score"
    if column == "label" and text in ("0", "1"):
        return int(text), ""
    label_map = {str(k): int(v) for k, v in cfg.label_map.items()}
    folded = {k.casefold(): v for k, v in label_map.items()}
    if not score_column:
        if text in label_map:
            return label_map[text], ""
        if text.casefold() in folded:
            return folded[text.casefold()], ""
    score = f"{text}+" if score_column and text in ("1", "2", "3") else text
    score_map = {str(k): int(v) for k, v in cfg.score_map.items()}
    if score in score_map:
        return score_map[score], score
    if score == EQUIVOCAL_SCORE:
        return {"exclude": None, "positive": 1, "negative": 0}[cfg.equivocal], score
    raise KeyError(text)


def _allowed_labels(cfg: DictConfig, column: str = "folder") -> str:
    names = [] if column == "score" else [str(k) for k in cfg.label_map]
    if column == "label":
        names = ["0", "1", *names]
    return ", ".join(dict.fromkeys(names + list(SCORES)))


# --- images -------------------------------------------------------------------------------------

_CONVERTED = {
    "RGBA": "RGBA converted to RGB (alpha composited on white)",
    "LA": "grayscale+alpha converted to RGB (alpha composited on white)",
    "PA": "palette+alpha converted to RGB (alpha composited on white)",
    "L": "grayscale converted to RGB",
    "1": "1-bit converted to RGB",
    "P": "palette image converted to RGB",
    "CMYK": "CMYK converted to RGB",
    "YCbCr": "YCbCr converted to RGB",
    "LAB": "LAB converted to RGB",
    "HSV": "HSV converted to RGB",
}


@contextlib.contextmanager
def _image_problems() -> Iterator[None]:
    """PIL's errors while opening or decoding -> ImageProblem naming what is wrong."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # set by some other library: would hide truncation
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on; truncated files would pass")
    try:
        yield
    except ImageProblem:
        raise
    except UnidentifiedImageError:
        raise ImageProblem("unreadable: not a PNG, JPEG or TIFF image") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        text = str(exc) or type(exc).__name__
        kind = "truncated" if "truncated" in text or isinstance(exc, EOFError) else "unreadable"
        raise ImageProblem(f"{kind} image: {text}") from None


def _mode_notes(im: Image.Image) -> list[str]:
    """The conversion an opened image's mode needs (from its header); not 8-bit: ImageProblem."""
    if im.mode == "RGB":
        return []
    if im.mode in _CONVERTED:
        return [_CONVERTED[im.mode]]
    raise ImageProblem(f"not an 8-bit image (PIL mode {im.mode}): export 8-bit RGB")


def _size_notes(width: int, height: int, size: int) -> list[str]:
    return (
        []
        if (width, height) == (size, size)
        else [f"resized from {width}x{height} to {size}x{size}"]
    )


def decode(data: bytes, size: int) -> tuple[np.ndarray, list[str]]:
    """Bytes of a PNG/JPEG/TIFF -> (size, size, 3) uint8 RGB and the conversions applied.

    Raises ImageProblem naming what is wrong (not an image, truncated, not 8-bit).
    """
    with _image_problems(), Image.open(io.BytesIO(data)) as im:
        notes = ["multi-page image: first page used"] if getattr(im, "n_frames", 1) > 1 else []
        im.load()
        notes += _mode_notes(im)
        mode = im.mode
        if mode == "RGB":
            rgb = im.copy()
        elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            rgb = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb.alpha_composite(rgba)
            rgb = rgb.convert("RGB")
        else:
            rgb = im.convert("RGB")
    notes += _size_notes(rgb.width, rgb.height, size)
    return resize_patch(np.array(rgb, dtype=np.uint8), size), notes


def resize_patch(rgb: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3), PIL bilinear, as training decodes a patch (unchanged
    when already that size): the one resize of files, served patches and predict."""
    if rgb.shape[:2] == (size, size):
        return rgb
    out = Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR)
    return np.array(out, dtype=np.uint8)  # a writable copy: torch.from_numpy takes it


def check_header(data: bytes, size: int) -> list[str]:
    """What `decode` would note, from the header alone (format, mode, size; no pixels decoded):
    `data.verify=header`. Catches a file that is not an image or not 8-bit; a truncated one
    passes (its pixels are never read) and fails when a worker decodes it."""
    with _image_problems(), Image.open(io.BytesIO(data)) as im:
        notes = ["multi-page image: first page used"] if getattr(im, "n_frames", 1) > 1 else []
        notes += _mode_notes(im)
        notes += _size_notes(*im.size, size)
    return notes


class PatchReadError(RuntimeError):
    """A file that passed validation but cannot be read or decoded now (data.cache=false)."""


class FilePatches:
    """Patches decoded from their files when asked (`data.cache=false`), in the DataLoader
    workers: nothing decoded is held, so memory does not grow with the data set. The paths are
    one numpy bytes array (no Python object per row), cheap to pickle into workers and shared
    copy-on-write after a fork. Decoding is `decode`, exactly as the in-memory store's."""

    def __init__(self, paths: Any, image_size: int) -> None:
        self.paths = np.array([os.fsencode(str(p)) for p in paths], dtype=np.bytes_)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, row: int) -> np.ndarray:
        path = os.fsdecode(self.paths[row])
        try:
            data = Path(path).read_bytes()
            return decode(data, self.image_size)[0]
        except FileNotFoundError:
            problem = "missing file"
        except OSError as exc:
            problem = f"unreadable file: {exc.strerror or exc}"
        except ImageProblem as exc:
            problem = str(exc)
        raise PatchReadError(
            f"her2exp: {path}: {problem} (it passed the data check at the start of the run; "
            "data.cache=false reads patches while training: the file changed since)"
        )

    def read(self, row: int) -> torch.Tensor:
        # CHW laid out by numpy, once: a permuted view made contiguous by torch costs more.
        return torch.from_numpy(np.ascontiguousarray(self._decode(row).transpose(2, 0, 1)))

    def read_many(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.image_size, self.image_size, 3), dtype=np.uint8)
        for i, row in enumerate(rows):
            out[i] = self._decode(int(row))
        return out


def read_patch(path: str | Path, size: int) -> np.ndarray:
    """One patch from disk exactly as training decodes it (what prediction should use too)."""
    return decode(Path(path).read_bytes(), size)[0]


# --- the two sources ----------------------------------------------------------------------------


def _patient_from(rel: str, pattern: re.Pattern[str]) -> str | None:
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


def _scan_folder(cfg: DictConfig) -> _Scan:
    if not cfg.root:
        raise DataValidationError("data=folder", [("data.root", "not set: data.root=DIR")])
    root = Path(str(cfg.root)).expanduser()
    where = f"data.root={root}"
    if not root.is_dir():
        problem = "does not exist" if not root.exists() else "is not a folder"
        raise DataValidationError(where, [(str(root), problem)])
    pattern = re.compile(cfg.patient_regex) if cfg.patient_regex else None
    records: list[dict[str, Any]] = []
    problems: dict[int, list[str]] = {}
    folder_problems: list[tuple[str, str]] = []
    excluded = 0
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            if entry.suffix.lower() in IMAGE_SUFFIXES:
                folder_problems.append(
                    (entry.name, "not inside a class sub-folder (her2_neg/, her2_pos/, 0/ ...)")
                )
            continue
        files = sorted(
            p
            for p in entry.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(entry).parts)
        )
        if not files:
            folder_problems.append(
                (f"{entry.name}/", f"empty folder: no {'/'.join(IMAGE_SUFFIXES)} files")
            )
            continue
        try:
            label, score = label_of(entry.name, cfg)
        except KeyError:
            label, score = -1, ""
        if label is None:
            excluded += len(files)
            continue
        for file in files:
            rel = file.relative_to(entry).as_posix()
            display = file.relative_to(root).as_posix()
            row = len(records)
            if label == -1:
                problems.setdefault(row, []).append(
                    f"unknown label folder {entry.name!r} (known: {_allowed_labels(cfg)}; "
                    "set data.label_map or data.score_map)"
                )
            patient = display
            if pattern is not None:
                patient = _patient_from(rel, pattern)
                if patient is None:
                    patient = display
                    problems.setdefault(row, []).append(
                        f"data.patient_regex={cfg.patient_regex!r} finds no patient id in {rel!r}"
                    )
            records.append(
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
    if not records and not folder_problems:
        raise DataValidationError(
            where,
            [(str(root), f"empty folder: no class sub-folders of {'/'.join(IMAGE_SUFFIXES)}")],
        )
    rows = pd.DataFrame(records, columns=["file", "display", *_META])
    return _Scan(
        where,
        rows,
        problems,
        folder_problems,
        excluded_equivocal=excluded,
        own_patient=len(rows) if pattern is None else 0,
    )


_META = ["label", "her2_score", "patient_id", "slide_id", "site", "split"]


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


def _scan_manifest(cfg: DictConfig, cohort: bool) -> _Scan:
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

    base = path.resolve().parent
    explicit = not cohort and "split" in frame.columns and (frame["split"] != "").any()
    explicit = explicit and not cv_ignores_column(cfg, where)
    has_patient = "patient_id" in frame.columns
    records: list[dict[str, Any]] = []
    problems: dict[int, list[str]] = {}
    excluded = own = 0
    for i, rec in enumerate(frame.to_dict("records")):
        display = rec["path"] or f"(row {i + 1})"
        wrong: list[str] = []
        if not rec["path"]:
            wrong.append("empty path")
        use_label = "label" in rec and rec["label"] != ""
        column = "label" if use_label or "score" not in rec else "score"
        raw = rec[column]
        try:
            label, score = label_of(raw, cfg, column)
        except KeyError:
            what = f"unknown {column} {raw!r}" if raw else f"empty {column}"
            label, score = -1, ""
            wrong.append(f"{what} (allowed: {_allowed_labels(cfg, column)})")
        if use_label and "score" in rec and rec["score"]:
            score = rec["score"]
        if label is None:
            excluded += 1
            continue
        split = rec.get("split", "").lower()
        if explicit and split not in splits.SPLITS:
            wrong.append(
                f"split {rec.get('split', '')!r} is not one of {', '.join(splits.SPLITS)}"
                + (" (the split column is filled for other rows)" if not split else "")
            )
        patient = rec.get("patient_id", "") if has_patient else ""
        if not patient:
            own += 1
            patient = display
        file = Path(os.path.expanduser(rec["path"]))
        file = os.path.normpath(str(file if file.is_absolute() else base / file))
        if wrong:
            problems[len(records)] = wrong
        extra = {k: v for k, v in rec.items() if k not in (*MANIFEST_COLUMNS, "score", "file")}
        records.append(
            {
                **extra,
                "file": file if rec["path"] else "",
                "display": display,
                "label": label,
                "her2_score": score,
                "patient_id": patient,
                "slide_id": rec.get("slide_id", "") or patient,
                "site": rec.get("site", "") or UNKNOWN_SITE,
                "split": split if explicit else "",
            }
        )
    rows = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=_META)
    if not records:
        rows["file"], rows["display"] = [], []
    return _Scan(where, rows, problems, [], explicit, excluded, own)


# --- validation and assembly --------------------------------------------------------------------


def _read_files(
    scan: _Scan, size: int, keep_images: bool, verify: str = "full"
) -> tuple[list[np.ndarray | None], list[str], Counter, dict[str, str]]:
    """Open every file once: content hash, then a full decode (`verify="full"`) or a header
    check (`"header"`: format, mode, size), and the conversions; problems go into `scan`."""
    images: list[np.ndarray | None] = []
    hashes: list[str] = []
    notes: Counter = Counter()
    example: dict[str, str] = {}
    first_row: dict[str, int] = {}
    labels = scan.rows["label"].tolist()
    displays = scan.rows["display"].tolist()
    for row, (file, display) in enumerate(zip(scan.rows["file"], displays, strict=True)):
        key = os.path.normcase(file)
        if not file or key in first_row:
            if file:  # an empty path is already a problem of its row
                first = first_row[key]
                msg = f"duplicate path: the same file as {displays[first]!r}"
                if labels[first] != labels[row]:
                    msg += " with a different label"
                    scan.problems.setdefault(first, []).append(
                        "listed more than once, with different labels"
                    )
                scan.problems.setdefault(row, []).append(msg)
            images.append(None)
            hashes.append("")
            continue
        first_row[key] = row
        try:
            data = Path(file).read_bytes()
        except FileNotFoundError:
            scan.problems.setdefault(row, []).append("missing file")
            images.append(None)
            hashes.append("")
            continue
        except OSError as exc:
            scan.problems.setdefault(row, []).append(f"unreadable file: {exc.strerror or exc}")
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


def scan_source(cfg: DictConfig, cohort: bool = False) -> _Scan:
    if cfg.source == "folder":
        return _scan_folder(cfg)
    if cfg.source == "manifest":
        return _scan_manifest(cfg, cohort)
    raise ValueError(f"data.source={cfg.source!r} is not a file source (folder or manifest)")


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


def _structural_problems(
    good: pd.DataFrame, explicit_split: bool, cohort: bool
) -> list[tuple[str, str]]:
    """What makes the usable rows unusable as a whole: nothing left, a class or split missing."""
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


def _log_notes(
    scan: _Scan, counts: dict, example: dict, file_problems: list[tuple[str, str]]
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
    structural = mixed + _structural_problems(good, scan.explicit_split, cohort)

    if cfg.on_bad_file == "skip":
        if structural:
            advice = f" (after skipping {len(file_problems)} bad files)" if file_problems else ""
            raise DataValidationError(scan.where, structural, advice)
    elif file_problems or structural:
        advice = ""
        if file_problems:
            advice = " (fix them, or data.on_bad_file=skip drops the bad files and lists them)"
        raise DataValidationError(scan.where, file_problems + structural, advice)

    notes = _log_notes(scan, counts, example, file_problems)

    kept = np.flatnonzero(~bad)
    # Not kept: her2exp-manifest (validated only), data.cache=false (read lazily, by path).
    stacked = np.stack([images[i] for i in kept]) if keep else None
    manifest = good.drop(columns=["display"]).rename(columns={"file": "path"})
    if not (manifest["her2_score"] != "").any():
        manifest = manifest.drop(columns=["her2_score"])
    first = ["path", "label", "patient_id", "slide_id", "site", "split"]
    manifest = manifest[first + [c for c in manifest.columns if c not in first]]
    manifest["label"] = manifest["label"].astype(np.int64)
    hashes_kept = [hashes[i] for i in kept]
    fingerprint = _fingerprint(cfg, seed, good, hashes_kept, cohort or scan.explicit_split)
    skipped = pd.DataFrame(file_problems, columns=list(SKIPPED_COLUMNS))
    return Loaded(manifest, stacked, skipped, notes, fingerprint)


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


# --- manifests and the synthetic export ---------------------------------------------------------


def write_manifest(loaded: Loaded, out: Path) -> Path:
    """Write `loaded.manifest` as a CSV whose paths are relative to the CSV's folder (atomically:
    callers decide whether an existing one may be replaced)."""
    out = Path(out)
    frame = loaded.manifest.copy()
    base = out.resolve().parent
    frame["path"] = [Path(os.path.relpath(p, base)).as_posix() for p in frame["path"]]
    return fileio.atomic_write_text(out, frame.to_csv(index=False))


def export_synthetic(
    out_dir: str | Path,
    n_patients: int = 40,
    patches_per_patient: int = 12,
    image_size: int = 64,
    sites: tuple[str, ...] | list[str] = ("site_a", "site_b"),
    positive_fraction: float = 0.25,
    seed: int = 0,
    layout: str = "labels",
    overwrite: bool = False,
) -> Path:
    """Render the embedded generator to PNGs and a manifest; returns the manifest's path.

    layout="labels": `her2_neg/` and `her2_pos/`; layout="scores": `0/ 1+/ 2+/ 3+/` (2+ holds
    both HER2- and amplified HER2+ cases, as a scored cohort would). Files are named
    `<patient>-<slide>_<k>.png`, so `data.patient_regex='^([^-]+)-'` recovers the patient; the
    manifest (`manifest.csv`: path, label, score, patient_id, slide_id, site) has no split.
    `out_dir` must be new or empty, or with `overwrite` an earlier export (FileExistsError);
    the folder is built aside and moved into place whole, so no file of an earlier, larger
    export lingers.
    """
    from her2exp.data import synthetic

    if layout not in ("labels", "scores"):
        raise ValueError(f"layout={layout!r}: labels or scores")
    fileio.check_replaceable(out_dir, "export_synthetic", overwrite, "manifest.csv")
    data = synthetic.generate(
        n_patients=n_patients,
        patches_per_patient=patches_per_patient,
        image_size=image_size,
        sites=list(sites),
        positive_fraction=positive_fraction,
        seed=seed,
    )
    with fileio.staged_dir(out_dir) as tmp:
        rows = []
        counter: Counter = Counter()
        for image, rec in zip(data.images, data.frame.to_dict("records"), strict=True):
            label_dir = ("her2_neg", "her2_pos")[rec["label"]]
            folder = label_dir if layout == "labels" else str(rec["her2_score"])
            slide = fileio.safe_name(rec["slide_id"])
            rel = f"{folder}/{slide}_{counter[slide]:03d}.png"
            counter[slide] += 1
            fileio.inside(tmp, rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(tmp / rel)
            rows.append(
                {
                    "path": rel,
                    "label": int(rec["label"]),
                    "score": rec["her2_score"],
                    "patient_id": rec["patient_id"],
                    "slide_id": rec["slide_id"],
                    "site": rec["site"],
                }
            )
        fileio.atomic_write_text(tmp / "manifest.csv", pd.DataFrame(rows).to_csv(index=False))
    return Path(out_dir) / "manifest.csv"
