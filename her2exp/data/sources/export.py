"""Writing a source to disk: a loaded source's manifest (`her2exp-manifest`), and the embedded
synthetic generator rendered as PNG folders plus a manifest, so the file sources can be tried
and tested without real data."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pandas as pd
from PIL import Image

from her2exp.core import fileio
from her2exp.data import synthetic
from her2exp.data.sources.loading import Loaded


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
