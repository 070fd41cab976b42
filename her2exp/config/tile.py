"""`her2exp-tile`: the schema of a tiling (tiles.*, the slide table's label rules), its checks,
and what makes two tilings of a slide the same (`settings`, recorded in `out` as SETTINGS_FILE),
so that an output folder is checked before a slide is opened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from her2exp.config.choices import READERS
from her2exp.config.common import label_rules
from her2exp.config.fields import check_ranges, option, ranged, refuse
from her2exp.core.errors import ConfigError, UserError
from her2exp.core.fileio import check_writable

SETTINGS_FILE = "tiling.json"  # the settings every per-slide file of `out` was made with
#: apps.tile_out's locks in `out` (claiming the settings; held by every running tiler).
CLAIM_LOCK, ACTIVE_LOCK = ".her2exp-tile.claim", ".her2exp-tile.active"
MASK_MPP_MIN = 2.0  # um per pixel: the finest tissue mask (TilesConfig says why)


# -- her2exp-tile --------------------------------------------------------------------------------
@dataclass
class TilesConfig:
    """tiles.*: the physical tile and what counts as tissue.

    `mask_mpp` is at least `MASK_MPP_MIN` um per pixel: the tissue mask (Otsu's threshold on
    optical density) needs pixels that average nuclei, cytoplasm and stroma into tissue. On a
    finer thumbnail a pixel resolves them, Otsu splits the stain from the pale tissue between,
    and what is left is dropped as specks: on six embedded slides (0.5 um/px), at level 0 (what
    0.001 asks for) it found none of one slide's tissue, 1-3% of two others' and 21-81% of the
    rest, at 1 um/px no more, at 2 um/px 89-99% of every slide's (at 8: 92-100%). A finer mask
    would not serve the grid either (a 224 px tile at 0.5 um/px spans 14 mask pixels at
    8 um/px) and its memory grows as 1/mask_mpp^2; so a finer value is refused before a slide
    is opened, not clamped behind the user's back."""

    mpp: float = ranged(0.5, gt=0, le=100, help="um per pixel of a tile")
    size: int = ranged(224, ge=16, le=8192, help="tile side in px (at mpp)")
    min_tissue: float = ranged(
        0.5, ge=0, le=1, help="fraction of a tile the tissue mask must cover"
    )
    assume_mpp: float | None = ranged(
        None,
        gt=0,
        le=100,
        help="um per pixel for slides whose file has none; null: such slides are refused",
    )
    mask_mpp: float = ranged(
        8.0,
        ge=MASK_MPP_MIN,
        le=1000,
        allowed=f"a value in [{MASK_MPP_MIN:g}, 1000] um per "
        "pixel (finer, the tissue mask sees nuclei, not tissue)",
        help="um per pixel of the tissue mask's thumbnail",
    )
    processes: int = ranged(1, ge=1, le=256, help="slides tiled in parallel processes")
    reader: str = option(
        "auto",
        help="auto (tiffslide for OME-TIFF, else OpenSlide) | openslide | tiffslide",
    )
    shard: str | None = option(
        None, help="i/n: this machine's share of the slides (SLURM arrays); null: all"
    )
    exclude_classes: list[str] = option(
        factory=lambda: ["Ignore*", "Ignore", "Exclude", "Pen", "Artefact", "Artifact"],
        help="QuPath classes whose regions are excluded; any other class includes",
    )


@dataclass
class TileCommand:
    """`her2exp-tile`: a slide table -> tiles.parquet (coordinates), QC thumbnails, summary."""

    input: str | None = option(
        None, help="the slide table, CSV or Parquet: path, label or score, [patient_id, site, ...]"
    )
    out: str | None = option(None, help="the output folder of the tile manifest")
    tiles: TilesConfig = field(default_factory=TilesConfig)
    # Typed Any, as her2exp-manifest's maps (Hydra parses keys like 0 as numbers).
    label_map: Any = option(None, help="label name -> 0 or 1; null: her2_neg -> 0, her2_pos -> 1")
    score_map: Any = option(None, help="score -> 0 or 1; null: 0, 1+ -> 0 and 3+ -> 1")
    equivocal: str = option("exclude", help="IHC 2+ without ISH: exclude | positive | negative")
    on_bad_file: str = option(
        "error", help="error | skip: leave unusable slides out, listed in summary.csv"
    )
    overwrite: bool = option(
        False,
        help="tile an earlier output again with other settings (cleared once; same settings resume)",
    )


