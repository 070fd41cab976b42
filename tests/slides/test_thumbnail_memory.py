"""A thumbnail in bounded memory (issue 31): read in strips, the pixels of PIL's whole resize.

A slide without a pyramid is level 0 alone: its thumbnail was one read of all of it (GB) and,
under a memory cap, `region (0, 0) unreadable: ` with nothing after. Here: strips give PIL's
very pixels (both readers, odd sizes, every level tiffslide reads); a single-level slide's two
thumbnails of `her2exp-tile` (the mask's at 8 um/px, the QC's) stay within a bound whatever
its size, in a subprocess under an address-space cap, through both readers; and a read that
does not fit says so, with its size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from her2exp.data.synthetic_slides import pyramid, write_repeated_slide, write_slide
from her2exp.slides.reader import Slide, on_white, reduce_level

REPO = Path(__file__).resolve().parents[2]
SIDE = 8192  # px: 201 MB of RGB (the two thumbnails read it twice), 32 MiB as JPEG tiles
#: The bound: about 150 MiB through OpenSlide, 90 through tiffslide, whatever the side (a whole
#: read took 2.3 GB and 490 MiB here; at 24,576 px about 21 GB and 4.1 GiB).
PEAK_MIB = 256
CAP_MIB = 2048  # address space the thumbnails may add (a read of the level as before needs 2.3 GB)

PROBE = r"""
import json, resource, sys
import numpy as np
from her2exp.slides.reader import Slide, SlideError

def kib(key):  # of /proc/self/status: VmRSS now, VmHWM its peak (ru_maxrss is the parent's
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key))

path, reader, qc_file, cap = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
slide = Slide(path, reader=reader)
slide.read(0, 0, 0, (256, 256))  # the decoder's own start-up, not the thumbnail's
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
limit = vm + cap * 2**20 if hard == resource.RLIM_INFINITY else min(hard, vm + cap * 2**20)
resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
base = kib("VmRSS:")
try:
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM from now (else the imports' peak)
except OSError:
    pass
mask, down = slide.thumbnail_at(8.0)  # her2exp-tile's tissue mask (tiles.mask_mpp)
qc, qc_down = slide.thumbnail(1024)  # and its QC thumbnail
peak = (kib("VmHWM:") - base) / 1024
np.save(qc_file, qc)
width, height = slide.dimensions
try:
    slide.read(0, 0, 0, (4 * width, 4 * height))  # 16 slides' worth: over the cap
    error = ""
except SlideError as exc:
    error = str(exc)
print(json.dumps({"peak": peak, "mask": [*mask.shape, down], "qc": [*qc.shape, qc_down],
                  "error": error}))
"""


def _noise_slide(folder: Path) -> tuple[Path, list[np.ndarray]]:
    """Noise of odd sides (every pixel counts; downsamples 2.0018, 4.006): a slide, its levels."""
    image = np.random.default_rng(3).integers(0, 256, (997, 1333, 3), dtype=np.uint8)
    return write_slide(folder / "noise.tiff", image, 0.5, tile=128), pyramid(image, 128)


@pytest.mark.parametrize("reader", ["openslide", "tiffslide"])
def test_a_thumbnail_in_strips_is_pils_resize_of_the_whole_level(
    tmp_path: Path, slide_cohort, reader: str
) -> None:
    path, levels = _noise_slide(tmp_path)
    folder, cohort = slide_cohort
    cases = [(path, 0, (1333, 997))]  # level 0: what a slide without a pyramid has
    cases.append((folder / cohort.table["path"][0], 1, (512, 384)))  # a downsample of 2.0
    if reader == "tiffslide":  # it reads a level's own rows at any downsample
        cases += [(path, k, level.shape[1::-1]) for k, level in enumerate(levels) if k]
    for slide_path, level, src in cases:
        with Slide(slide_path, reader=reader) as slide:
            whole = Image.fromarray(slide.read(0, 0, level, src))
            for out in [(src[0] // 2, src[1] // 2), (500, 374), (333, 249), (97, 61), src]:
                want = np.asarray(whole.resize(out, Image.BOX))
                for budget in (12000, 60000):  # strips of 1 to many thumbnail rows
                    got = reduce_level(slide, level, src, out, budget)
                    assert np.array_equal(got, want), (slide_path.name, level, out, budget)


def test_compositing_on_white_is_the_float_formula_in_integers() -> None:
    rgb, alpha = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([rgb, rgb, rgb, alpha], axis=-1).astype(np.uint8)
    a = alpha[..., None].astype(np.float32) / 255.0
    want = np.rint(rgba[..., :3] * a + 255.0 * (1.0 - a)).astype(np.uint8)
    assert np.array_equal(on_white(rgba), want)
    opaque = rgba[:, -1:]
    assert np.array_equal(on_white(opaque), opaque[..., :3])


@pytest.fixture(scope="module")
def single_level(slide_cohort, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A SIDE x SIDE slide of one level (as some scanners export), 0.25 um/px, JPEG tiles of
    a rendered slide repeated (streamed: the writer never holds the image); with its block."""
    folder, cohort = slide_cohort
    block = cohort.images[cohort.table["slide_id"][0]]
    path = tmp_path_factory.mktemp("single") / "single.tiff"
    write_repeated_slide(path, block, (SIDE, SIDE), 0.25, levels=1)
    return path, block


def test_a_slide_without_a_pyramid_is_thumbnailed_in_bounded_memory(single_level, tmp_path):
    path, block = single_level
    with Slide(path) as slide:
        assert slide.level_downsamples == (1.0,) and slide.dimensions == (SIDE, SIDE)
    # MALLOC_ARENA_MAX: a decoder thread's malloc arena reserves 64 MiB of address space
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    procs = {
        reader: subprocess.Popen(
            [sys.executable, "-c", PROBE, str(path), reader, str(tmp_path / reader), str(CAP_MIB)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,  # not the repository: PYTHONPATH names the code that is measured
        )
        for reader in ("openslide", "tiffslide")  # side by side: the suite runs on 2 cores
    }
    # the QC thumbnail is 8x8 means of the repeated block (JPEG moves them a little)
    means = block.reshape(96, 8, 128, 8, 3).mean(axis=(1, 3))
    want = np.tile(means, (SIDE // 768 + 1, SIDE // 1024, 1))[: SIDE // 8]
    for reader, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{reader}:\n{stderr[-3000:]}"
        got = json.loads(stdout.splitlines()[-1])
        assert got["peak"] < PEAK_MIB, f"{reader}: {got['peak']:.0f} MiB for a thumbnail"
        assert got["mask"] == [SIDE // 32, SIDE // 32, 3, 32.0]
        assert got["qc"] == [1024, 1024, 3, 8.0]
        qc = np.load(tmp_path / f"{reader}.npy")
        assert np.abs(qc - want).mean() < 2.0, reader
        side = 4 * SIDE
        assert got["error"].startswith(
            f"slide {path}: region (0, 0) unreadable: out of memory reading {side} x {side} px "
            f"at level 0 ({side * side * 3 / 2**20:,.0f} MiB as RGB)"
        ), got["error"]
