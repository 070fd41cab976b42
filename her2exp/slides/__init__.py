"""Whole-slide images: readers, tissue masks, tiling and tile manifests (docs/architecture.md).

Today: `reader` (a slide opened through OpenSlide or tiffslide), `tiling` (tissue mask, level choice, tile
grid, tile reads) and `synthetic` (embedded slides for tests and offline demos). The
`her2exp-tile` command and `data=slides` build on them (issue 17).
"""
