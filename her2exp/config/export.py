"""`her2exp-export`: the schema and checks of a run's export as ONNX or TorchScript; the formats
and ONNX exporters her2exp.apps.export implements are listed here, so the check needs no torch.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from her2exp.config.choices import TTA_CHOICES
from her2exp.config.common import UriConfig, one_source
from her2exp.config.fields import check_ranges, option, ranged, refuse
from her2exp.config.model_uri import parse_model_uri
from her2exp.core.errors import UserError
from her2exp.core.fileio import check_writable

#: format= -> the file (and MLflow artifact) name of the export.
FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
ONNX_EXPORTERS = ("legacy", "dynamo")
#: ONNX metadata_props key / TorchScript extra file (her2exp.json) of every export's contract.
METADATA_KEY = "her2exp"
_ONNX_METADATA_FIELD = 14  # ModelProto.metadata_props (onnx.proto3)


# -- her2exp-export ------------------------------------------------------------------------------
@dataclass
class ExportCommand:
    """`her2exp-export`: a trained run as an ONNX or TorchScript graph (uint8 patches in,
    P(HER2+) out), checked against PyTorch and logged to the run (her2exp/apps/export.py)."""

    run_id: str | None = option(None, help="the MLflow run of the trained model")
    checkpoint: str | None = option(None, help="a best.pt of the trained model")
    model_uri: str | None = option(
        None, help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model (the registry)"
    )
    format: str = option("onnx", help="onnx | torchscript")
    out: str | None = option(
        None, help="the export file; null: <run dir>/export/model.onnx (model.ts)"
    )
    overwrite: bool = option(False, help="replace an earlier export at out")
    tta: str | None = option(None, help="none | d4, folded into the graph; null: the run's own")
    opset: int = ranged(18, ge=13, le=23, help="ONNX opset (onnx only)")
    onnx_exporter: str = option(
        "legacy", help="legacy (TorchScript-based, fast) | dynamo (torch.export)"
    )
    check_patches: int = ranged(256, ge=1, help="test patches the export is checked on")
    log: bool = option(True, help="add the file, tags and metric to the run's MLflow run")
    tracking: UriConfig = field(default_factory=UriConfig)


def check_export(cfg: Any) -> None:
    """Values, one source, then the user's file: an earlier export is replaced only with
    overwrite=true, any other file never (`check_out`; the default out= under the run directory
    is checked once the run is loaded, her2exp.apps.export.export_run)."""
    check_ranges(cfg, ExportCommand)
    if cfg.format not in FORMATS:
        refuse("format", cfg.format, ", ".join(FORMATS))
    if cfg.onnx_exporter not in ONNX_EXPORTERS:
        refuse("onnx_exporter", cfg.onnx_exporter, ", ".join(ONNX_EXPORTERS))
    if cfg.tta is not None and cfg.tta not in TTA_CHOICES:
        refuse("tta", cfg.tta, f"null (the run's own) or {', '.join(TTA_CHOICES)}")
    one_source(cfg)
    if cfg.model_uri:
        parse_model_uri(cfg.model_uri)  # its form; the store is read when resolved
    if cfg.out is not None:
        check_out(Path(cfg.out), str(cfg.format), bool(cfg.overwrite))


def check_out(out: Path, fmt: str, overwrite: bool) -> None:
    """An existing `out` is replaced only when it is an earlier her2exp export (its contract
    inside it: `earlier_export`) and overwrite=true; any other file is the user's own, which
    overwrite=true must not destroy (out=notes.txt by mistake), so it is refused either way.
    Checked by the command line (an explicit out=) and by the export (its default out)."""
    if out.is_dir():
        raise UserError(f"out={out} is a folder: give the export's file name ({FORMATS[fmt]})")
    if out.exists():
        earlier = earlier_export(out)
        if earlier is None:
            raise UserError(
                f"out={out} exists and is not a her2exp export (no her2exp metadata in it); "
                "overwrite=true replaces only an earlier export: give another out="
            )
        if not overwrite:
            raise UserError(
                f"out={out} exists (an earlier her2exp {earlier} export): overwrite=true to "
                "replace it, or another out="
            )
    check_writable(out, "out")


def earlier_export(path: Path) -> str | None:
    """The format ("onnx", "torchscript") of a file her2exp-export wrote, None for any other
    file: a TorchScript zip holding the extra file her2exp.json, or an ONNX model whose
    metadata_props has the key her2exp. Read without torch or onnx (this module stays light):
    a zip's names, or the protobuf's top-level fields, skipping the graph's bytes."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            own = any(n.endswith(f"/extra/{METADATA_KEY}.json") for n in names)
            return "torchscript" if own else None
        with path.open("rb") as fh:
            return "onnx" if METADATA_KEY in _onnx_metadata_keys(fh) else None
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


def _varint(fh: Any) -> int:
    """One protobuf varint from `fh`; ValueError at the end of the file or past 10 bytes."""
    value = 0
    for shift in range(0, 70, 7):
        byte = fh.read(1)
        if not byte:
            raise ValueError("end of file inside a varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
    raise ValueError("varint longer than 10 bytes")


def _onnx_metadata_keys(fh: Any) -> set[str]:
    """The keys of an ONNX ModelProto's metadata_props, read field by field (any other field's
    bytes are skipped); ValueError where the bytes are not a protobuf message."""
    size = fh.seek(0, 2)
    fh.seek(0)
    keys: set[str] = set()
    while fh.tell() < size:
        tag = _varint(fh)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _varint(fh)
        elif wire in (1, 5):
            fh.seek(8 if wire == 1 else 4, 1)
        elif wire == 2:
            length = _varint(fh)
            if field == _ONNX_METADATA_FIELD and length < 1 << 20:
                keys.add(_entry_key(fh.read(length)))
            else:
                fh.seek(length, 1)
        else:
            raise ValueError(f"wire type {wire}: not an ONNX model")
        if fh.tell() > size:
            raise ValueError("a field runs past the end of the file")
    return keys


def _entry_key(entry: bytes) -> str:
    """The key (field 1) of a StringStringEntryProto's bytes, "" when it has none first."""
    if len(entry) < 2 or entry[0] != 0x0A:  # field 1, length-delimited
        return ""
    length = entry[1]  # the key her2exp writes is short: a one-byte length
    return entry[2 : 2 + length].decode("utf-8", "replace") if length < 0x80 else ""
