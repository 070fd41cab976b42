"""DDP with real torchrun and gloo on the CPU: same science as one process, one run directory,
rank 0 alone writing, in-process launch for sweeps, and prompt failure when a rank dies."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import BIN, REPO, compose_train, mlflow_store
from her2exp.core import checkpoint
from her2exp.training import run as train_mod

# LayerNorm model: DDP's averaged gradients then equal the single-process big-batch gradient.
# (BatchNorm statistics are per rank by construction; SyncBatchNorm is CUDA-only.)
COMMON = ["experiment=smoke", "model.name=test_convnext", "trainer.epochs=2"]


def torchrun(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300):
    cmd = [str(BIN / "torchrun"), "--nproc_per_node=2", str(REPO / "tests" / "ddp_entry.py"), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("outputs/*/*/checkpoints"))


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("single")
    return train_mod.train(compose_train([*COMMON, "tracking=off"], tmp)), tmp


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    cwd = tmp_path_factory.mktemp("ddp")
    mlflow_store(cwd / "mlflow.db")
    proc = torchrun(
        [*COMMON, "tracking.uri=sqlite:///mlflow.db"], cwd, env={"HER2EXP_TEST_SKEW_S": "1.5"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, cwd


def test_ddp_matches_single_process(single, ddp) -> None:
    summary, single_dir = single
    _, cwd = ddp
    (run_dir,) = run_dirs(cwd)
    import json

    best = json.loads((run_dir / "reports" / "best.json").read_text())
    assert abs(best["best_val_auc"] - summary["best_val_auc"]) <= 0.002
    assert abs(best["test_auc"] - summary["test_auc"]) <= 0.002
    one = pd.read_csv(single_dir / "reports" / "predictions_val.csv")
    two = pd.read_csv(run_dir / "reports" / "predictions_val.csv")
    # Every val sample scored exactly once, the same samples, in the same (dataset) order.
    assert two["row"].is_unique and len(two) == len(one)
    assert two["row"].tolist() == one["row"].tolist()
    assert (two["prob_her2_pos"] - one["prob_her2_pos"]).abs().max() < 1e-3


def test_one_run_dir_per_rank_logs_and_one_mlflow_run(ddp) -> None:
    """Ranks started 1.5 s apart still share rank 0's run directory; rank 1 writes no files."""
    import mlflow

    proc, cwd = ddp
    (run_dir,) = run_dirs(cwd)
    assert (run_dir / "train_rank0.log").is_file() and (run_dir / "train_rank1.log").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "rank 1" not in proc.stdout  # progress and results printed by rank 0 only
    assert proc.stdout.count("her2exp: best val AUC") == 1
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("her2exp").experiment_id])
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert tags["world_size"] == "2" and tags["backend"] == "gloo"


