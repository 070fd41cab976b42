"""A trained run as one portable graph (the library part of `her2exp-export`, cli/export.py).

The graph takes what a client holds after resizing and stain normalisation: uint8 RGB patches,
NCHW, at the run's `data.image_size`, any batch size; it returns P(HER2+) per patch, the score
the run's frozen thresholds apply to. Folded in: the run's mean/std, its `evaluation.tta` views
(d4: the mean probability over the 8 symmetries of the square, as `engine.tta_views` scores them)
and its frozen temperature (`sigmoid(logit(p) / T)`, as `metrics.apply_calibration`). Left out:
the resize (a client's patches come at any size) and Macenko stain normalisation (an
eigen-decomposition per patch, which ONNX has no operator for): the exporter warns when the run
normalised stain, and a client must apply the run's reference first.

Before a file is written or logged, it is loaded back from the exact bytes to be written and run
(onnxruntime on the CPU, or torch.jit.load) on the run's own test patches, rebuilt from its
config; it is refused when the largest difference from her2exp's own `evaluation.Scorer` (the
one every command scores with; here in fp32 on the CPU, the graph's own precision) exceeds
`MAX_ABS_DIFF`. The run's thresholds, decision level and
preprocessing contract travel inside the file (ONNX metadata_props / TorchScript extra file
`her2exp.json`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from her2exp.config import ConfigError
from her2exp.config.export import FORMATS, METADATA_KEY, check_out  # the checks without torch
from her2exp.config.export import ONNX_EXPORTERS as ONNX_EXPORTERS
from her2exp.core import progress
from her2exp.engine import Preprocess
from her2exp.evaluation import (
    TrainedRun,
    build_scorer,
    by_model_uri,
    load_model,
    load_run,
    rebuild_run_data,
    run_stain,
)
from her2exp.runtime.rundir import RunDir

log = logging.getLogger("her2exp")

#: The largest difference from her2exp's own scoring allowed of an exported graph (issue 20).
MAX_ABS_DIFF = 1e-4
INPUT_NAME, OUTPUT_NAME = "patches", "prob_her2_pos"
ARTIFACT_PATH = "export"


class ExportCheckError(RuntimeError):
    """The exported graph disagrees with her2exp's scoring: nothing was written or logged."""


def d4_views(x: torch.Tensor) -> list[torch.Tensor]:
    """`engine.tta_views(x, "d4")` in its order, with rot90 spelled as flips and transposes
    (the exporters translate those; the TorchScript-based ONNX exporter has no aten::rot90)."""
    turned = [
        x,
        x.flip(-1).transpose(-2, -1),  # rot90 k=1 over (H, W)
        x.flip(-2).flip(-1),  # k=2
        x.flip(-2).transpose(-2, -1),  # k=3
    ]
    return [v for t in turned for v in (t, t.flip(-1))]


class ProbabilityGraph(nn.Module):
    """uint8 NCHW patches -> P(HER2+): mean/std, the TTA views (one batched forward) and the
    temperature, folded around the run's network."""

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        tta: str = "none",
        temperature: float | None = None,
    ) -> None:
        super().__init__()
        if tta not in ("none", "d4"):
            raise ValueError(f"tta={tta!r}: none or d4")
        self.model = model.eval()
        self.tta = tta
        self.temperature = temperature
        # The constants engine.Preprocess builds, so the graph normalises as training did.
        pre = Preprocess(torch.device("cpu"), tuple(mean), tuple(std))
        self.register_buffer("mean255", pre._mean255.clone())
        self.register_buffer("std255", pre._std255.clone())

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = (patches.float() - self.mean255) / self.std255
        views = d4_views(x) if self.tta == "d4" else [x]
        logits = self.model(torch.cat(views, 0) if len(views) > 1 else x)
        p = torch.softmax(logits.float(), dim=1)[:, 1].reshape(len(views), -1).mean(0)
        if self.temperature is not None:
            p = torch.sigmoid((torch.log(p) - torch.log(1.0 - p)) / self.temperature)
        return p


@dataclass
class Exported:
    """What `export_run` made: the file, the check and what was logged where."""

    path: Path
    fmt: str
    max_abs_diff: float
    n_checked: int
    tags: dict[str, str]
    logged_to: tuple[str, str] | None = None  # (run id, tracking uri)
    warnings: list[str] = field(default_factory=list)


