"""Issue 20, item 3: `her2exp-export` on the session's smoke run (her2exp/apps/export.py).

The exported files are run (onnxruntime on the CPU, torch.jit.load) on the run's own test
patches, rebuilt from its config, and compared with her2exp's scoring path; what the command
logged is read back from the smoke run's real MLflow store (adding artifacts to it is allowed).
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from omegaconf import OmegaConf

from her2exp import engine
from her2exp.apps import export as ex
from her2exp.cli.common import compose
from her2exp.config import ConfigError
from her2exp.config import commands as schemas
from her2exp.evaluation import load_run


@dataclass
class Exports:
    run: object
    onnx: Path
    torchscript: Path
    stdout: str
    patches: torch.Tensor  # 7 of the run's test patches (ex.check_patches)


@pytest.fixture(scope="module")
def exports(smoke_run, tmp_path_factory) -> Exports:
    """Both formats through the command's main, logged to the smoke run: ONNX named by run id,
    TorchScript by checkpoint (files outside its run directory, so other tests see that
    folder as training left it)."""
    from her2exp.cli.export import main

    out = tmp_path_factory.mktemp("export")
    paths = {}
    capture = io.StringIO()
    ckpt = smoke_run.run_dir / "checkpoints" / "best.pt"
    sources = {
        "onnx": [f"run_id={smoke_run.run_id}", f"tracking.uri={smoke_run.uri}"],
        "torchscript": [f"checkpoint={ckpt}"],  # logged to the run its mlflow_run.json names
    }
    for fmt, name in (("onnx", "her2.onnx"), ("torchscript", "model.ts")):
        cfg = compose("export", [*sources[fmt], f"format={fmt}", f"out={out / name}"])
        stdout, sys.stdout = sys.stdout, capture
        try:
            paths[fmt] = Path(main(cfg))
        finally:
            sys.stdout = stdout
    source = OmegaConf.create({"checkpoint": str(smoke_run.run_dir / "checkpoints/best.pt")})
    run = load_run(OmegaConf.merge(source, {"run_id": None, "tracking": {"uri": None}}))
    x = ex.check_patches(run, 7)
    return Exports(run, paths["onnx"], paths["torchscript"], capture.getvalue(), x)


def test_both_exports_match_pytorch_on_real_patches_at_any_batch(exports: Exports) -> None:
    run = exports.run
    x = exports.patches  # the run's own test patches, preprocessed as in training
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
    assert exports.stdout.count(f"logged to MLflow run {smoke_run.run_id}") == 2


def test_d4_views_and_a_temperature_are_folded_in_as_her2exp_scores(exports: Exports) -> None:
    """The smoke run is neither calibrated nor TTA-scored: the same weights with a frozen
    temperature and d4 views, exported and checked against the scoring path; without the
    folded temperature the check refuses the file."""
    import copy

    x = exports.patches[:6]
    views = engine.tta_views(x, "d4")
    assert all(torch.equal(a, b) for a, b in zip(views, ex.d4_views(x), strict=True))
    run = copy.copy(exports.run)
    run.state = {**run.state, "calibration": {"method": "temperature", "temperature": 1.7}}
    graph = ex.build_graph(run, "d4")
    meta = ex.file_metadata(run, "onnx", "d4", 32)
    blob = ex.onnx_bytes(graph, x[:2], 18, "legacy", meta)
    ref = ex.reference_probs(run, graph.model, x, "d4")
    assert ex.checked(blob, "onnx", x, ref, run.source) <= 1e-4
    # Against the uncalibrated scores (the temperature not applied) the same file is refused.
    uncalibrated = ex.reference_probs(exports.run, graph.model, x, "d4")
    with pytest.raises(ex.ExportCheckError, match=r"differs from her2exp's scoring by .*written"):
        ex.checked(blob, "onnx", x, uncalibrated, run.source)


def test_refusals_are_one_line(exports: Exports, smoke_run) -> None:
    """The command's own checks (its validate-only entry) and the library's, each one line."""
    ckpt = smoke_run.run_dir / "checkpoints" / "best.pt"
    base = schemas.validate_only("export", [f"checkpoint={ckpt}"])  # composed once
    cases = [
        ({"format": "tflite"}, "format='tflite' is not allowed (onnx, torchscript)"),
        ({"checkpoint": None}, "give exactly one of run_id="),
        ({"out": str(exports.onnx)}, "exists (an earlier her2exp onnx export): overwrite=true"),
        ({"opset": 12}, "opset=12 is not allowed"),
    ]
    for change, expected in cases:
        cfg = base.copy()
        for key, value in change.items():
            OmegaConf.update(cfg, key, value)
        with pytest.raises(ConfigError) as info:
            schemas.check_export(cfg)
        assert expected in str(info.value) and "\n" not in str(info.value)
    # A run the store does not hold: the library's refusal, one line (cli/common.py prints it).
    cfg = compose("export", ["run_id=0123abc", f"tracking.uri={smoke_run.uri}"])
    with pytest.raises(ConfigError, match="run_id='0123abc' not found in sqlite:"):
        ex.export_run(cfg)


def test_overwrite_replaces_only_an_earlier_export_never_a_file_of_the_users(
    exports: Exports, smoke_run, tmp_path: Path
) -> None:
    """Issue 31, item 8d: an existing out= is called an earlier export only when it is one (its
    her2exp metadata inside: either format, whatever its name); any other file, a zip
    included, is refused with overwrite=true too and left as it was."""
    ckpt = smoke_run.run_dir / "checkpoints" / "best.pt"
    base = schemas.validate_only("export", [f"checkpoint={ckpt}"])

    def check(out: Path, overwrite: bool, fmt: str = "onnx") -> str:
        cfg = base.copy()
        OmegaConf.update(cfg, "out", str(out))
        OmegaConf.update(cfg, "overwrite", overwrite)
        OmegaConf.update(cfg, "format", fmt)
        try:
            schemas.check_export(cfg)
        except ConfigError as exc:
            assert "\n" not in str(exc)
            return str(exc)
        return ""

    notes = tmp_path / "notes.onnx"
    notes.write_text("my notes, not a model\n")
    archive = tmp_path / "model.ts"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("archive/data.pkl", b"not an export of ours")
    foreign = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    other = tmp_path / "other.onnx"
    other.write_bytes(foreign.SerializeToString())
    for path in (notes, archive, other):
        before = path.read_bytes()
        for overwrite in (False, True):
            assert check(path, overwrite, "torchscript" if path == archive else "onnx") == (
                f"out={path} exists and is not a her2exp export (no her2exp metadata in it); "
                "overwrite=true replaces only an earlier export: give another out="
            )
        assert path.read_bytes() == before
    assert check(exports.torchscript, False, "torchscript") == (
        f"out={exports.torchscript} exists (an earlier her2exp torchscript export): "
        "overwrite=true to replace it, or another out="
    )
    assert check(exports.torchscript, True, "torchscript") == ""
    assert check(exports.onnx, True) == ""
    # The library's check (it checks the default out= under the run directory) is the same.
    cfg = compose("export", [f"checkpoint={ckpt}", f"out={notes}", "overwrite=true"])
    with pytest.raises(ConfigError, match=r"is not a her2exp export"):
        ex.export_run(cfg)
    assert notes.read_text() == "my notes, not a model\n"


def test_the_export_bench_times_the_same_graph_in_both_runtimes(exports: Exports) -> None:
    """Speed is `make bench`'s; here: the figures are what was measured, on agreeing outputs."""
    from her2exp.bench import export as bench

    graph = ex.build_graph(exports.run)
    r = bench.rate(graph, 32, 2, rounds=1, min_seconds=0.01, threads=1)
    assert (r.size, r.batch, r.threads) == (32, 2, 1)
    assert r.max_abs_diff <= 1e-5 and r.torch_per_second > 0 and r.onnxruntime_per_second > 0
    assert r.ratio == pytest.approx(r.onnxruntime_per_second / r.torch_per_second)
    assert f"ratio {r.ratio:.3f}" in bench.format_line(r)


