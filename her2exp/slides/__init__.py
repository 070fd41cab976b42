"""Whole-slide images: readers, tissue masks and tiling (docs/architecture.md).

Owns :mod:`.reader` (a slide opened through OpenSlide or tiffslide, with its levels and
microns per pixel), :mod:`.tiling` (tissue mask, level choice, tile grid, tile reads) and
:mod:`.annotations` (a QuPath GeoJSON's include and exclude regions, checked): the pixels of a
slide and the regions drawn on it, nothing about labels, splits or runs. What builds on them
lives above: `data=slides` reads a tile manifest tile by tile (her2exp/data/slide_tiles.py),
the embedded synthetic slides for tests and offline demos are her2exp/data/synthetic_slides.py,
and the `her2exp-tile` job that writes the tile manifest is her2exp/apps/tile.py.

May import: `her2exp.config` and `her2exp.core` only (today it needs neither); never `metrics`
or `stain`, its siblings on the floor. The slide libraries (OpenSlide, tiffslide, tifffile) are
imported where a slide is opened, so a run without slide data never loads them.
"""
