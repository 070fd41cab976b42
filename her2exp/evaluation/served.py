"""The run's MLflow model as a service: raw patches in, HER2 calls out (docs/architecture.md,
"Serving").

A client has RGB patches, not the run's preprocessing. The logged model (artifact path `model`
of the training run) is an MLflow pyfunc from code (her2exp/serving_model.py, no pickle) with the
run's best.pt as its artifact, so it applies what `her2exp-predict` applies, through the same
objects: the resize (`scorer.prepare_patches`), then the run's one `Scorer` (its stain placed as
trained, mean/std, memory format, autocast dtype, TTA and frozen temperature, as her2exp-eval
scores), then the one decision rule (`metrics.called`) at the run's frozen tile-level operating
point (`evaluation.operating_point`, or `params={"operating_point": ...}`).

Input: a column `image` whose cells are base64 PNG/JPEG strings or (H, W, 3) uint8 nested lists
(`{"inputs": [[[[r, g, b], ...]]]}` reaches the model as that column too). A request that is not
that (empty, not base64, not an image, wrong shape, values not integers in 0-255, an unknown
operating point) is a `RequestError` naming the patch, which the model raises as MLflow's
INVALID_PARAMETER_VALUE: HTTP 400 from `mlflow models serve`, never 500.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from PIL import Image

from her2exp import metrics
from her2exp.data.sources import ImageProblem, decode
from her2exp.evaluation.scorer import build_scorer, prepare_patches
from her2exp.evaluation.trained_run import level_thresholds, load_run
from her2exp.runtime.rundir import RunDir

#: The input column (the signature's only one) and the output columns, in order.
INPUT_COLUMN = "image"
OUTPUT_COLUMNS = ("prob_her2_pos", "called_her2_pos", "threshold", "operating_point")
#: The models-from-code file MLflow copies into the model and runs when it loads it.
MODEL_CODE = Path(__file__).resolve().parents[1] / "serving_model.py"


class RequestError(ValueError):
    """A request the served model cannot score, with the reason a client can act on."""


def _cells(model_input: Any) -> list[Any]:
    """One entry per patch, from what MLflow hands the model (a DataFrame with the `image`
    column) or an in-process caller passes (an (N, H, W, 3) array, a dict, a list)."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            raise RequestError(
                f"no column {INPUT_COLUMN!r} (got {', '.join(map(str, model_input.columns))}): "
                f"send {{'{INPUT_COLUMN}': [base64 PNG/JPEG or (H, W, 3) uint8 lists]}}"
            )
        return list(model_input[INPUT_COLUMN])
    if isinstance(model_input, dict):
        if INPUT_COLUMN not in model_input:
            raise RequestError(f"no key {INPUT_COLUMN!r} (got {', '.join(map(str, model_input))})")
        model_input = model_input[INPUT_COLUMN]
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    return list(model_input)


def _texts(cell: Any) -> list[Any] | None:
    """A cell holding a list of strings (MLflow makes `{"image": [s1, s2]}` passed in process
    one row of that list): its strings, one patch each; None for any other cell."""
    if isinstance(cell, (list, tuple, np.ndarray)) and len(cell) > 0:
        if all(isinstance(v, (str, bytes)) for v in cell):
            return list(cell)
    return None


def _decoded(i: int, text: str | bytes, image_size: int) -> np.ndarray:
    """A base64 PNG/JPEG, decoded exactly as training decodes a file (sources.decode)."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"image {i}: not base64 (a PNG/JPEG as base64 text)") from None
    try:
        return decode(data, image_size)[0]
    except ImageProblem as exc:
        raise RequestError(f"image {i}: {exc}") from None


def _pixels(i: int, cell: Any) -> np.ndarray:
    """An (H, W, 3) array of integers 0-255 as uint8; anything else is refused, not cast."""
    try:
        arr = np.asarray(cell)
    except ValueError:  # ragged nested lists (numpy >= 1.24)
        raise RequestError(f"image {i}: rows of unequal length; expected (H, W, 3)") from None
    if arr.dtype == object:
        raise RequestError(f"image {i}: rows of unequal length or mixed types; expected (H, W, 3)")
    if arr.ndim != 3 or arr.shape[-1] != 3 or 0 in arr.shape:
        raise RequestError(f"image {i}: shape {tuple(arr.shape)}; expected (H, W, 3) RGB")
    if arr.dtype.kind in "US":  # MLflow parses JSON numbers posted to the string column as text
        digits = np.char.isdigit(arr.astype(str))
        if not digits.all():
            bad = str(arr[~digits].flat[0])
            raise RequestError(f"image {i}: value {bad!r} is not an integer in 0-255 (uint8 RGB)")
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "ui":
        raise RequestError(f"image {i}: {arr.dtype} values; expected integers in 0-255 (uint8 RGB)")
    if arr.dtype != np.uint8 and (arr.min() < 0 or arr.max() > 255):
        raise RequestError(f"image {i}: values {arr.min()}..{arr.max()} outside 0-255 (uint8 RGB)")
    return arr.astype(np.uint8, copy=False)


def patches(model_input: Any, image_size: int) -> Any:
    """The request's patches as one uint8 NCHW batch at `image_size` (scorer.prepare_patches)."""
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        if model_input.ndim != 4:
            raise RequestError(
                f"array of shape {model_input.shape}; expected (N, H, W, 3) RGB patches"
            )
        cells: list[Any] = list(model_input)
    else:
        cells = [v for c in _cells(model_input) for v in (_texts(c) or [c])]
    if not cells:
        raise RequestError("no patches: send one or more images")
    images = []
    for i, cell in enumerate(cells):
        if isinstance(cell, (str, bytes)):
            images.append(_decoded(i, cell, image_size))
        elif cell is None or (isinstance(cell, float) and np.isnan(cell)):
            raise RequestError(f"image {i}: empty")
        else:
            images.append(_pixels(i, cell))
    return prepare_patches(images, image_size)


