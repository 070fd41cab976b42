"""Issue 31, items 5 and 8c: `her2exp-predict` checks what it is given before it scores.

A groups table that puts one file (however it is spelled) in two slides or two patients is
refused as training refuses a duplicate path with a different label; a whole-slide image among
the patches (or given as input=) is named as one, with what to do, instead of being scored as a
patch; a file the decoder cannot read is listed in the decoder's own words, not as a Python
exception. Each command runs in-process through its main() on the session's smoke run, on real
PNG patches and real pyramidal TIFFs (her2exp/data/synthetic_slides.py).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import SmokeRun
from her2exp.cli.common import compose
from her2exp.data import synthetic
from her2exp.data.sources import ImageProblem, check_header
from her2exp.data.synthetic_slides import write_slide


def patches(folder: Path, n: int = 3) -> Path:
    """`n` real 32 px PNG patches, p0.png ...; the folder."""
    folder.mkdir(parents=True)
    data = synthetic.generate(n_patients=2, patches_per_patient=2, image_size=32, seed=3)
    for i in range(n):
        Image.fromarray(data.images[i]).save(folder / f"p{i}.png")
    return folder


def predict(smoke_run: SmokeRun, args: list[str]) -> None:
    from her2exp.cli.predict import main

    main(compose("predict", [f"checkpoint={smoke_run.run_dir / 'checkpoints' / 'best.pt'}", *args]))


def refused(smoke_run: SmokeRun, args: list[str], capsys: pytest.CaptureFixture) -> str:
    """her2exp-predict must exit 2 with one `her2exp: ` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        predict(smoke_run, args)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert err.startswith("her2exp: ") and err.count("\n") == 1, err
    return err.strip()


def groups_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    pd.DataFrame(rows, columns=["path", "slide_id", "patient_id"]).to_csv(path, index=False)
    return path


# -- item 5: one file in two slides or two patients -----------------------------------------------
def test_a_file_in_two_patients_is_refused_whatever_its_spelling(
    smoke_run: SmokeRun, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = patches(tmp_path / "tiles")
    out = tmp_path / "p.csv"
    rows = [("p0.png", "S1", "P1"), ("p1.png", "S1", "P1"), ("p2.png", "S2", "P2")]
    clash = groups_csv(tmp_path / "g.csv", [*rows, ("./p0.png", "S1", "P9")])
    err = refused(smoke_run, [f"input={folder}", f"out={out}", f"groups={clash}"], capsys)
    assert err.startswith(f"her2exp: groups={clash}: duplicate path with a different slide_id")
    p0 = (folder / "p0.png").resolve()
    assert f"{p0}: row 1 'p0.png' (slide_id S1, patient_id P1), row 4 './p0.png' " in err
    assert "(slide_id S1, patient_id P9)" in err
    # Its absolute path is the same file too; a slide clash is refused like a patient clash.
    clash = groups_csv(tmp_path / "g2.csv", [*rows, (str(folder / "p2.png"), "S3", "P2")])
    err = refused(smoke_run, [f"input={folder}", f"out={out}", f"groups={clash}"], capsys)
    assert f"row 3 'p2.png' (slide_id S2, patient_id P2), row 4 '{folder / 'p2.png'}' " in err
    assert "(slide_id S3, patient_id P2)" in err
    assert not out.exists()  # refused before anything was scored or written


def test_a_file_listed_twice_with_the_same_ids_is_scored_once(
    smoke_run: SmokeRun, tmp_path: Path
) -> None:
    """Rows that agree change no call (each file is scored once): accepted."""
    folder = patches(tmp_path / "tiles")
    out = tmp_path / "p.csv"
    rows = [("p0.png", "S1", "P1"), ("p1.png", "S1", "P1"), ("p2.png", "S2", "P2")]
    same = groups_csv(tmp_path / "g.csv", [*rows, ("./p0.png", "S1", "P1")])
    predict(smoke_run, [f"input={folder}", f"out={out}", f"groups={same}"])
    table = pd.read_csv(out)
    assert len(table) == 3 and table["path"].is_unique
    got = dict(zip(table["path"].map(lambda p: Path(p).name), table["patient_id"], strict=True))
    assert got == {"p0.png": "P1", "p1.png": "P1", "p2.png": "P2"}


# -- item 8c: a slide, or a file the decoder cannot read --------------------------------------------
def slide(path: Path) -> Path:
    """A real pyramidal TIFF (2 levels, 512 x 384 px) as her2exp-tile reads."""
    image = np.random.default_rng(0).integers(0, 256, (384, 512, 3), dtype=np.uint8)
    return write_slide(path, image, mpp=0.5, tile=128)


def test_a_whole_slide_among_the_patches_is_named_and_nothing_is_scored(
    smoke_run: SmokeRun, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = patches(tmp_path / "tiles")
    wsi = slide(folder / "case1.tiff")
    out = tmp_path / "p.csv"
    err = refused(smoke_run, [f"input={folder}", f"out={out}"], capsys)
    assert err == (
        f"her2exp: input={folder}: {wsi} is a whole-slide image (pyramidal TIFF, 2 levels, "
        "512x384 px), not a patch: tile it with her2exp-tile and predict on the tile manifest "
        "(input=<her2exp-tile out>/tiles.parquet)"
    )
    assert not out.exists() and not out.with_suffix(".errors.csv").exists()
    slide(folder / "case2.tif")  # several: all named, in one line
    err = refused(smoke_run, [f"input={folder}", f"out={out}"], capsys)
    assert "2 files are whole-slide images, not patches: " in err
    assert "case1.tiff (pyramidal TIFF" in err and "case2.tif (pyramidal TIFF" in err
    # The slide itself as input=: a file, which her2exp-tile takes first.
    err = refused(smoke_run, [f"input={wsi}", f"out={out}"], capsys)
    assert f"input={wsi} is a file, not a folder of patches" in err and "her2exp-tile" in err


def tiff_without_dimensions(path: Path) -> Path:
    """A two-page TIFF whose second page has no ImageWidth tag: PIL raises TypeError('Missing
    dimensions') when it counts the pages (the issue's message)."""
    buf = io.BytesIO()
    import tifffile

    with tifffile.TiffWriter(buf) as tif:
        tif.write(np.zeros((8, 8, 3), np.uint8), photometric="rgb", metadata=None)
        tif.write(np.zeros((4, 4, 3), np.uint8), photometric="rgb", metadata=None)
    data = bytearray(buf.getvalue())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        ifd = tif.pages[1].offset
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        if struct.unpack_from("<H", data, ifd + 2 + 12 * i)[0] == 256:  # ImageWidth
            struct.pack_into("<H", data, ifd + 2 + 12 * i, 65000)  # -> a private tag
    path.write_bytes(bytes(data))
    return path


def test_an_undecodable_file_is_listed_in_the_decoders_words(
    smoke_run: SmokeRun, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = patches(tmp_path / "tiles")
    odd = tiff_without_dimensions(folder / "odd.tif")
    with pytest.raises(ImageProblem, match="unreadable image: Missing dimensions"):
        check_header(odd.read_bytes(), 32)  # training's data check: a line, not a traceback
    out = tmp_path / "p.csv"
    predict(smoke_run, [f"input={folder}", f"out={out}"])
    assert len(pd.read_csv(out)) == 3  # the rest are scored
    errors = pd.read_csv(out.with_suffix(".errors.csv"))
    assert errors.to_dict("records") == [
        {"path": str(odd), "error": "unreadable image: Missing dimensions"}
    ]
    assert f"  {odd}: unreadable image: Missing dimensions" in capsys.readouterr().err