@pytest.mark.slow
def test_resume_under_torchrun_equals_uninterrupted(ddp, tmp_path: Path) -> None:
    """In `make test-slow` only: test_torchrun_restarts_a_killed_worker_and_every_rank_resumes
    proves the same (a torchrun job resumed from epoch 1's last.pt, with every rank's RNG state,
    ends with the uninterrupted run's numbers), through torchrun's own restart."""
    _, cwd = ddp
    (ref_dir,) = run_dirs(cwd)
    import json

    ref = json.loads((ref_dir / "reports" / "best.json").read_text())
    run_dir = tmp_path / "run"
    first = torchrun(
        [*COMMON, "tracking=off", "trainer.stop_after_epoch=1", f"hydra.run.dir={run_dir}"],
        tmp_path,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and len(state["rng_per_rank"]) == 2
    second = torchrun(
        [*COMMON, "tracking=off", "trainer.resume=auto", f"hydra.run.dir={run_dir}"], tmp_path
    )
    assert second.returncode == 0, second.stderr[-3000:]
    got = json.loads((run_dir / "reports" / "best.json").read_text())
    for key in ("best_val_auc", "threshold_youden_val", "test_auc", "best_epoch"):
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key


def test_failure_on_one_rank_ends_the_job_promptly(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = torchrun(
        [*COMMON, "trainer.epochs=3", "tracking=off"],
        tmp_path,
        env={"HER2EXP_TEST_FAIL_RANK": "1"},
        timeout=240,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "deliberate failure on rank 1" in proc.stdout + proc.stderr
    assert elapsed < 120, f"took {elapsed:.0f} s to fail"


def test_in_process_launch_multirun(tmp_path: Path) -> None:
    """`her2exp-train -m trainer.nproc_per_node=2 ...`: two jobs, each one 2-process DDP run, the
    children of one parent run; the jobs compile the model before and after DDP (the two orders
    test_compile_and_ddp_in_either_order runs in `make test-slow`)."""
    import mlflow

    mlflow_store(tmp_path / "mlflow.db")
    proc = subprocess.run(
        [
            str(BIN / "her2exp-train"),
            "-m",
            *COMMON,
            "trainer.epochs=1",
            "trainer.nproc_per_node=2",
            "tracking.log_model=false",  # the MLflow model is test_tracking's; seconds per job
            "tracking.log_checkpoint=false",
            "model.compile=true",
            "model.compile_backend=aot_eager",
            "model.compile_before_ddp=true,false",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for job in ("0", "1"):
        d = tmp_path / "sweep" / job
        assert (d / "train_rank0.log").is_file() and (d / "train_rank1.log").is_file()
        assert (d / "reports" / "best.json").is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("her2exp").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    runs = [r for r in runs if r.data.tags.get("sweep") != "parent"]
    assert len(parents) == 1  # the sweep's parent run; the workers' runs are its children
    (parent,) = parents
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    assert sorted(r.data.tags["sweep.job_num"] for r in runs) == ["0", "1"]
    assert sorted(r.data.params["model.compile_before_ddp"] for r in runs) == ["False", "True"]
    assert all("model.compile_before_ddp=" in r.data.tags["sweep.job_overrides"] for r in runs)
    assert all(r.data.tags["world_size"] == "2" for r in runs)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_auc"] == max(r.data.metrics["best_val_auc"] for r in runs)


@pytest.mark.slow
@pytest.mark.parametrize("before", ["true", "false"])
def test_compile_and_ddp_in_either_order(tmp_path: Path, before: str) -> None:
    """In `make test-slow` only: test_in_process_launch_multirun's two jobs train with the model
    compiled before and after DDP (2 workers each) and check both finish; this is the same
    under torchrun."""
    proc = torchrun(
        [
            *COMMON,
            "trainer.epochs=1",
            "tracking=off",
            "model.compile=true",
            "model.compile_backend=aot_eager",
            f"model.compile_before_ddp={before}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "her2exp: best val AUC" in proc.stdout


def test_sync_bn_is_refused_on_cpu_with_a_clear_message(tmp_path: Path) -> None:
    cfg = compose_train(["experiment=smoke", "tracking=off", "trainer.sync_bn=true"], tmp_path)
    with pytest.raises(train_mod.ConfigError, match="trainer.sync_bn=true .* needs CUDA"):
        train_mod.train(cfg)


def test_torchrun_restarts_a_killed_worker_and_every_rank_resumes(ddp, tmp_path: Path) -> None:
    """`torchrun --max-restarts=1`: rank 1 is SIGKILLed in epoch 2; torchrun restarts the group,
    every rank resumes from epoch 1's checkpoint with no user action, and the MLflow run of the
    first attempt is continued (one run), ending with the uninterrupted run's numbers."""
    import json
    import signal

    import mlflow

    _, cwd = ddp
    (ref_dir,) = run_dirs(cwd)
    ref = json.loads((ref_dir / "reports" / "best.json").read_text())
    run_dir, marker = tmp_path / "run", tmp_path / "pause"
    mlflow_store(tmp_path / "mlflow.db")
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        str(REPO / "tests" / "fault_entry.py"),
        *COMMON,
        f"hydra.run.dir={run_dir}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.log_model=false",
    ]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HER2EXP_TEST_PAUSE": "train:2:0",
        "HER2EXP_TEST_PAUSE_RANK": "1",
        "HER2EXP_TEST_MARKER": str(marker),
    }
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        paused = Path(f"{marker}.train_2_0")
        deadline = time.monotonic() + 240
        while not paused.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert paused.exists(), (tmp_path / "out.txt").read_text()[-3000:]
        os.kill(int(paused.read_text()), signal.SIGKILL)
        rc = proc.wait(timeout=400)
    output = (tmp_path / "out.txt").read_text()
    assert rc == 0, output[-3000:]
    assert "resumed from" in output and "after epoch 1" in output
    got = json.loads((run_dir / "reports" / "best.json").read_text())
    for key in ("best_val_auc", "threshold_youden_val", "test_auc", "best_epoch"):
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("her2exp").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["torchelastic_restart_count"] == "1" and run.data.tags["attempts"] == "2"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_auc"))
    assert steps == [1, 2]
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and len(state["rng_per_rank"]) == 2  # every rank's RNG state
