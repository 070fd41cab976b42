"""`her2exp-predict`: apply a trained run to a folder of patches and write predictions.csv.

    her2exp-predict checkpoint=outputs/<date>/<time>/checkpoints/best.pt input=/path/patches
    her2exp-predict run_id=<MLflow run id> input=/path/patches output=preds.csv

Each row: path, HER2+ probability, and the decision at every threshold frozen on the training
run's validation split. Files that cannot be decoded are listed (stderr and the `.errors.csv`
beside the output) and skipped; the rest are still scored.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from her2exp import models, reports
from her2exp.config import ConfigError
from her2exp.data.sources import read_patch  # decoded exactly as in training
from her2exp.evaluate import load_source

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
DEFAULTS = {
    "checkpoint": None,
    "run_id": None,
    "input": None,
    "output": "predictions.csv",
    "batch_size": 64,
    "tracking": {"uri": "sqlite:///mlflow.db"},
}


def predict_folder(opts: Any) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    if not opts.input:
        raise ConfigError("input=<folder of patches> is required")
    root = Path(opts.input)
    if not root.is_dir():
        raise ConfigError(f"input={root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"input={root} holds no {', '.join(sorted(IMAGE_SUFFIXES))} files")
    state, _ = load_source(opts)
    cfg = OmegaConf.create(state["config"])
    thresholds = {k: float(v) for k, v in state.get("thresholds", {}).items()} or {
        "youden": float(state["threshold_youden_val"])
    }
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = models.build(cfg.model, device, load_weights=False)  # best.pt holds them
    model.load_state_dict(state["model"])
    model.eval()
    from her2exp.stain import pipeline as stain_pipeline

    stain = stain_pipeline.from_state(cfg.stain, state.get("stain"), 0)
    mean = torch.tensor(list(cfg.data.mean)).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(list(cfg.data.std)).view(1, 3, 1, 1) * 255.0

    rows, errors = [], []
    for start in range(0, len(files), opts.batch_size):
        batch, paths = [], []
        for path in files[start : start + opts.batch_size]:
            try:
                batch.append(read_patch(path, cfg.data.image_size))
                paths.append(path)
            except Exception as exc:  # noqa: BLE001 - any decoder error is reported per file
                errors.append((str(path), f"{type(exc).__name__}: {exc}"))
        if not batch:
            continue
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
        if stain is not None:
            x = stain(x, False)
        x = x.float()
        with torch.no_grad():
            probs = torch.softmax(model(((x - mean) / std).to(device)).float(), 1)[:, 1].cpu()
        for path, p in zip(paths, probs.tolist(), strict=True):
            row = {"path": str(path), "prob_her2_pos": p}
            row.update({f"called_her2_pos_{k}": int(p >= t) for k, t in thresholds.items()})
            rows.append(row)
    return pd.DataFrame(rows), errors


def main(argv: list[str] | None = None) -> None:
    opts = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(argv if argv is not None else sys.argv[1:]))
    try:
        table, errors = predict_folder(opts)
    except ConfigError as exc:
        print(f"her2exp: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(opts.output)
    reports.atomic_write_text(out, table.to_csv(index=False))
    print(f"her2exp: {len(table)} patches scored -> {out}")
    if errors:
        err_path = out.with_suffix(".errors.csv")
        reports.atomic_write_text(
            err_path, pd.DataFrame(errors, columns=["path", "error"]).to_csv(index=False)
        )
        print(f"her2exp: {len(errors)} files could not be read (listed in {err_path}):",
              file=sys.stderr)  # fmt: skip
        for path, err in errors:
            print(f"  {path}: {err}", file=sys.stderr)
    if table.empty:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
