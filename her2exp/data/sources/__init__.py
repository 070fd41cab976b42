"""The user's own patches: class (or HER2 score) sub-folders, or a CSV/Parquet manifest.

Both sources end in the manifest every source fills (path, label, patient_id, slide_id, site,
split, plus her2_score when a score was given) and the decoded patches, after one validation pass
that lists every problem at once: missing, unreadable or truncated files, unknown labels,
duplicate paths, empty folders, a patient in two explicit splits, a split missing a class.

With `data.on_bad_file=skip` the bad files are dropped and returned as a (path, problem) table
for the run's artifacts; problems of the data set as a whole (leaking patients, a class missing
from a split, nothing left) still stop the run.

One module per concept, all re-exported here (``sources.load``, ``sources.decode``, ...):

- :mod:`.images`: decoding a file to an 8-bit RGB patch (PNG, JPEG, TIFF; RGBA on white,
  grayscale/palette/CMYK to RGB, bilinear resize to `data.image_size`), `FilePatches` for
  `data.cache=false`.
- :mod:`.scan`: the rows a scanner yields and `DataValidationError`, listing every problem.
- :mod:`.labels`: class names and HER2 scores -> the binary label.
- :mod:`.folder` / :mod:`.manifest`: the two scanners (`data=folder`, `data=manifest`).
- :mod:`.checks`: checks of the usable rows as a whole (mixed patients, a split missing a
  class), shared with `data=slides`.
- :mod:`.loading`: `load`: scan, open every file, check, split, fingerprint.
- :mod:`.export`: a loaded manifest written out; the synthetic generator exported as PNGs.

May import: `her2exp.core` and, of the data package, `splits` and `synthetic`; the submodules
import each other directly, never this package, which only re-exports them.
"""

from her2exp.data.sources.checks import patient_labels, structural_problems
from her2exp.data.sources.export import export_synthetic, write_manifest
from her2exp.data.sources.folder import image_files, patient_from, scan_folder
from her2exp.data.sources.images import (
    IMAGE_SUFFIXES,
    FilePatches,
    ImageProblem,
    PatchReadError,
    check_header,
    decode,
    read_patch,
    resize_patch,
    whole_slide,
)
from her2exp.data.sources.labels import EQUIVOCAL_SCORE, SCORES, allowed_labels, label_of
from her2exp.data.sources.loading import Loaded, load, scan_source
from her2exp.data.sources.manifest import cv_ignores_column, read_manifest, scan_manifest
from her2exp.data.sources.scan import (
    MANIFEST_COLUMNS,
    MAX_LISTED,
    SKIPPED_COLUMNS,
    UNKNOWN_SITE,
    DataValidationError,
    Scan,
)

__all__ = [
    "EQUIVOCAL_SCORE",
    "IMAGE_SUFFIXES",
    "MANIFEST_COLUMNS",
    "MAX_LISTED",
    "SCORES",
    "SKIPPED_COLUMNS",
    "UNKNOWN_SITE",
    "DataValidationError",
    "FilePatches",
    "ImageProblem",
    "Loaded",
    "PatchReadError",
    "Scan",
    "allowed_labels",
    "check_header",
    "cv_ignores_column",
    "decode",
    "image_files",
    "export_synthetic",
    "label_of",
    "load",
    "patient_from",
    "patient_labels",
    "read_manifest",
    "read_patch",
    "resize_patch",
    "scan_folder",
    "scan_manifest",
    "scan_source",
    "structural_problems",
    "whole_slide",
    "write_manifest",
]
