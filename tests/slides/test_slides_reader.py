"""The two slide readers behind `Slide` (OpenSlide, tiffslide), on real files, in-process.

One plain pyramidal TIFF reads the same through both; the same slide written as an OME-TIFF
(pyramid in SubIFDs, resolution only in OME PhysicalSizeX/Y, which OpenSlide does not see) reads
through tiffslide as the rendered image, and `auto` picks tiffslide for it; an OME-TIFF without a
physical size is refused naming it unless assume_mpp; `her2exp-tile` tiles a table holding one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from her2exp.cli.common import compose
from her2exp.cli.tile import main
from her2exp.data.synthetic_slides import (
    pyramid,
    write_ome_slide,
    write_repeated_slide,
    write_slide,
)
from her2exp.slides.reader import Slide, SlideError
from her2exp.slides.tiling import read_tile

#: Level-0 corners on level-1 pixels (even), across tile borders, and half off the slide.
CORNERS = [(0, 0, 0), (300, 130, 0), (1024 - 32, 700, 0), (256, 128, 1), (514, 300, 1)]


def _first(slide_cohort) -> tuple[Path, np.ndarray]:
    folder, cohort = slide_cohort
    row = cohort.table.iloc[0]
    return folder / row.path, cohort.images[row.slide_id]


def test_both_readers_read_the_same_pixels_of_a_plain_tiff(slide_cohort) -> None:
    path, image = _first(slide_cohort)
    with Slide(path, reader="openslide") as ours, Slide(path, reader="tiffslide") as theirs:
        assert (ours.reader, theirs.reader) == ("openslide", "tiffslide")
        assert ours.dimensions == theirs.dimensions == (1024, 768)
        assert ours.level_downsamples == theirs.level_downsamples == (1.0, 2.0)
        assert ours.mpp == pytest.approx(0.5) and theirs.mpp == pytest.approx(0.5)
        for x, y, level in CORNERS:
            a, b = ours.read(x, y, level, (96, 80)), theirs.read(x, y, level, (96, 80))
            assert a.shape == b.shape == (80, 96, 3) and np.array_equal(a, b), (x, y, level)
        edge = theirs.read(1024 - 32, 0, 0, (64, 64))  # half outside: white there, as OpenSlide
        assert np.array_equal(edge[:, :32], image[:64, -32:]) and (edge[:, 32:] == 255).all()
        assert np.array_equal(ours.thumbnail(300)[0], theirs.thumbnail(300)[0])
        assert np.array_equal(theirs.read(0, 0, 0, (1024, 768)), image)
    with Slide(path) as auto:
        assert auto.reader == "openslide" and auto.info().reader == "openslide"


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_an_ome_tiff_reads_through_tiffslide_as_the_rendered_image(
    slide_cohort, tmp_path: Path, compression: str
) -> None:
    _, image = _first(slide_cohort)
    ome = write_ome_slide(tmp_path / "s.ome.tiff", image, mpp=0.5, compression=compression)
    levels = pyramid(image, 256)
    with Slide(ome) as slide:  # auto
        info = slide.info()
        assert (slide.reader, info.reader, info.vendor) == ("tiffslide", "tiffslide", "ome-tiff")
        assert slide.mpp == pytest.approx(0.5) and not info.mpp_assumed  # from OME PhysicalSize
        assert slide.level_downsamples == (1.0, 2.0)
        for level in (0, 1):
            width, height = levels[level].shape[1], levels[level].shape[0]
            got = slide.read(0, 0, level, (width, height)).astype(int)
            diff = np.abs(got - levels[level])
            if compression == "zlib":
                assert diff.max() == 0
            else:  # JPEG at tifffile's default quality: close, never exact
                assert diff.mean() < 3.0 and np.percentile(diff, 99) < 25
    # What auto avoids: OpenSlide opens the file as one level and no resolution.
    with pytest.raises(SlideError, match=f"slide {ome}: its resolution .* unknown"):
        Slide(ome, reader="openslide")
    with Slide(ome, reader="openslide", assume_mpp=0.5) as flat:
        assert flat.level_downsamples == (1.0,)


def test_an_ome_tiff_without_physical_size_is_refused_naming_it(
    slide_cohort, tmp_path: Path
) -> None:
    _, image = _first(slide_cohort)
    bare = write_ome_slide(tmp_path / "bare.ome.tiff", image[:512, :512], mpp=None)
    with pytest.raises(SlideError, match=f"slide {bare}: its resolution .* tiles.assume_mpp"):
        Slide(bare)
    with Slide(bare, assume_mpp=0.25) as slide:
        assert slide.reader == "tiffslide" and slide.mpp == 0.25 and slide.info().mpp_assumed
    whole = bare.read_bytes()
    cut = tmp_path / "cut.ome.tiff"
    cut.write_bytes(whole[: len(whole) // 2])
    # tifffile opens a cut file without a word (its missing tiles would read black).
    with pytest.raises(SlideError, match=f"slide {cut}: truncated or damaged"):
        Slide(cut, assume_mpp=0.25, reader="tiffslide")
    with pytest.raises(SlideError, match=f"slide {cut}: "):  # auto: refused, named
        Slide(cut, assume_mpp=0.25)
    with pytest.raises(SlideError, match="reader='bioformats' is not allowed"):
        Slide(bare, reader="bioformats")


def test_an_untiled_tiff_that_openslide_refuses_is_read_by_tiffslide(
    slide_cohort, tmp_path: Path
) -> None:
    import tifffile

    _, image = _first(slide_cohort)
    strips = tmp_path / "strips.tiff"
    tifffile.imwrite(
        strips,
        image,
        photometric="rgb",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    with pytest.raises(SlideError, match="not a slide OpenSlide can open"):
        Slide(strips, reader="openslide")
    with Slide(strips) as slide:
        assert slide.reader == "tiffslide" and slide.mpp == pytest.approx(0.5)
        assert np.array_equal(slide.read(100, 50, 0, (64, 64)), image[50:114, 100:164])


def test_her2exp_tile_tiles_a_table_with_an_ome_slide(slide_cohort, tmp_path: Path, capsys):
    folder, cohort = slide_cohort
    first, second = cohort.table.iloc[0], cohort.table.iloc[1]
    ome = write_ome_slide(tmp_path / "first.ome.tiff", cohort.images[first.slide_id], mpp=0.5)
    table = cohort.table.iloc[:2].assign(path=[str(ome), str(folder / second.path)])
    csv = tmp_path / "slides.csv"
    table.to_csv(csv, index=False)
    out = tmp_path / "tiles"
    main(compose("tile", [f"input={csv}", f"out={out}", "tiles.size=128"]))
    tiles = pd.read_parquet(out / "tiles.parquet")
    readers = tiles.groupby("slide_id")["reader"].unique().map(list).to_dict()
    assert readers == {first.slide_id: ["tiffslide"], second.slide_id: ["openslide"]}
    summary = pd.read_csv(out / "summary.csv").set_index("slide_id")
    assert summary.loc[first.slide_id, "reader"] == "tiffslide"
    assert json.loads((out / "tiling.json").read_text())["reader"] == "auto"
    ours = tiles[tiles["slide_id"] == first.slide_id]
    cells = np.zeros_like(cohort.tissue[first.slide_id])
    cells[ours["y"] // 128, ours["x"] // 128] = True
    assert not (cells & ~cohort.tissue[first.slide_id]).any() and cells.any()
    row = ours.iloc[len(ours) // 2]
    with Slide(row.slide_path, reader=row.reader) as slide:
        got = read_tile(slide, row.x, row.y, row.level, row.read_size, row["size"])
    want = cohort.images[first.slide_id][row.y : row.y + 128, row.x : row.x + 128]
    assert np.array_equal(got, want)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(compose("tile", [f"input={csv}", f"out={tmp_path / 'x'}", "tiles.reader=pil"]))
    err = capsys.readouterr().err
    assert (
        info.value.code == 2
        and err.startswith("her2exp: ")
        and "tiles.reader='pil' is not allowed" in err
    )


def test_write_slide_reduces_by_four_like_an_svs(tmp_path: Path, slide_cohort) -> None:
    _, image = _first(slide_cohort)
    path = write_slide(tmp_path / "x4.tiff", image, mpp=0.25, tile=128, factor=4)
    with Slide(path) as slide:
        assert slide.level_downsamples == (1.0, 4.0)
        assert slide.level_mpp(1) == pytest.approx(1.0)
        want = image.reshape(192, 4, 256, 4, 3).mean(axis=(1, 3))
        assert np.array_equal(slide.read(0, 0, 1, (256, 192)), np.rint(want).astype(np.uint8))


def test_a_repeated_slide_is_the_slide_of_the_repeated_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (256, 384, 3), dtype=np.uint8)
    image = np.tile(block, (3, 3, 1))[:700, :1000]
    streamed = write_repeated_slide(
        tmp_path / "r.tiff", block, (700, 1000), 0.5, tile=128, compression="zlib"
    )
    whole = write_slide(tmp_path / "w.tiff", image, 0.5, tile=128)
    with Slide(streamed) as a, Slide(whole) as b:
        assert a.level_downsamples == b.level_downsamples == (1.0, 2.0, 4.0)
        assert a.mpp == pytest.approx(0.5)
        for level, down in enumerate(a.level_downsamples):
            size = (int(1000 // down), int(700 // down))
            assert np.array_equal(a.read(0, 0, level, size), b.read(0, 0, level, size))
