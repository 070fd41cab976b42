"""`her2exp-tile`: whole slides -> a tile manifest that `data=slides` will train on.

    her2exp-tile input=slides.csv out=tiles/ tiles.mpp=0.5 tiles.size=224
    her2exp-tile input=slides.csv out=tiles/ tiles.processes=4 tiles.shard=0/8

The slide table (CSV or Parquet) has `path` (relative to the table, or absolute), `label` (0/1 or
a label_map name) or `score` (0, 1+, 2+, 3+), and optionally `slide_id`, `patient_id`, `site`,
`split`, `annotation` (a QuPath GeoJSON of include/exclude regions). Every slide is opened and its
tissue found before anything is written; `on_bad_file=skip` leaves unusable ones out, listed in
`summary.csv`. Output: `slides/<id>.parquet` and `qc/<id>.png` per slide, then `tiles.parquet`
(coordinates at level 0, level, read size, mpp, tissue fraction; no pixels) and `summary.csv` once
every slide of the table is tiled. Only a slide's vendor, size, levels and mpp are recorded.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from her2exp.cli.common import UserError, hydra_command
from her2exp.config import commands as schemas


@hydra_command("tile")
def main(cfg: DictConfig) -> None:
    """Check everything, tile this shard, print what was done."""
    from her2exp.apps import tile
    from her2exp.data.sources import DataValidationError

    schemas.check_tile(cfg)
    out = Path(cfg.out)
    try:
        jobs = tile.read_slide_table(Path(cfg.input), schemas.tile_data_config(cfg))
        done = tile.run(jobs, out, cfg.tiles, cfg.on_bad_file, cfg.overwrite)
    except DataValidationError as exc:
        raise UserError(str(exc)) from exc
    changed = f" ({done['changed']} changed since tiled)" if done["changed"] else ""
    what = (
        f"{done['tiled']} slides tiled{changed}, {done['reused']} already tiled, "
        f"{done['skipped']} skipped"
    )
    if done["complete"]:
        print(f"her2exp-tile: {what} -> {out / 'tiles.parquet'}")
    else:
        print(f"her2exp-tile: {what}; tiles.parquet is written once every shard has run")


if __name__ == "__main__":
    main()
