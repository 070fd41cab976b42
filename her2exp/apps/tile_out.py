"""The output folder of `her2exp-tile`: who may write into it, and what each slide's file says.

Why: the shards of a SLURM array start together and write into one `out`. Checking the folder's
`tiling.json` at start (config.tile.check_out) cannot keep them apart: before the first shard
writes it, every shard sees an empty folder and any settings pass, and a manifest mixed from
64- and 32-px tiles came out. So the settings are *claimed*:

- A short exclusive lock (`CLAIM_LOCK`, fcntl.flock) is held while a tiler reads `tiling.json`
  and decides: none yet -> it writes its settings; the same -> it joins (a sibling shard, or a
  resume); other settings -> refused in one line, unless `overwrite=true`.
- Every tiler holds a shared lock on `ACTIVE_LOCK` from its claim to its end. `overwrite=true`
  clears an earlier tiling only when that tiling's settings differ from its own *and* it can
  take `ACTIVE_LOCK` exclusively, i.e. no other tiler is running in the folder: so the one
  `overwrite=true` given to every job of a shard array clears once (the first claim) and the
  other shards join its claim; a second, different `overwrite=true` while one runs is refused.
- summary.csv (read, merged, written) and tiles.parquet are written under the claim lock too,
  so two shards finishing together do not lose each other's rows.

The kernel drops a flock when its process ends (kill -9 included), so a dead tiler never
leaves the folder locked. A file system without flock gets a warning, and tiling goes on
unguarded, as before the claim existed. Each slide's file records the path and the content
signature (`slides.signature`) it was tiled from in its Parquet metadata: a slide replaced at
the same path is tiled again, and `data=slides` refuses a file that changed since.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from her2exp.config.tile import ACTIVE_LOCK, CLAIM_LOCK, SETTINGS_FILE, settings
from her2exp.core.errors import UserError
from her2exp.core.fileio import atomic_write, safe_name
from her2exp.data.slide_table import SlideJob

log = logging.getLogger("her2exp")

RECORD_KEY = b"her2exp.slide"  # Parquet metadata of slides/<id>.parquet: path and signature
_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK})


def _flock(fd: int, how: int) -> bool:
    """flock; False when the file system cannot lock (warned), raises BlockingIOError when a
    non-blocking request finds it held."""
    try:
        fcntl.flock(fd, how)
        return True
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            log.warning("her2exp-tile: this file system cannot lock files: shards are unguarded")
            return False
        raise


@contextmanager
def claim_lock(out: Path) -> Iterator[None]:
    """The folder's short exclusive lock (blocking: the holder keeps it for milliseconds)."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / CLAIM_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock


