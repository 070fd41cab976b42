"""Issue 20, item 3: `her2exp-export` on the session's smoke run (her2exp/export.py).

The exported files are run (onnxruntime on the CPU, torch.jit.load) on the run's own test
patches, rebuilt from its config, and compared with her2exp's scoring path; what the command
logged is read back from the smoke run's real MLflow store (adding artifacts to it is allowed).
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from omegaconf import OmegaConf

from her2exp import engine
from her2exp import export as ex
from her2exp.cli import schemas
from her2exp.cli.common import compose
from her2exp.config import ConfigError
from her2exp.evaluation import load_run


@dataclass
class Exports:
    run: object
    onnx: Path
    torchscript: Path
    stdout: str


@pytest.fixture(scope="module")
def exports(smoke_run, tmp_path_factory) -> Exports:
    """Both formats through the command's main, logged to the smoke run (files outside its
    run directory, so other tests see that folder as training left it)."""
    from her2exp.cli.export import main

    out = tmp_path_factory.mktemp("export")
    paths = {}
    capture = io.StringIO()
    for fmt, name in (("onnx", "her2.onnx"), ("torchscript", "model.ts")):
        argv = [f"run_id={smoke_run.run_id}", f"tracking.uri={smoke_run.uri}", f"format={fmt}"]
        cfg = compose("export", [*argv, f"out={out / name}"])
        stdout, sys.stdout = sys.stdout, capture
        try:
            paths[fmt] = Path(main(cfg))
        finally:
            sys.stdout = stdout
    source = OmegaConf.create({"checkpoint": str(smoke_run.run_dir / "checkpoints/best.pt")})
    run = load_run(OmegaConf.merge(source, {"run_id": None, "tracking": {"uri": None}}))
    return Exports(run, paths["onnx"], paths["torchscript"], capture.getvalue())


def test_both_exports_match_pytorch_on_real_patches_at_any_batch(exports: Exports) -> None:
    run = exports.run
    x = ex.check_patches(run, 7)  # the run's own test patches, preprocessed as in training
    assert x.dtype == torch.uint8 and x.shape == (7, 3, 32, 32)
    model = ex.build_graph(run).model
    ref = ex.reference_probs(run, model, x, "none")
    session = ort.InferenceSession(str(exports.onnx), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("patches", "tensor(uint8)", [3, 32, 32])
    assert isinstance(inp.shape[0], str)  # a symbolic, dynamic batch axis
    ts = torch.jit.load(str(exports.torchscript))
    for n in (1, 7):
        got_onnx = session.run(None, {"patches": x[:n].numpy()})[0]
        with torch.no_grad():
            got_ts = ts(x[:n]).numpy()
        assert got_onnx.shape == got_ts.shape == (n,)
        assert np.abs(got_onnx - ref[:n]).max() <= 1e-4
        assert np.abs(got_ts - ref[:n]).max() <= 1e-4
    assert 0 < ref.min() and ref.max() < 1  # probabilities, not logits
    # The run's contract travels in the file: its frozen thresholds, decision level, input size.
    props = {p.key: p.value for p in onnx.load(str(exports.onnx)).metadata_props}
    meta = json.loads(props["her2exp"])
    assert meta["thresholds"] == pytest.approx(run.thresholds)
    assert (meta["decision_level"], meta["image_size"]) == (run.decision_level, 32)


def test_the_exports_are_logged_to_the_training_run(exports: Exports, smoke_run) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=smoke_run.uri)
    logged = {a.path for a in client.list_artifacts(smoke_run.run_id, "export")}
    # A file written as her2.onnx is logged under the fixed name the contract gives.
    assert {"export/model.onnx", "export/model.ts"} <= logged
    data = client.get_run(smoke_run.run_id).data
    assert data.tags["export.onnx.opset"] == "18"
    assert data.tags["export.onnx.onnx_version"] == onnx.__version__
    assert data.tags["export.onnx.onnxruntime_version"] == ort.__version__
    assert data.tags["export.torchscript.torch_version"] == torch.__version__
    for fmt in ("onnx", "torchscript"):
        assert 0 <= data.metrics[f"export_{fmt}_max_abs_diff"] <= 1e-4
        assert data.tags[f"export.{fmt}.tta"] == "none"
    assert f"logged to MLflow run {smoke_run.run_id}" in exports.stdout


def test_d4_views_and_a_temperature_are_folded_in_as_her2exp_scores(exports: Exports) -> None:
    """The smoke run is neither calibrated nor TTA-scored: the same weights with a frozen
    temperature and d4 views, exported and checked against the scoring path; without the
    folded temperature the check refuses the file."""
    import copy

    x = ex.check_patches(exports.run, 6)
    views = engine.tta_views(x, "d4")
    assert all(torch.equal(a, b) for a, b in zip(views, ex.d4_views(x), strict=True))
    run = copy.copy(exports.run)
    run.state = {**run.state, "calibration": {"method": "temperature", "temperature": 1.7}}
    graph = ex.build_graph(run, "d4")
    meta = ex.file_metadata(run, "onnx", "d4", 32)
    blob = ex.onnx_bytes(graph, x[:2], 18, "legacy", meta)
    ref = ex.reference_probs(run, graph.model, x, "d4")
    assert ex.checked(blob, "onnx", x, ref, run.source) <= 1e-4
    unfolded = ex.ProbabilityGraph(graph.model, run.cfg.data.mean, run.cfg.data.std, "d4")
    with pytest.raises(ex.ExportCheckError, match=r"differs from her2exp's scoring by .*written"):
        ex.checked(ex.torchscript_bytes(unfolded, x[:2], meta), "torchscript", x, ref, "run")


def run_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from her2exp.cli.export import main

    monkeypatch.setattr(sys, "argv", ["her2exp-export", *argv])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(SystemExit) as info:
        main()
    return int(info.value.code), capsys.readouterr().err


def test_refusals_are_one_line(exports: Exports, smoke_run, tmp_path, monkeypatch, capsys) -> None:
    ckpt = smoke_run.run_dir / "checkpoints" / "best.pt"
    store = [f"tracking.uri={smoke_run.uri}"]
    cases = [
        ([f"checkpoint={ckpt}", "format=tflite"], "format='tflite' is not allowed: onnx, "),
        (["run_id=0123456789abcdef", *store], "run_id='0123456789abcdef' not found in"),
        (["format=onnx"], "give exactly one of run_id="),
        ([f"checkpoint={ckpt}", f"out={exports.onnx}"], "exists (an earlier export): overwrite"),
    ]
    for argv, expected in cases:
        code, err = run_main(argv, monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1 and expected in err, (argv, err)
        assert err.startswith("her2exp: ")
    with pytest.raises(ConfigError, match="opset=12 is not allowed"):
        schemas.validate_only("export", [f"checkpoint={ckpt}", "opset=12"])
    assert not any(tmp_path.iterdir())