def tile_data_config(cfg: Any) -> DictConfig:
    """The label rules of a slide table: data=manifest's, with this command's maps."""
    return label_rules(cfg, {"equivocal": cfg.equivocal})


def check_tile(cfg: Any) -> None:
    """Values, the table, the output folder: all before a slide is opened."""
    check_ranges(cfg, TileCommand)
    if cfg.on_bad_file not in ("error", "skip"):
        refuse("on_bad_file", cfg.on_bad_file, "error or skip")
    if cfg.tiles.reader not in READERS:
        refuse("tiles.reader", cfg.tiles.reader, ", ".join(READERS))
    shard = cfg.tiles.shard
    if shard is not None:
        parts = str(shard).split("/")
        if (
            len(parts) != 2
            or not all(p.isdigit() for p in parts)
            or not 0 <= int(parts[0]) < int(parts[1])
        ):
            refuse("tiles.shard", shard, "i/n with 0 <= i < n (e.g. 0/4)")
    if not cfg.input:
        raise ConfigError("input=<the slide table: CSV or Parquet of slides> is required")
    if not Path(cfg.input).is_file():
        raise ConfigError(f"input={cfg.input}: no such file")
    if not cfg.out:
        raise ConfigError("out=<folder for the tile manifest> is required")
    tile_data_config(cfg)
    try:
        check_out(Path(cfg.out), cfg.tiles, cfg.overwrite)
    except FileExistsError as exc:
        raise UserError(str(exc)) from None
    check_writable(cfg.out, "out", folder=True)


def settings(tiles: DictConfig) -> dict[str, Any]:
    """What makes two tilings of a slide the same (processes and shards do not)."""
    keep = ("mpp", "size", "min_tissue", "assume_mpp", "mask_mpp", "exclude_classes", "reader")
    return {k: OmegaConf.to_container(tiles, resolve=True)[k] for k in keep}


def check_out(out: Path, tiles: DictConfig, overwrite: bool) -> None:
    """`out` new, empty, or an earlier tiling with the same settings (resumed); other settings
    are refused unless overwrite=true (apps.tile_out's claim then removes the earlier tiles,
    once, when no other tiler is running there). A first look: the claim decides."""
    ours = {CLAIM_LOCK, ACTIVE_LOCK}  # left by a tiler killed before it claimed
    if not out.exists() or (out.is_dir() and not {p.name for p in out.iterdir()} - ours):
        return
    if not out.is_dir():
        raise FileExistsError(f"out={out} exists and is not a folder: give a new or empty folder")
    recorded = out / SETTINGS_FILE
    if not recorded.is_file():
        raise FileExistsError(
            f"out={out} is not empty and holds no {SETTINGS_FILE}, so it is not an earlier "
            "her2exp-tile output: give a new or empty folder"
        )
    try:
        before = json.loads(recorded.read_text())
    except (OSError, ValueError) as exc:
        raise FileExistsError(
            f"out={out}: its {SETTINGS_FILE} is unreadable ({exc}): give another out=, or "
            f"restore the file (the settings its tiles were made with)"
        ) from None
    if not isinstance(before, dict):
        raise FileExistsError(
            f"out={out}: its {SETTINGS_FILE} holds no settings: give another out="
        )
    if before != settings(tiles) and not overwrite:
        changed = [
            f"tiles.{k}: {before.get(k)} -> {v}"
            for k, v in settings(tiles).items()
            if before.get(k) != v
        ]
        raise FileExistsError(
            f"out={out} was tiled with other settings ({'; '.join(changed)}): give another out=, "
            "or overwrite=true to tile it again"
        )
