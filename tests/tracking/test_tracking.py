"""Audit trail and sweeps against real MLflow: a local `mlflow server` over HTTP, SQLite stores,
grid and Optuna sweeps through the CLI, compare, rerun, and an unreachable server."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import BIN, REPO, SmokeRun, mlflow_store, run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    mlflow_store(root / "server.db")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/server.db",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=root,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not come up within 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def http_run(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory):
    import mlflow

    cwd = tmp_path_factory.mktemp("http")
    proc = run_cli(["experiment=smoke", f"tracking.uri={mlflow_server}",
                    "tracking.log_model=true", f"hydra.run.dir={cwd / 'run'}"], cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = next(ln.split()[3] for ln in proc.stdout.splitlines()
                  if ln.startswith("her2exp: MLflow run "))  # fmt: skip
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    return client, client.get_run(run_id), cwd


def test_http_run_holds_the_audit_trail(http_run) -> None:
    client, run, _ = http_run
    tags, rid = run.data.tags, run.info.run_id
    assert run.info.status == "FINISHED"
    for key in ("git_commit", "git_branch", "git_dirty", "command", "overrides", "hostname",
                "world_size", "backend", "device_name", "cuda_device_count", "cudnn_deterministic",
                "data_fingerprint", "seed"):  # fmt: skip
        assert key in tags, key
    assert tags["command"].startswith("her2exp-train experiment=smoke")
    assert run.data.params["model.name"] == "test_resnet"
    assert "best_val_auc" in run.data.metrics and "test_auc_low" in run.data.metrics
    freeze = client.download_artifacts(rid, "audit/pip_freeze.txt")
    assert any(line.startswith("torch==") for line in Path(freeze).read_text().splitlines())
    if tags["git_dirty"] == "true":
        assert Path(client.download_artifacts(rid, "audit/git_diff.patch")).stat().st_size > 0
    top = {a.path for a in client.list_artifacts(rid)}
    assert {"audit", "checkpoints", "config_resolved.yaml", "hydra", "reports"} <= top


def test_http_run_logs_the_dataset_input_with_split_counts(http_run) -> None:
    _, run, _ = http_run
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == run.data.tags["data_fingerprint"]
    tags = {t.key: t.value for t in inp.tags}
    assert tags["mlflow.data.context"] == "training"
    total = sum(int(v) for k, v in tags.items() if k.endswith(("her2_pos", "her2_neg")))
    assert total == 24 * 12  # experiment=smoke: 24 patients x 12 patches


def test_logged_mlflow_model_scores_a_batch(http_run, mlflow_server: str) -> None:
    import mlflow

    _, run, _ = http_run
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    meta = model.metadata.metadata
    assert meta["class_names"] == ["HER2-", "HER2+"] and set(meta["thresholds"]) >= {"youden"}
    assert meta["decision_level"] == "tile" and set(meta["thresholds_by_level"]) == {
        "tile",
        "slide",
        "patient",
    }
    assert meta["thresholds"] == meta["thresholds_by_level"]["tile"]
    assert (
        meta["calibration"] == {"method": "none"} and meta["tta"] == "none"
    )  # what a server applies
    # raw RGB patches in (any size: resized to the model's 32 px), the frozen tile-level calls out
    patches = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    got = model.predict({"image": patches})
    assert list(got.columns) == ["prob_her2_pos", "called_her2_pos", "threshold", "operating_point"]
    assert len(got) == 3 and got["prob_her2_pos"].between(0, 1).all()
    t = meta["thresholds_by_level"]["tile"][meta["operating_point"]]
    assert (
        got["threshold"].eq(t).all() and (got["operating_point"] == meta["operating_point"]).all()
    )
    assert np.array_equal(got["called_her2_pos"], (got["prob_her2_pos"] >= t).astype(int))


def test_unreachable_tracking_server_fails_before_training(tmp_path: Path, monkeypatch, capsys):
    """her2exp-train's main() in this process, as its console script calls it (sys.argv, the
    cwd): an interpreter start would cost seconds; test_cli's real scripts prove a refused
    her2exp-train exits 2 with one line as a process."""
    from her2exp.cli.train import main

    port = _free_port()  # nothing listens there
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["her2exp-train", "experiment=smoke",
                        f"tracking.uri=http://127.0.0.1:{port}", f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert f"tracking.uri=http://127.0.0.1:{port} cannot be reached" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_grid_sweep_is_a_parent_with_children(tmp_path: Path) -> None:
    """In `make test-slow` only: test_distributed's test_in_process_launch_multirun checks the
    same of a grid sweep (children's job numbers, params and overrides, the parent FINISHED with
    the best child's val AUC, each job's best.json), and test_optuna_sweep_and_compare a sweep
    of single-process children."""
    import mlflow

    mlflow_store(tmp_path / "mlflow.db")
    proc = run_cli(["-m", "experiment=smoke", "trainer.epochs=1", "tracking.log_model=false",
                    "loss=ce,focal", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("her2exp")
    (parent,) = client.search_runs([exp.experiment_id], "tags.sweep = 'parent'")
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")  # fmt: skip
    assert sorted(c.data.tags["sweep.job_num"] for c in children) == ["0", "1"]
    assert {c.data.params["loss.name"] for c in children} == {"ce", "focal"}
    assert all("loss=" in c.data.tags["sweep.job_overrides"] for c in children)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_auc"] == max(
        c.data.metrics["best_val_auc"] for c in children
    )
    assert (tmp_path / "sweep" / "0" / "reports" / "best.json").is_file()


def test_optuna_sweep_and_compare(tmp_path: Path, monkeypatch, capsys) -> None:
    import mlflow

    # Two trials: enough for a best value to pick and a table to sort.
    mlflow_store(tmp_path / "mlflow.db")
    proc = run_cli(["-m", "hydra/sweeper=her2_optuna", "hydra.sweeper.n_trials=2",
                    "experiment=smoke", "loss=focal", "trainer.epochs=1",
                    "tracking.log_model=false", "tracking.log_checkpoint=false",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("her2exp")
    (parent,) = client.search_runs([exp.experiment_id], "tags.sweep = 'parent'")
    assert parent.data.tags["sweeper"] == "her2_optuna"
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")  # fmt: skip
    assert len(children) == 2
    best = max(c.data.metrics["best_val_auc"] for c in children)
    assert result["best_value"] == pytest.approx(best)

    out = tmp_path / "compare.csv"
    # her2exp-compare's main() in this process, as its console script calls it (sys.argv, cwd).
    from her2exp.cli.compare import main as compare

    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.chdir(tmp_path)
        patch.setattr("sys.argv", ["her2exp-compare", f"out={out}"])
        compare()
    printed_out = capsys.readouterr().out
    table = pd.read_csv(out)
    assert len(table) == 2
    assert table["val_auc"].tolist() == sorted(table["val_auc"], reverse=True)
    assert table["val_auc"].iloc[0] == pytest.approx(best)
    assert {"trainer.lr", "loss.gamma"} <= set(table.columns)  # the swept params differ
    by_id = {c.info.run_id: c.data.metrics for c in children}
    assert table["test_sens"].tolist() == [
        by_id[r]["test_youden_sensitivity"] for r in table.run_id
    ]
    # Printed: each run's decision level and operating point, best_epoch an integer (not 1.0000).
    header, *rows = printed_out.splitlines()[:-1]
    printed = [dict(zip(header.split(), row.split(), strict=True)) for row in rows]
    assert [(r["decision_level"], r["operating_point"], r["best_epoch"]) for r in printed] == [
        ("tile", "youden", "1")
    ] * 2, printed_out


def test_rerun_from_mlflow_alone_gives_the_same_metrics(smoke_run: SmokeRun) -> None:
    proc = subprocess.run(
        [str(BIN / "her2exp-rerun"), f"run_id={smoke_run.run_id}", f"tracking.uri={smoke_run.uri}",
         f"out={smoke_run.cwd / 'rerun'}"],
        cwd=smoke_run.cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=smoke_run.uri)
    original = client.get_run(smoke_run.run_id)
    exp = original.info.experiment_id
    (again,) = client.search_runs([exp], f"tags.`user.rerun_of` = '{smoke_run.run_id}'")
    for key in ("best_val_auc", "test_auc", "threshold_youden_val", "test_youden_sensitivity"):
        assert again.data.metrics[key] == original.data.metrics[key], key


def test_the_sweep_callback_keeps_its_old_dotted_path() -> None:
    """`her2exp.tracking.MlflowSweepCallback`, the callback's path in the saved .hydra configs of
    runs before it moved to evaluation, instantiates the same class as conf/hydra names now;
    importing tracking alone still does not import evaluation (the alias is lazy)."""
    # A fresh interpreter for the import claim only: the torch stack that importing the callback
    # loads would cost it seconds, and the class identities hold in this process as well.
    code = (
        "import sys; import her2exp.tracking as t; "
        "assert 'her2exp.evaluation' not in sys.modules, 'tracking imported evaluation'"
    )
    proc = subprocess.run(
        [str(BIN / "python"), "-c", code], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from hydra.utils import get_class, instantiate

    from her2exp.evaluation.sweep_callback import MlflowSweepCallback as New

    assert get_class("her2exp.tracking.MlflowSweepCallback") is New
    assert type(instantiate({"_target_": "her2exp.tracking.MlflowSweepCallback"})) is New
    conf = yaml.safe_load((REPO / "conf/hydra/default.yaml").read_text())
    assert conf["callbacks"]["mlflow_sweep"]["_target_"] == (
        "her2exp.evaluation.sweep_callback.MlflowSweepCallback"
    )