def temperature_of(run: TrainedRun) -> float | None:
    """The run's frozen temperature, None when it was not calibrated."""
    cal = run.calibration
    return float(cal["temperature"]) if cal.get("method") == "temperature" else None


def stain_note(run: TrainedRun) -> str | None:
    """The warning for a run that normalised stain: its graph does not, a client must."""
    stain = str(OmegaConf.select(run.cfg, "stain.name", default="none") or "none")
    if stain not in ("macenko", "macenko_jitter"):
        return None
    return (
        f"{run.source} normalised stain ({stain}): the exported graph does not (Macenko has "
        "no ONNX operator); normalise each patch to the run's reference before it"
    )


def build_graph(run: TrainedRun, tta: str | None = None) -> ProbabilityGraph:
    """The run's network on the CPU inside its ProbabilityGraph (`tta` null: the run's own)."""
    model = load_model(run, torch.device("cpu"))
    cfg = run.cfg
    return ProbabilityGraph(
        model, tuple(cfg.data.mean), tuple(cfg.data.std), tta or run.tta, temperature_of(run)
    ).eval()


def check_patches(run: TrainedRun, n: int) -> torch.Tensor:
    """Up to `n` of the run's test patches (uint8 NCHW, as read), its data rebuilt from its
    config and seed as her2exp-eval split=test rebuilds it."""
    why = f"{run.source}: the run's data cannot be rebuilt to check the export against"
    bundle = rebuild_run_data(run, why)
    split = "test" if len(bundle.indices("test")) else "val"
    view = bundle.view(split)
    x = torch.from_numpy(np.ascontiguousarray(view[: min(n, len(view))]))
    return x.permute(0, 3, 1, 2).contiguous()


def client_input(run: TrainedRun, x: torch.Tensor) -> torch.Tensor:
    """What a client feeds the graph: the patches normalised with the run's fitted stain
    reference (left out of the graph), as they are without normalisation."""
    stain = run_stain(run, int(run.cfg.seed))
    return x if stain is None else stain(x, False)


def reference_probs(
    run: TrainedRun, model: nn.Module, x: torch.Tensor, tta: str | None
) -> np.ndarray:
    """P(HER2+) of uint8 patches `x` (as read) by the run's `evaluation.Scorer` around the
    graph's own network, on the CPU in fp32: the graph computes in fp32, so a bf16 run is
    checked at the precision the file has, not refused for bf16's rounding."""
    scorer = build_scorer(run, "off", int(run.cfg.seed), tta, torch.device("cpu"), model)
    return scorer.probabilities(x)


def file_metadata(run: TrainedRun, fmt: str, tta: str, image_size: int) -> dict[str, Any]:
    """The contract a client of the file needs, carried inside it."""
    cfg = run.cfg
    return {
        "format": fmt,
        "source": run.source,
        "source_run_id": run.source_run,
        "model": str(cfg.model.name),
        "input": f"{INPUT_NAME}: uint8 RGB (N, 3, {image_size}, {image_size})",
        "output": f"{OUTPUT_NAME}: float32 (N,), P(HER2+)",
        "image_size": image_size,
        "stain": str(OmegaConf.select(cfg, "stain.name", default="none") or "none"),
        "folded": {
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
            "tta": tta,
            "calibration": run.calibration,
        },
        "decision_level": run.decision_level,
        "thresholds": run.thresholds,
        "thresholds_by_level": run.levels,
        "operating_point": str(
            OmegaConf.select(cfg, "evaluation.operating_point", default="youden")
        ),
    }


def quiet(fn: Any) -> Any:
    """`fn` with its progress prints and onnxscript's optimizer log lines (dozens of lines per
    export on the command's stdout) held back; warnings and errors still show."""

    def call(*args: Any, **kwargs: Any) -> Any:
        loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]
        levels = [lg.level for lg in loggers]
        try:
            for lg in loggers:
                lg.setLevel(logging.WARNING)
            with contextlib.redirect_stdout(io.StringIO()):
                return fn(*args, **kwargs)
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)

    return call


