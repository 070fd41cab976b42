"""`her2exp-export`: the schema and checks of a run's export as ONNX or TorchScript; the formats
and ONNX exporters her2exp.apps.export implements are listed here, so the check needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from her2exp.config.choices import TTA_CHOICES
from her2exp.config.common import UriConfig, one_source
from her2exp.config.fields import check_ranges, ranged, refuse
from her2exp.core.errors import UserError
from her2exp.core.fileio import check_writable

#: format= -> the file (and MLflow artifact) name of the export.
FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
ONNX_EXPORTERS = ("legacy", "dynamo")


# -- her2exp-export ------------------------------------------------------------------------------
@dataclass
class ExportCommand:
    """`her2exp-export`: a trained run as an ONNX or TorchScript graph (uint8 patches in,
    P(HER2+) out), checked against PyTorch and logged to the run (her2exp/apps/export.py)."""

    run_id: str | None = None
    checkpoint: str | None = None
    format: str = "onnx"  # onnx | torchscript
    out: str | None = None  # null: <run dir>/export/model.onnx (model.ts)
    overwrite: bool = False  # replace an existing export file
    tta: str | None = None  # null: the run's own evaluation.tta, folded into the graph
    opset: int = ranged(18, ge=13, le=23)  # ONNX opset (onnx only)
    onnx_exporter: str = "legacy"  # legacy (TorchScript-based, fast) | dynamo (torch.export)
    check_patches: int = ranged(256, ge=1)  # test patches the export is checked on
    log: bool = True  # add the file, tags and metric to the run's MLflow run
    tracking: UriConfig = field(default_factory=UriConfig)


def check_export(cfg: Any) -> None:
    """Values, one source, then the user's file: an existing export is replaced only with
    overwrite=true (the default out= under the run directory is checked once the run is
    loaded, her2exp.apps.export.export_run)."""
    check_ranges(cfg, ExportCommand)
    if cfg.format not in FORMATS:
        refuse("format", cfg.format, ", ".join(FORMATS))
    if cfg.onnx_exporter not in ONNX_EXPORTERS:
        refuse("onnx_exporter", cfg.onnx_exporter, ", ".join(ONNX_EXPORTERS))
    if cfg.tta is not None and cfg.tta not in TTA_CHOICES:
        refuse("tta", cfg.tta, f"null (the run's own) or {', '.join(TTA_CHOICES)}")
    one_source(cfg)
    if cfg.out is not None:
        out = Path(cfg.out)
        if out.is_dir():
            raise UserError(f"out={out} is a folder: give the export's file name (model.onnx)")
        if out.exists() and not cfg.overwrite:
            raise UserError(
                f"out={out} exists (an earlier export): overwrite=true to replace it, or "
                "another out="
            )
        check_writable(out, "out")
