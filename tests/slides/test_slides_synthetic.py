"""The embedded slides (her2exp.data.synthetic_slides), read back by real OpenSlide.

They are what the tiler and `data=slides` will be tested on (issue 17), so what OpenSlide sees
must be exactly what was rendered: level 0 pixel for pixel (deflate), reduced levels the area
mean of the level above, the resolution as mpp, and nothing of a patient's beyond the table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest

from her2exp.data.synthetic_slides import BACKGROUND, make_cohort, pyramid, write_slide


def _open(folder: Path, path: str) -> openslide.OpenSlide:
    return openslide.OpenSlide(str(folder / path))


def _rgb(region) -> np.ndarray:
    return np.asarray(region.convert("RGB"))


def test_openslide_reads_the_pyramid_and_its_resolution(slide_cohort) -> None:
    folder, cohort = slide_cohort
    for row in cohort.table.itertuples():
        slide = _open(folder, row.path)
        assert openslide.OpenSlide.detect_format(str(folder / row.path)) == "generic-tiff"
        assert slide.dimensions == (1024, 768)
        assert slide.level_dimensions[:2] == ((1024, 768), (512, 384))
        assert slide.level_downsamples[:2] == (1.0, 2.0)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert dict(slide.associated_images) == {}  # no label, no macro image
        assert "tiff.ImageDescription" not in slide.properties


def test_level_0_is_the_rendered_slide_and_level_1_its_area_mean(slide_cohort) -> None:
    folder, cohort = slide_cohort
    row = cohort.table.iloc[0]
    image = cohort.images[row.slide_id]
    slide = _open(folder, row.path)
    whole = _rgb(slide.read_region((0, 0), 0, slide.dimensions))
    assert np.array_equal(whole, image)
    region = _rgb(slide.read_region((300, 130), 0, (200, 150)))  # across tile borders
    assert np.array_equal(region, image[130:280, 300:500])
    level1 = _rgb(slide.read_region((0, 0), 1, slide.level_dimensions[1]))
    assert np.array_equal(level1, pyramid(image, 256)[1])


def test_tissue_cells_hold_stained_tissue_and_the_rest_is_glass(slide_cohort) -> None:
    _, cohort = slide_cohort
    c = cohort.cell
    for slide_id, mask in cohort.tissue.items():
        image = cohort.images[slide_id].astype(np.float64)
        assert 0.25 <= mask.mean() <= 0.8
        cells = image.reshape(mask.shape[0], c, mask.shape[1], c, 3).mean(axis=(1, 3, 4))
        assert cells[mask].max() < 225 < 235 < cells[~mask].min()
        glass = image.reshape(-1, 3)[np.repeat(np.repeat(~mask, c, 0), c, 1).reshape(-1)]
        assert np.abs(glass.mean(axis=0) - BACKGROUND).max() < 1.0


def test_the_table_names_each_slides_patient_status_and_site(slide_cohort) -> None:
    folder, cohort = slide_cohort
    table = cohort.table
    assert list(table.columns) == ["path", "slide_id", "patient_id", "label", "her2_score", "site"]
    assert set(table["label"]) == {0, 1} and set(table["site"]) == {"site_a", "site_b"}
    assert table["patient_id"].is_unique and table["slide_id"].is_unique
    assert all((folder / p).is_file() for p in table["path"])
    assert (folder / "slides.csv").read_text() == table.to_csv(index=False)
    pos = table.loc[table["label"] == 1, "her2_score"]
    assert set(pos) <= {"2+", "3+"}  # HER2+ is 3+ or ISH-amplified 2+


def test_jpeg_tiles_read_back_within_jpeg_tolerance(tmp_path: Path) -> None:
    cohort = make_cohort(
        tmp_path, n_slides=2, shape=(256, 512), cell=128, compression="jpeg", keep_images=True
    )
    row = cohort.table.iloc[0]
    slide = _open(tmp_path, row.path)
    got = _rgb(slide.read_region((0, 0), 0, slide.dimensions)).astype(int)
    diff = np.abs(got - cohort.images[row.slide_id].astype(int))
    assert diff.mean() < 5.0 and np.percentile(diff, 99) < 40


def test_same_arguments_give_the_same_bytes_and_bad_ones_are_refused(tmp_path: Path) -> None:
    a = make_cohort(tmp_path / "a", n_slides=2, shape=(256, 256), cell=128)
    b = make_cohort(tmp_path / "b", n_slides=2, shape=(256, 256), cell=128)
    assert a.table.equals(b.table)
    for p in a.table["path"]:
        assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes()
    with pytest.raises(ValueError, match="n_slides=1"):
        make_cohort(tmp_path / "c", n_slides=1)
    with pytest.raises(ValueError, match="multiples of cell=128"):
        make_cohort(tmp_path / "c", shape=(300, 512))
    with pytest.raises(ValueError, match="compression='lzw'"):
        write_slide(tmp_path / "x.tiff", np.zeros((256, 256, 3), np.uint8), 0.5, compression="lzw")