def onnx_bytes(
    graph: nn.Module, sample: torch.Tensor, opset: int, exporter: str, meta: dict[str, Any]
) -> bytes:
    """The graph as ONNX (dynamic batch axis), its metadata in metadata_props."""
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter warns that it is deprecated; it is chosen here because
        # it is 5x faster than the dynamo one on this CPU and needs no onnxscript import.
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            quiet(torch.onnx.export)(
                graph,
                (sample,),
                buf,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
        else:
            torch.onnx.export(
                graph,
                (sample,),
                buf,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
    proto = onnx.load_from_string(buf.getvalue())
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta)})
    return proto.SerializeToString()


def torchscript_bytes(graph: nn.Module, sample: torch.Tensor, meta: dict[str, Any]) -> bytes:
    """The graph traced (convolutional: no data-dependent control flow), metadata as an extra
    file. torch.jit is deprecated in favour of torch.export, but it is what a C++/Java
    libtorch client loads today."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        traced = torch.jit.trace(graph, (sample,), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})
    return buf.getvalue()


def loaded(blob: bytes, fmt: str) -> Any:
    """The exported bytes as a callable on uint8 NCHW tensors returning P(HER2+) (numpy):
    onnxruntime's CPU provider, or the TorchScript module loaded back."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        module = torch.jit.load(io.BytesIO(blob), map_location="cpu")

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return module(x).numpy()

    return run


def compare(blob: bytes, fmt: str, x: torch.Tensor, reference: np.ndarray) -> float:
    """The largest |exported - reference| over `x` in one batch and its first patch alone (the
    batch axis really is dynamic); NaN anywhere counts as infinitely far."""
    run = loaded(blob, fmt)
    worst = 0.0
    for n in (len(x), 1):
        out = np.asarray(run(x[:n]), dtype=np.float64).reshape(-1)
        if out.shape != reference[:n].shape or not np.isfinite(out).all():
            return float("inf")
        worst = max(worst, float(np.abs(out - reference[:n]).max()))
    return worst


def checked(blob: bytes, fmt: str, x: torch.Tensor, reference: np.ndarray, source: str) -> float:
    """`compare`, refused (ExportCheckError) beyond MAX_ABS_DIFF: such a file is never written."""
    diff = compare(blob, fmt, x, reference)
    if not diff <= MAX_ABS_DIFF:
        raise ExportCheckError(
            f"the {fmt} export of {source} differs from her2exp's scoring by {diff:.3g} "
            f"(allowed {MAX_ABS_DIFF:g}) on {len(x)} test patches: nothing written or logged"
        )
    return diff


def versions(fmt: str, opset: int | None, exporter: str | None) -> dict[str, str]:
    """The tags `export.<format>.*` (opset and library versions) logged with the file."""
    tags = {"torch_version": torch.__version__}
    if fmt == "onnx":
        import onnx
        import onnxruntime

        tags.update(
            opset=str(opset),
            onnx_version=onnx.__version__,
            onnxruntime_version=onnxruntime.__version__,
            exporter=str(exporter),
        )
    return {f"export.{fmt}.{k}": v for k, v in tags.items()}


def default_out(opts: Any, run: TrainedRun, fmt: str) -> Path:
    """`out`, else <run dir>/export/<FORMATS name>: the run directory holding `checkpoint=`
    (checkpoints/best.pt), or the one the run's config names when it is on this machine."""
    if opts.out:
        return Path(opts.out)
    if opts.checkpoint:
        run_dir = RunDir.of_checkpoint(opts.checkpoint).root
    else:
        run_dir = Path(str(OmegaConf.select(run.cfg, "output_dir", default="") or ""))
        if not str(run_dir) or not run_dir.is_dir():
            raise ConfigError(
                f"{run.source}: its run directory {str(run_dir) or '(none)'} is not on this "
                f"machine: give out=<file> for the {fmt} export"
            )
    return run_dir / ARTIFACT_PATH / FORMATS[fmt]


