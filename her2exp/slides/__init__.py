"""Whole-slide images: readers, tissue masks, tiling and tile manifests (docs/architecture.md).

Today: the embedded slide generator (`her2exp.slides.synthetic`) that tests and offline demos
read with OpenSlide. The tiler (`her2exp-tile`) and `data=slides` build on it (issue 17).
"""
