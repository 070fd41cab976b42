"""`her2exp-manifest`: a folder tree of patches -> a manifest CSV to check and edit.

    her2exp-manifest input=/path/patches                     # -> /path/patches/manifest.csv
    her2exp-manifest input=/path/patches out=cohort.csv 'patient_regex="^([^_]+)_"' seed=42
    her2exp-manifest input=/path/patches 'label_map={neg:0,pos:1}' on_bad_file=skip
    her2exp-manifest export_synthetic=outputs/demo_folder n_patients=40 image_size=32

The folder is read and validated exactly as `data=folder` reads it (every file decoded), then
patients are split as training would split them with the same seed (`seed`, default 42: the
training default; `split.train/val/test` the fractions). The CSV (path, label, patient_id,
slide_id, site, split; paths relative to the CSV) trains with `her2exp-train data=manifest
data.path=manifest.csv`: edit the split column to fix the split. `export_synthetic=DIR` renders
the embedded generator to a PNG folder tree plus manifest.csv, to try the user-data path without
data of your own. (`her2exp-manifest DIR`, the older spelling, still works.) An existing manifest,
or a non-empty export folder, is refused before any work unless `overwrite=true`; the files that
were left out go to `<out>.skipped.csv` (one left by an earlier run is removed when none are now).
"""

from __future__ import annotations

from omegaconf import DictConfig

from her2exp.cli.common import UserError, hydra_command
from her2exp.config import commands as schemas
from her2exp.core import fileio


def export(cfg: DictConfig) -> None:
    """export_synthetic=DIR: the embedded generator as PNG folders + manifest.csv."""
    from her2exp.data import sources

    manifest = sources.export_synthetic(
        cfg.export_synthetic,
        n_patients=cfg.n_patients,
        patches_per_patient=cfg.patches_per_patient,
        image_size=cfg.image_size,
        seed=cfg.seed,
        layout=cfg.layout,
        overwrite=cfg.overwrite,
    )
    n = cfg.n_patients * cfg.patches_per_patient
    print(f"her2exp-manifest: wrote {n} PNG patches and {manifest}")


def write(cfg: DictConfig) -> None:
    """input=DIR: read it as data=folder, split it, write the manifest (and the skipped files)."""
    from her2exp.data import sources

    data_cfg = schemas.manifest_data_config(cfg)
    try:
        loaded = sources.load(data_cfg, cfg.seed, keep_images=False)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    out = schemas.manifest_out(cfg)
    skipped = out.with_suffix(".skipped.csv")
    if len(loaded.skipped):
        fileio.atomic_write_text(skipped, loaded.skipped.to_csv(index=False))
    else:
        skipped.unlink(missing_ok=True)  # an earlier run's list would describe other files
    sources.write_manifest(loaded, out)
    counts = loaded.manifest.groupby(["split", "label"]).size().to_dict()
    summary = ", ".join(
        f"{s}: {counts.get((s, 1), 0)} HER2+ / {counts.get((s, 0), 0)} HER2-"
        for s in ("train", "val", "test")
    )
    print(f"her2exp-manifest: wrote {len(loaded.manifest)} rows to {out} ({summary})")
    if len(loaded.skipped):
        print(f"her2exp-manifest: left out {len(loaded.skipped)} bad files, listed in {skipped}")
    print(f"her2exp-manifest: train on it with: her2exp-train data=manifest data.path={out}")


@hydra_command("manifest", positional="input")
def main(cfg: DictConfig) -> None:
    """Export the embedded data, or write the manifest of a folder."""
    schemas.check_manifest(cfg)
    export(cfg) if cfg.export_synthetic else write(cfg)


if __name__ == "__main__":
    main()