def log_target(opts: Any, out: Path) -> tuple[str, str] | None:
    """(run id, tracking URI) the export is logged to: `run_id` in `tracking.uri`, or the run a
    `checkpoint=`'s run directory recorded (mlflow_run.json); None: not logged."""
    from her2exp.tracking import read_run_file

    if not opts.log:
        return None
    if opts.run_id:
        return str(opts.run_id), str(opts.tracking.uri)
    ckpt = Path(opts.checkpoint).resolve()
    recorded = read_run_file(RunDir.of_checkpoint(ckpt).root) or read_run_file(ckpt.parent)
    if recorded is None:
        return None
    return recorded["run_id"], recorded["tracking_uri"]


def log_export(
    target: tuple[str, str], path: Path, fmt: str, tags: dict[str, str], diff: float
) -> None:
    """The file as artifact export/<FORMATS name>, its tags and `export_<format>_max_abs_diff`,
    added to the training run (a finished run takes new entries through the client:
    `tracking.add_to_run`)."""
    import shutil
    import tempfile

    from her2exp.tracking import add_to_run

    run_id, uri = target
    with tempfile.TemporaryDirectory(prefix="her2exp-export-") as tmp:
        local = path
        if path.name != FORMATS[fmt]:  # the artifact keeps its fixed name
            local = Path(tmp) / FORMATS[fmt]
            shutil.copyfile(path, local)
        add_to_run(uri, run_id, local, ARTIFACT_PATH, {f"export_{fmt}_max_abs_diff": diff}, tags)


def export_checked(
    run: TrainedRun, graph: ProbabilityGraph, opts: DictConfig, tta: str
) -> tuple[bytes, float, int]:
    """The graph's bytes, their largest difference from her2exp's scoring (refused beyond
    MAX_ABS_DIFF) and the number of test patches checked. One progress bar over its three
    stages (the reference scores, the export, the check): for a large backbone each runs for
    minutes on the CPU in fp32, and one batch each leaves no finer step to count."""
    fmt = str(opts.format)
    with progress.bar(total=3, desc=f"export check ({fmt})", unit="stage") as stages:
        stages.set_postfix_str("reference scores", refresh=False)
        raw = check_patches(run, int(opts.check_patches))
        ref = reference_probs(run, graph.model, raw, opts.tta)  # warns of a tta not the run's
        x = client_input(run, raw)
        meta = file_metadata(run, fmt, tta, int(run.cfg.data.image_size))
        stages.update()
        stages.set_postfix_str("export", refresh=False)
        sample = x[: min(2, len(x))]
        if fmt == "onnx":
            blob = onnx_bytes(graph, sample, int(opts.opset), str(opts.onnx_exporter), meta)
        else:
            blob = torchscript_bytes(graph, sample, meta)
        stages.update()
        stages.set_postfix_str("check", refresh=False)
        diff = checked(blob, fmt, x, ref, run.source)
        stages.update()
    return blob, diff, len(x)


def export_run(opts: DictConfig) -> Exported:
    """`her2exp-export`: load the run, fold its scoring into a graph, check the bytes against
    her2exp's scoring on its test patches, then write them atomically and log them."""
    from her2exp.core.fileio import atomic_write
    from her2exp.tracking import require_store

    fmt = str(opts.format)
    if opts.run_id or opts.model_uri:
        require_store(opts.tracking.uri, lookup=True)  # a look-up never creates a store
    opts = by_model_uri(opts)  # the registry's alias or version -> its run (logged to it)
    run = load_run(opts)
    out = default_out(opts, run, fmt)
    check_out(out, fmt, bool(opts.overwrite))  # the default under the run directory too
    tta = opts.tta or run.tta
    notes = [note] if (note := stain_note(run)) else []
    for line in notes:
        log.warning(line)
    graph = build_graph(run, tta)
    blob, diff, checked_patches = export_checked(run, graph, opts, tta)
    atomic_write(out, blob)
    opset = int(opts.opset) if fmt == "onnx" else None
    tags = versions(fmt, opset, str(opts.onnx_exporter) if fmt == "onnx" else None)
    tags[f"export.{fmt}.tta"] = tta
    tags[f"export.{fmt}.temperature"] = str(temperature_of(run) or "none")
    tags[f"export.{fmt}.checked_patches"] = str(checked_patches)
    target = log_target(opts, out)
    if target is not None:
        log_export(target, out, fmt, tags, diff)
    return Exported(out, fmt, diff, checked_patches, tags, target, notes)
