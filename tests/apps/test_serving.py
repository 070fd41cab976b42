"""The run's logged MLflow model behind a real `mlflow models serve` (127.0.0.1): raw patches in,
the answers of her2exp-predict out; a client's mistakes are HTTP 400 with the reason."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import BIN, SmokeRun
from her2exp.apps.predict import predict_folder
from her2exp.cli.common import compose
from her2exp.core import checkpoint
from her2exp.data import synthetic

SERVER_START_S = 240  # two processes each import MLflow, torch and timm on 2 shared cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """The server and the uvicorn worker it started: its own process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(smoke_run: SmokeRun, tmp_path_factory: pytest.TempPathFactory):
    """`mlflow models serve` of the smoke run's model, as the README tells a user to start it."""
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    port = _free_port()
    # the venv's bin first, as in an activated environment: the server execs its `uvicorn`
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": smoke_run.uri, "PATH": path}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", f"runs:/{smoke_run.run_id}/model",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow models serve did not answer:\n{log_path.read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        _stop(proc)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + "/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _table(answer: dict) -> pd.DataFrame:
    return pd.DataFrame(answer["predictions"])


@pytest.fixture(scope="module")
def patches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic H&E-like PNG patches: five at 32 px (the model's size), one at 40 px (resized)."""
    data = synthetic.generate(n_patients=2, patches_per_patient=3, image_size=32, seed=11)
    folder = tmp_path_factory.mktemp("served_patches")
    for i, img in enumerate(data.images[:5]):
        Image.fromarray(img).save(folder / f"p{i}.png")
    big = synthetic.generate(n_patients=2, patches_per_patient=1, image_size=40, seed=12)
    Image.fromarray(big.images[0]).save(folder / "p5_40px.png")
    return folder


@pytest.fixture(scope="module")
def predicted(smoke_run: SmokeRun, patches: Path) -> pd.DataFrame:
    """her2exp-predict's library part on the same files, the run named as a client names it."""
    opts = compose("predict", [f"run_id={smoke_run.run_id}", f"tracking.uri={smoke_run.uri}",
                               f"input={patches}"])  # fmt: skip
    return predict_folder(opts).tiles


def test_png_patches_get_the_answers_of_her2exp_predict(
    server: str, smoke_run: SmokeRun, patches: Path, predicted: pd.DataFrame
) -> None:
    files = [Path(p) for p in predicted["path"]]
    images = [base64.b64encode(f.read_bytes()).decode() for f in files]
    status, answer = _post(server, {"dataframe_split": {"columns": ["image"],
                                                        "data": [[s] for s in images]}})  # fmt: skip
    assert status == 200, answer
    got = _table(answer)
    assert list(got.columns) == ["prob_her2_pos", "called_her2_pos", "threshold", "operating_point"]
    np.testing.assert_allclose(got["prob_her2_pos"], predicted["prob_her2_pos"], rtol=1e-6)
    state = checkpoint.load(smoke_run.run_dir / "checkpoints" / "best.pt")
    point = OmegaConf.create(state["config"]).evaluation.operating_point
    assert (got["operating_point"] == point).all()
    assert got["threshold"].eq(state["thresholds"]["tile"][point]).all()
    assert np.array_equal(got["called_her2_pos"], predicted[f"called_her2_pos_{point}"])
    # another frozen point by a parameter: its own threshold and calls
    status, answer = _post(server, {"inputs": {"image": images},
                                    "params": {"operating_point": "sens90"}})  # fmt: skip
    assert status == 200, answer
    other = _table(answer)
    assert (other["operating_point"] == "sens90").all()
    assert other["threshold"].eq(state["thresholds"]["tile"]["sens90"]).all()
    assert np.array_equal(other["called_her2_pos"], predicted["called_her2_pos_sens90"])


def test_uint8_lists_get_the_same_answers(
    server: str, patches: Path, predicted: pd.DataFrame
) -> None:
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in predicted["path"]]
    same_size = [a.tolist() for a in arrays if a.shape == (32, 32, 3)]
    status, answer = _post(server, {"inputs": same_size})  # (N, H, W, 3) nested lists
    assert status == 200, answer
    expected = predicted["prob_her2_pos"].to_numpy()
    np.testing.assert_allclose(_table(answer)["prob_her2_pos"], expected[:5], rtol=1e-6)
    # any size is resized as predict resizes it
    status, answer = _post(server, {"dataframe_records": [{"image": arrays[5].tolist()}]})
    assert status == 200, answer
    np.testing.assert_allclose(_table(answer)["prob_her2_pos"], expected[5:], rtol=1e-6)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"inputs": np.zeros((1, 8, 8, 2), dtype=int).tolist()}, "shape (8, 8, 2)"),
        ({"inputs": [[[1, 2, 3], [4, 5, 6]]]}, "shape (2, 3); expected (H, W, 3)"),
        ({"inputs": np.full((1, 4, 4, 3), 0.5).tolist()}, "'0.5' is not an integer in 0-255"),
        ({"inputs": np.full((1, 4, 4, 3), 300).tolist()}, "values 300..300 outside 0-255"),
        ({"inputs": {"image": [base64.b64encode(b"hello").decode()]}}, "not a PNG, JPEG"),
        ({"inputs": {"image": ["not base64 !"]}}, "image 0: not base64"),
        ({"inputs": []}, "no patches"),
        ({"inputs": {"image": ["aGk="]}, "params": {"operating_point": "f1"}}, "froze p50"),
    ],
    ids=["rgb_channels", "not_hw3", "floats", "over_255", "not_an_image", "not_base64",
         "empty", "unknown_point"],
)  # fmt: skip
def test_bad_requests_are_400_naming_the_problem(server: str, body: dict, problem: str) -> None:
    status, answer = _post(server, body)
    assert status == 400, answer
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "her2exp: " in answer["message"] and problem in answer["message"], answer["message"]