def test_the_serve_bench_request_bodies_carry_the_patches(exports: Exports) -> None:
    import base64

    from PIL import Image

    from her2exp.bench import serve

    patches = exports.patches.permute(0, 2, 3, 1).numpy()[:3]  # (N, H, W, 3) as a client has
    rows = serve.png_body(patches)["dataframe_split"]["data"]
    decoded = [np.asarray(Image.open(io.BytesIO(base64.b64decode(r[0])))) for r in rows]
    assert np.array_equal(np.stack(decoded), patches)
    mean, std = list(exports.run.cfg.data.mean), list(exports.run.cfg.data.std)
    tensor = np.asarray(serve.tensor_body(patches, mean, std)["inputs"], dtype=np.float32)
    expected = engine.Preprocess(torch.device("cpu"), tuple(mean), tuple(std))(
        torch.from_numpy(patches).permute(0, 3, 1, 2)
    )
    assert np.allclose(tensor, expected.numpy(), atol=1e-5)


def test_a_macenko_run_is_checked_on_normalised_patches_and_warned_about(
    exports: Exports,
) -> None:
    """The graph leaves stain out: its check inputs are the run's patches normalised to its
    fitted reference (the smoke run's weights, a reference fitted here on its test patches)."""
    import copy

    from conftest import compose_train
    from her2exp.stain import pipeline

    assert ex.stain_note(exports.run) is None
    run = copy.copy(exports.run)
    run.cfg = OmegaConf.merge(run.cfg, {"stain": compose_train(["stain=macenko"]).stain})
    normalizer = pipeline._normalizer(run.cfg.stain).fit(exports.patches)
    run.state = {**run.state, "stain": {"normalizer": normalizer.state_dict()}}
    raw = ex.check_patches(run, 7)
    x = ex.client_input(run, raw)
    expected, _ = normalizer.normalize(exports.patches)
    assert torch.equal(x, expected) and not torch.equal(x, exports.patches)
    # The reference (the Scorer, which normalises raw patches itself) is what the graph gives
    # a client's normalised patches.
    graph = ex.build_graph(run)
    with torch.no_grad():
        by_graph = graph(x).numpy()
    np.testing.assert_allclose(ex.reference_probs(run, graph.model, raw, None), by_graph, atol=1e-5)
    assert "normalised stain (macenko)" in ex.stain_note(run)
