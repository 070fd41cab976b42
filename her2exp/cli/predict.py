"""`her2exp-predict`: a trained run applied to a folder of patches -> predictions.csv.

    her2exp-predict checkpoint=outputs/<date>/<time>/checkpoints/best.pt input=/path/patches
    her2exp-predict run_id=<MLflow run id> input=/path/patches out=preds.csv
    her2exp-predict run_id=<id> input=DIR/tiles.parquet out=preds.csv   # slides: + heatmaps

    her2exp-predict run_id=<id> input=/path/tiles groups=tiles.csv   # decision level slide/patient
    her2exp-predict sweep_run_id=<sweep parent run id> input=/path/patches  # an ensemble
    her2exp-predict 'model_uri=models:/her2@champion' input=/path/patches  # a registry alias

With a run whose decision level is slide or patient (or decision_level=...), `groups=` (a CSV:
path, slide_id, patient_id) groups the tiles; the per-slide or per-patient table is written
beside `out` (<out>.slides.csv, <out>.patients.csv); a file listed in two slides or patients
is refused. Files that cannot be decoded are listed (stderr and `<out>.errors.csv`) and
skipped; without any, an `<out>.errors.csv` left by an earlier run is removed, so the two files
always agree. A whole-slide image among the patches is refused before anything is scored:
her2exp-tile tiles it, and input=<its out>/tiles.parquet predicts on its tiles. With `sweep_run_id=` the sweep's finished
children score as one ensemble (their mean, at the ensemble's thresholds; column `member_sd`: the
sd across members). `model_uri=` (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model)
names the training run through the model registry (her2exp-promote sets aliases). An existing
`out` table is replaced only with `overwrite=true`.
"""

from __future__ import annotations

import sys

import pandas as pd
from omegaconf import DictConfig

from her2exp.cli.common import hydra_command
from her2exp.config import commands as schemas


@hydra_command("predict")
def main(cfg: DictConfig) -> None:
    """Score, write the table (and the unreadable files beside it); exit 1 if nothing scored."""
    from her2exp.apps.predict import predict_folder, predict_slides
    from her2exp.core.fileio import atomic_write_text

    schemas.check_predict(cfg)
    out = schemas.predict_out(cfg)
    if schemas.predict_on_slides(cfg):
        maps = schemas.heatmap_dir(cfg)
        result = predict_slides(cfg, maps)
        table, errors = result.tiles, result.errors
        atomic_write_text(out, table.to_csv(index=False))
        slides = table["slide_id"].nunique() if len(table) else 0
        print(
            f"her2exp: {len(table)} tiles of {slides} slides scored -> {out} (called at the "
            f"{result.level} level); heatmaps in {maps}"
        )
    else:
        result = predict_folder(cfg)
        table, errors = result.tiles, result.errors
        atomic_write_text(out, table.to_csv(index=False))
        print(f"her2exp: {len(table)} patches scored -> {out} (called at the {result.level} level)")
    grouped = cfg.groups is not None or schemas.predict_on_slides(cfg)
    for level in ("slide", "patient"):
        path = schemas.predict_level_out(out, level)
        if result.groups is not None and level == result.level:
            atomic_write_text(path, result.groups.to_csv(index=False))
            print(f"her2exp: {len(result.groups)} {level}s called -> {path}")
        elif grouped or path.exists() and cfg.overwrite:
            path.unlink(missing_ok=True)  # an earlier run's table, about other tiles
    err_path = out.with_suffix(".errors.csv")
    if not errors:
        err_path.unlink(missing_ok=True)  # an earlier run's list, about other files
    else:
        atomic_write_text(
            err_path, pd.DataFrame(errors, columns=["path", "error"]).to_csv(index=False)
        )
        print(
            f"her2exp: {len(errors)} files could not be read (listed in {err_path}):",
            file=sys.stderr,
        )
        for path, err in errors:
            print(f"  {path}: {err}", file=sys.stderr)
    if table.empty:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