def test_logged_model_has_a_signature_an_example_and_no_pickle(
    smoke_run: SmokeRun, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.models import Model

    uri = f"runs:/{smoke_run.run_id}/model"
    mlflow.set_tracking_uri(smoke_run.uri)
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    info = Model.load(str(local))
    flavor = info.flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # from code: no pickle
    assert sorted(p.name for p in (local / "artifacts").iterdir()) == [
        "best.pt",
        "config_resolved.yaml",
    ]
    assert not list(local.rglob("*.pkl"))
    sig = info.signature
    assert sig.inputs.input_names() == ["image"]
    assert sig.outputs.input_names() == ["prob_her2_pos", "called_her2_pos", "threshold",
                                         "operating_point"]  # fmt: skip
    assert sig.params.params[0].name == "operating_point"
    example = info.load_input_example(str(local))
    assert len(example["image"]) == 2 and isinstance(example["image"][0], str)
    assert "pickle" not in smoke_run.stderr.lower()


def test_request_forms_give_one_batch_and_bad_cells_are_named() -> None:
    """In process (no server): what MLflow hands the model, or a caller passes, becomes the
    uint8 NCHW batch predict scores; base64 PNG and pixels of the same patch agree."""
    from her2exp.evaluation import served as serving

    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    png = [serving.encode_png(x) for x in a]
    want = serving.patches(a, 32)
    assert want.dtype == torch.uint8 and tuple(want.shape) == (2, 3, 32, 32)
    for form in (
        {"image": a},
        {"image": png},  # in process MLflow makes this one row holding the list
        pd.DataFrame({"image": png}),
        pd.DataFrame({"image": [x.tolist() for x in a]}),
        pd.DataFrame({"image": [x.astype(str) for x in a]}),  # numbers as text, as MLflow parses
    ):
        assert torch.equal(serving.patches(form, 32), want)
    bad = {
        "rows of unequal length": pd.DataFrame({"image": [[[[1, 2, 3]], [[1, 2]]]]}),
        "value '-1' is not an integer": pd.DataFrame({"image": [np.full((2, 2, 3), "-1")]}),
        "bool values": pd.DataFrame({"image": [np.ones((2, 2, 3), dtype=bool)]}),
        "image 1: empty": pd.DataFrame({"image": [png[0], None]}),
        "no column 'image'": pd.DataFrame({"pixels": png}),
        "expected (N, H, W, 3)": a[0],
    }
    for problem, form in bad.items():
        with pytest.raises(serving.RequestError, match=re.escape(problem)):
            serving.patches(form, 32)