def operating_point(
    params: dict[str, Any] | None, thresholds: dict[str, float], default: str
) -> str:
    """The operating point a request asks for (`params.operating_point`), one the run froze."""
    point = str((params or {}).get("operating_point") or default)
    if point not in thresholds:
        raise RequestError(
            f"params.operating_point={point}: the run froze {', '.join(sorted(thresholds))}"
        )
    return point


def calls(probs: np.ndarray, thresholds: dict[str, float], point: str) -> pd.DataFrame:
    """The response: each patch's probability, its call at `point`, the threshold and its name."""
    t = float(thresholds[point])
    return pd.DataFrame(
        {
            "prob_her2_pos": probs,
            "called_her2_pos": metrics.called(probs, t),
            "threshold": np.full(len(probs), t),
            "operating_point": [point] * len(probs),
        }
    )


def encode_png(image: np.ndarray) -> str:
    """An (H, W, 3) uint8 patch as the base64 PNG text a client sends."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def signature(default_point: str) -> dict[str, str]:
    """The model's signature in MLflow's own MLmodel form (ModelSignature.from_dict), so it
    is built and queued without importing MLflow: a string column `image` (base64 PNG/JPEG;
    MLflow passes nested lists through the same column), the four output columns, and the
    `operating_point` parameter."""
    inputs = [{"type": "string", "name": INPUT_COLUMN, "required": True}]
    types = ("double", "long", "double", "string")
    outputs = [
        {"type": t, "name": n, "required": True} for n, t in zip(OUTPUT_COLUMNS, types, strict=True)
    ]
    params = [
        {"name": "operating_point", "type": "string", "default": default_point, "shape": None}
    ]
    return {
        "inputs": json.dumps(inputs),
        "outputs": json.dumps(outputs),
        "params": json.dumps(params),
    }


def input_example(image_size: int) -> pd.DataFrame:
    """Two PNG patches at the model's input size (a gradient and a flat stain-like colour)."""
    ramp = np.linspace(60, 230, image_size).astype(np.uint8)
    grad = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], ramp[::-1, None]), -1)
    flat = np.full((image_size, image_size, 3), (180, 120, 160), dtype=np.uint8)
    return pd.DataFrame({INPUT_COLUMN: [encode_png(grad), encode_png(flat)]})


def model_spec(
    run_dir: Path, image_size: int, default_point: str, metadata: dict[str, Any]
) -> dict[str, Any]:
    """What `tracker.log_model` logs: the code file, the run's best.pt and resolved config as
    artifacts (nothing pickled), the signature, an input example and the metadata."""
    return {
        "python_model": str(MODEL_CODE),
        "artifacts": {
            "checkpoint": str(RunDir(run_dir).best),
            "config": str(RunDir(run_dir).config_resolved),
        },
        "signature": signature(default_point),
        "input_example": input_example(image_size),
        "metadata": metadata,
    }


class ServedRun:
    """A trained run's best.pt as the served model scores with it: the run's `Scorer` (as
    her2exp-eval and her2exp-predict build it) and the tile-level frozen thresholds."""

    def __init__(self, checkpoint: str | Path) -> None:
        source = {"checkpoint": str(checkpoint), "run_id": None, "tracking": {"uri": None}}
        self.run = load_run(OmegaConf.create(source))
        self.scorer = build_scorer(self.run)
        self.thresholds = level_thresholds(self.run, "tile")
        ecfg = self.run.cfg.evaluation
        self.default_point = str(ecfg.get("operating_point", "youden"))
        self.image_size = int(self.run.cfg.data.image_size)
        self.batch_size = int(self.run.cfg.data.get("eval_batch_size") or 64)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Score a request (RequestError for one it cannot score, before any scoring)."""
        point = operating_point(params, self.thresholds, self.default_point)
        x = patches(model_input, self.image_size)
        batches = range(0, len(x), self.batch_size)
        probs = [self.scorer.probabilities(x[i : i + self.batch_size]) for i in batches]
        return calls(np.concatenate(probs), self.thresholds, point)
