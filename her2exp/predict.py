"""A trained run applied to a folder of patches (the library part of `her2exp-predict`,
her2exp/cli/predict.py).

Each row: path, HER2+ probability, and the decision at every threshold frozen on the training
run's validation split. Files that cannot be decoded are listed (stderr and the `.errors.csv`
beside the output) and skipped; the rest are still scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from her2exp.config import ConfigError
from her2exp.data.sources import read_patch  # decoded exactly as in training
from her2exp.engine import Preprocess
from her2exp.evaluation import load_model, load_run, run_stain

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def predict_folder(opts: Any) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Score every image under `opts.input` with the run `opts` names (run_id or checkpoint);
    returns (one row per scored file, (path, error) per file that could not be decoded)."""
    if not opts.input:
        raise ConfigError("input=<folder of patches> is required")
    root = Path(opts.input)
    if not root.is_dir():
        raise ConfigError(f"input={root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"input={root} holds no {', '.join(sorted(IMAGE_SUFFIXES))} files")
    run = load_run(opts)  # refused without the thresholds frozen on val: no fallback of ours
    cfg, thresholds = run.cfg, run.thresholds
    stain = run_stain(run, 0)  # refused when a Macenko run lost its fitted reference
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(run, device)
    model.eval()
    # The one input path of training and evaluation: stain (here on the CPU), then mean/std.
    preprocess = Preprocess(device, tuple(cfg.data.mean), tuple(cfg.data.std))

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
        with torch.no_grad():
            probs = torch.softmax(model(preprocess(x)).float(), 1)[:, 1].cpu()
        for path, p in zip(paths, probs.tolist(), strict=True):
            row = {"path": str(path), "prob_her2_pos": p}
            row.update({f"called_her2_pos_{k}": int(p >= t) for k, t in thresholds.items()})
            rows.append(row)
    return pd.DataFrame(rows), errors