class Claim:
    """This tiler's place in `out`: holds ACTIVE_LOCK (shared) until `release`."""

    def __init__(self, fd: int, cleared: bool) -> None:
        self._fd = fd
        self.cleared = cleared  # an earlier tiling with other settings was removed

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def recorded_settings(out: Path) -> dict[str, Any] | None:
    """The settings `out` was claimed with, None when unclaimed."""
    try:
        return json.loads((out / SETTINGS_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError(f"out={out}: {SETTINGS_FILE} is unreadable ({exc})") from None


def will_clear(out: Path, tiles: DictConfig, overwrite: bool) -> bool:
    """Whether a claim would clear `out` now (so every slide must be checked, not only the
    ones left to tile)."""
    recorded = recorded_settings(out)
    return overwrite and recorded is not None and recorded != settings(tiles)


def claim(out: Path, tiles: DictConfig, overwrite: bool) -> Claim:
    """Join or claim `out` for these settings, as the module docstring says; UserError when
    another tiler's settings hold it."""
    mine = settings(tiles)
    with claim_lock(out):
        fd = os.open(out / ACTIVE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            recorded = recorded_settings(out)
            cleared = recorded is not None and recorded != mine
            if cleared and not overwrite:
                raise UserError(_other_settings(out, recorded, mine))
            if cleared:
                _take_alone(fd, out, recorded, mine)
                clear(out)
            if recorded is None or cleared:
                atomic_write(out / SETTINGS_FILE, json.dumps(mine, indent=1) + "\n")
            _flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
    if cleared:
        log.warning("her2exp-tile: out=%s held a tiling with other settings: cleared", out)
    return Claim(fd, cleared)


def _take_alone(fd: int, out: Path, recorded: dict, mine: dict) -> None:
    """ACTIVE_LOCK exclusively, or a refusal: another tiler is writing the earlier settings."""
    try:
        _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(
            _other_settings(out, recorded, mine).split(": give", 1)[0]
            + " and another her2exp-tile is tiling it now: overwrite=true clears it only when "
            "none is running"
        ) from None


def _other_settings(out: Path, before: dict, mine: dict) -> str:
    changed = [f"tiles.{k}: {before.get(k)} -> {v}" for k, v in mine.items() if before.get(k) != v]
    return (
        f"out={out} was tiled with other settings ({'; '.join(changed)}): give another out=, "
        "or overwrite=true to tile it again"
    )


def clear(out: Path) -> None:
    """An earlier tiling's own files go (check_out made sure the folder is a tiling's)."""
    for sub in ("slides", "qc"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for name in ("tiles.parquet", "summary.csv", SETTINGS_FILE):
        (out / name).unlink(missing_ok=True)


def slide_file(out: Path, slide_id: str) -> Path:
    return out / "slides" / f"{safe_name(slide_id)}.parquet"


def write_slide(out: Path, job: SlideJob, frame: pd.DataFrame) -> None:
    """slides/<id>.parquet, with the path and signature it was tiled from in its metadata
    (there even when the slide has no tile)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    record = json.dumps(
        {"slide_path": job.path, "signature": job.signature, "annotation": annotation_digest(job)}
    ).encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), RECORD_KEY: record})
    atomic_write(slide_file(out, job.slide_id), lambda fh: pq.write_table(table, fh))


def annotation_digest(job: SlideJob) -> str:
    """SHA-256 of the slide's annotation file ("" without one): regions redrawn in QuPath
    change which tiles are kept, so the slide is tiled again."""
    if not job.annotation:
        return ""
    try:
        return hashlib.sha256(Path(job.annotation).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"  # the checks name it before the slide is tiled


def slide_record(out: Path, slide_id: str) -> dict[str, str] | None:
    """What slides/<id>.parquet was tiled from (signature "" for a file of an older tiler),
    None when the slide is not tiled."""
    import pyarrow.parquet as pq

    path = slide_file(out, slide_id)
    if not path.is_file():
        return None
    metadata = pq.read_schema(path).metadata or {}
    if RECORD_KEY in metadata:
        return json.loads(metadata[RECORD_KEY])
    recorded = pd.read_parquet(path, columns=["slide_path"])["slide_path"]
    return {"slide_path": str(recorded.iloc[0]) if len(recorded) else "", "signature": ""}


def state(job: SlideJob, out: Path) -> str:
    """ "done" (tiled from this very file), "new" (not tiled, or the table now points the id at
    another path) or "changed" (the same path now holds another file, or an older tiler
    recorded no signature): labels, patients and sites come from the current table anyway."""
    record = slide_record(out, job.slide_id)
    if record is None or record["slide_path"] != job.path:
        return "new"
    same = record["signature"] == job.signature
    return "done" if same and record.get("annotation", "") == annotation_digest(job) else "changed"


def merge_summary(out: Path, rows: list[dict[str, Any]]) -> set[str]:
    """summary.csv holds one row per slide met so far (a rerun's rows replace earlier ones);
    returns the slides it lists as skipped (settled: on_bad_file=skip left them out). Call
    under claim_lock: shards finishing together each read, merge and write it."""
    path = out / "summary.csv"
    table = pd.DataFrame(rows)
    if path.is_file():
        old = pd.read_csv(path, dtype={"slide_id": str}, keep_default_na=False)
        if len(table):
            old = old[~old["slide_id"].isin(table["slide_id"])]
        table = pd.concat([old, table], ignore_index=True)
    if len(table) and len(rows):
        atomic_write(path, table.sort_values("slide_id").to_csv(index=False))
    if not len(table):
        return set()
    return set(table.loc[table["status"] == "skipped", "slide_id"])


def write_manifest(done: list[SlideJob], out: Path, columns: list[str]) -> None:
    """The tiles of the slides `done` (those `state` calls done), with the table's current
    labels, patients, sites and splits (a label corrected in the table needs no retiling)."""
    parts = []
    for job in sorted(done, key=lambda j: j.slide_id):
        part = pd.read_parquet(slide_file(out, job.slide_id))
        for key in ("patient_id", "label", "her2_score", "site", "split"):
            part[key] = getattr(job, key)
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    atomic_write(out / "tiles.parquet", frame.to_parquet(index=False))
