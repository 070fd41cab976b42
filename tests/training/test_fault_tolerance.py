"""Fault tolerance, tested by really breaking the process: SIGKILL during training, evaluation and
a checkpoint write, SIGTERM (what schedulers send), a NaN injected into a batch, an MLflow server
stopped and restarted mid-run, and a file-size limit that makes a checkpoint write fail.

tests/fault_entry.py pauses the real `her2exp-train` at a named point so the kill lands exactly
there; the soak test (`make test-slow`) kills at random instants instead.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BIN, REPO, compose_train, mlflow_store
from her2exp.config import ConfigError
from her2exp.core import checkpoint
from her2exp.engine import NonFiniteLossError
from her2exp.tracking import MlflowTracker
from her2exp.training import run as train_mod

ENTRY = REPO / "tests" / "fault_entry.py"
# Early stopping off: the kill points below name epochs that must happen.
COMMON = [
    "experiment=smoke",
    "trainer.epochs=4",
    "trainer.early_stop_patience=10",
    "trainer.deterministic=true",
]
# The kill/resume runs also skip one NaN batch (epoch 2): the skip count must survive resumes too.
SKIP_NAN = ["trainer.on_nonfinite=skip", "trainer.debug_nan_at_step=8"]
KEYS = ("best_epoch", "best_val_auc", "threshold_youden_val", "test_auc")


class Launch:
    """One `her2exp-train` process (through fault_entry.py), output to files, pausable."""

    def __init__(
        self,
        cwd: Path,
        args: list[str],
        pause: str = "",
        env: dict | None = None,
        preexec_fn=None,
        name: str = "launch",
    ) -> None:
        self.cwd, self.marker = cwd, cwd / f"{name}.pause"
        self.out, self.err = cwd / f"{name}.out", cwd / f"{name}.err"
        full = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "HER2EXP_TEST_PAUSE": pause,
            "HER2EXP_TEST_MARKER": str(self.marker),
            **(env or {}),
        }
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(ENTRY), *args],
                cwd=cwd,
                env=full,
                stdout=out,
                stderr=err,
                preexec_fn=preexec_fn,
            )

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_paused(self, point: str, timeout: float = 240) -> int:
        """Block until the process reached `point`; returns the pid that paused there."""
        path = Path(f"{self.marker}.{point.replace(':', '_')}")
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                pytest.fail(
                    f"exited ({self.proc.returncode}) before {point}:\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"never reached {point}:\n{self.output()[-3000:]}")
            time.sleep(0.02)
        return int(path.read_text())

    def resume(self, point: str) -> None:
        Path(f"{self.marker}.{point.replace(':', '_')}.go").touch()

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"did not finish in {timeout} s:\n{self.output()[-3000:]}")


def comparable(run_dir: Path) -> dict:
    best = json.loads((run_dir / "reports" / "best.json").read_text())
    youden = best["splits"]["test"]["reports"]["youden"]
    return {k: best[k] for k in KEYS} | {k: youden[k] for k in ("tp", "fn", "fp", "tn")}


def last_epoch(run_dir: Path) -> int:
    return int(checkpoint.load(run_dir / "checkpoints" / "last.pt")["epoch"])  # verifies sha256


@pytest.fixture(scope="module")
def reference_started(tmp_path_factory: pytest.TempPathFactory):
    """The same run, never interrupted: `her2exp-train`, started before the chain so that the two
    single-threaded processes train side by side on the suite's 2 cores."""
    cwd = tmp_path_factory.mktemp("reference")
    args = [*COMMON, *SKIP_NAN, "tracking=off", f"hydra.run.dir={cwd / 'run'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    with open(cwd / "out.txt", "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "her2exp-train"), *args], cwd=cwd, env=env, stdout=out, stderr=out
        )
    yield proc, cwd
    if proc.poll() is None:  # a selection of tests that never asked for the result
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def reference(reference_started) -> dict:
    proc, cwd = reference_started
    try:
        rc = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the reference run did not finish:\n{(cwd / 'out.txt').read_text()[-3000:]}")
    assert rc == 0, (cwd / "out.txt").read_text()[-3000:]
    return comparable(cwd / "run")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, reference_started) -> dict:
    """One run directory, the same command every time (as a requeued job runs it), broken five
    times in a row at different places; what each break left behind is recorded. (The reference
    run trains meanwhile.)"""
    cwd = tmp_path_factory.mktemp("chain")
    run_dir = cwd / "run"
    args = [
        *COMMON,
        *SKIP_NAN,
        "trainer.resume=auto",
        f"hydra.run.dir={run_dir}",
        f"tracking.uri=sqlite:///{cwd}/mlflow.db",
        "tracking.log_model=false",
    ]
    obs: dict = {"run_dir": run_dir, "uri": f"sqlite:///{cwd}/mlflow.db"}
    mlflow_store(cwd / "mlflow.db")

    def mlflow_status() -> tuple[str, dict]:
        import mlflow

        run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
        run = mlflow.MlflowClient(tracking_uri=obs["uri"]).get_run(run_id)
        return run.info.status, run.data.tags

    # 1. SIGKILL in the middle of epoch 2's training.
    la = Launch(cwd, args, "train:2:2", name="kill_train")
    os.kill(la.wait_paused("train:2:2"), signal.SIGKILL)
    obs["kill_train"] = (la.wait(), last_epoch(run_dir))
    # 2. SIGTERM in the middle of epoch 2's training: finish the step, stop, exit 128+15.
    la = Launch(cwd, args, "train:2:1", name="term_train")
    pid = la.wait_paused("train:2:1")
    os.kill(pid, signal.SIGTERM)
    start = time.monotonic()
    la.resume("train:2:1")
    rc = la.wait()
    obs["term_train"] = (
        rc,
        time.monotonic() - start,
        last_epoch(run_dir),
        la.output(),
        *mlflow_status(),
    )
    # 3. SIGKILL during epoch 2's validation.
    la = Launch(cwd, args, "eval:2", name="kill_eval")
    os.kill(la.wait_paused("eval:2"), signal.SIGKILL)
    obs["kill_eval"] = (la.wait(), last_epoch(run_dir))
    # 4. SIGKILL with epoch 2's last.pt half written.
    la = Launch(cwd, args, "ckpt:2", name="kill_ckpt")
    pid = la.wait_paused("ckpt:2")
    temps = [p.stat().st_size for p in (run_dir / "checkpoints").glob(".last.pt.*.tmp")]
    during = last_epoch(run_dir)
    os.kill(pid, signal.SIGKILL)
    obs["kill_ckpt"] = (la.wait(), during, temps, last_epoch(run_dir))
    # 5. SIGTERM during epoch 3's validation: that epoch is finished and saved first.
    la = Launch(cwd, args, "eval:3", name="term_eval")
    os.kill(la.wait_paused("eval:3"), signal.SIGTERM)
    la.resume("eval:3")
    obs["term_eval"] = (la.wait(), last_epoch(run_dir))
    # 6. The same command once more: it finishes.
    la = Launch(cwd, args, name="final")
    obs["final"] = (la.wait(), la.output())
    return obs


def test_kill9_during_training_resumes_from_the_last_complete_epoch(chain) -> None:
    rc, epoch = chain["kill_train"]
    assert rc == -signal.SIGKILL and epoch == 1


def test_sigterm_finishes_the_step_marks_the_run_killed_and_exits_nonzero(chain) -> None:
    rc, seconds, epoch, output, status, tags = chain["term_train"]
    assert rc == 128 + signal.SIGTERM, output[-3000:]
    assert seconds < 60, f"took {seconds:.0f} s to stop after SIGTERM"
    assert epoch == 1  # the partial epoch 2 is dropped; last.pt of epoch 1 is the resume point
    assert "received SIGTERM" in output and "resume with: " in output
    assert status == "KILLED"
    assert tags["stop_signal"] == "SIGTERM" and tags["interrupted_after_epoch"] == "1"
    assert "trainer.resume=auto" in tags["resume_command"]
    assert f"hydra.run.dir={chain['run_dir']}" in tags["resume_command"]
    rc, epoch = chain["term_eval"]
    assert rc == 128 + signal.SIGTERM and epoch == 3  # evaluation and checkpoint completed


def test_kill9_during_evaluation_resumes_from_the_last_complete_epoch(chain) -> None:
    rc, epoch = chain["kill_eval"]
    assert rc == -signal.SIGKILL and epoch == 1


def test_kill9_during_a_checkpoint_write_leaves_the_previous_one_loadable(chain) -> None:
    rc, during, temps, after = chain["kill_ckpt"]
    assert rc == -signal.SIGKILL
    full = (chain["run_dir"] / "checkpoints" / "last.pt").stat().st_size
    assert len(temps) == 1 and 0 < temps[0] < full  # the half-written temporary file
    assert during == 1 and after == 1  # last.pt of epoch 1, its checksum verified by load
    assert "resumed from" in chain["final"][1]
    assert not list((chain["run_dir"] / "checkpoints").glob(".*.tmp"))  # cleaned on resume


def test_resumed_run_equals_the_uninterrupted_one(chain, reference) -> None:
    rc, output = chain["final"]
    assert rc == 0, output[-3000:]
    assert comparable(chain["run_dir"]) == reference


def test_one_mlflow_run_continues_across_every_attempt(chain) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=chain["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("her2exp").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["attempts"] == "6"
    for name in ("val_auc", "train_loss", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, name))
        assert steps == [1, 2, 3, 4], (name, steps)  # every epoch once: none lost, none twice
    assert "test_auc" in run.data.metrics


def test_corrupt_checkpoint_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = checkpoint.save({"epoch": 1, "w": torch.ones(256)}, tmp_path / "checkpoints" / "last.pt")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    cfg = compose_train([*COMMON, "tracking=off", "trainer.resume=auto"], tmp_path)
    # A user's to fix: one line (a ConfigError) before the data or the model are built.
    with pytest.raises(ConfigError, match=f"trainer.resume: checkpoint {path} does not"):
        train_mod.train(cfg)


# -- non-finite loss ---------------------------------------------------------------------------
def _train(tmp: Path, *extra: str) -> dict:
    return train_mod.train(compose_train([*COMMON, "tracking=off", *extra], tmp))


def test_nan_batch_is_skipped_counted_and_logged(chain) -> None:
    """The chain's runs inject NaN inputs at batch 8 (epoch 2) with trainer.on_nonfinite=skip:
    the step is dropped, BatchNorm buffers restored, the count logged per epoch and at the end,
    and it survives every resume (the step is re-skipped, never double-counted)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=chain["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("her2exp").experiment_id])
    assert run.data.metrics["nonfinite_steps_skipped"] == 1
    per_epoch = client.get_metric_history(run.info.run_id, "nonfinite_steps_skipped")
    assert sorted((m.step, m.value) for m in per_epoch if m.step > 0) == [
        (1, 0),
        (2, 1),
        (3, 1),
        (4, 1),
    ]
    state = checkpoint.load(chain["run_dir"] / "checkpoints" / "last.pt")
    assert state["nonfinite_steps_skipped"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert run.data.metrics["best_val_auc"] > 0.7


def test_nan_batch_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"at epoch 2, step \d+"):
        _train(tmp_path, "trainer.debug_nan_at_step=8")
    assert last_epoch(tmp_path) == 1


def test_skipping_stops_after_max_nonfinite_steps(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match="trainer.max_nonfinite_steps"):
        _train(
            tmp_path,
            "trainer.on_nonfinite=skip",
            "trainer.max_nonfinite_steps=0",
            "trainer.debug_nan_at_step=8",
        )
    assert last_epoch(tmp_path) == 1


# -- full disk -------------------------------------------------------------------------------
def _ignore_sigxfsz() -> None:
    # Without this the kernel kills the process (SIGXFSZ) instead of failing write() with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_full_disk_during_a_checkpoint_write_stops_cleanly(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    la = Launch(
        tmp_path,
        [*COMMON, "tracking=off", f"hydra.run.dir={run_dir}"],
        "train:2:0",
        preexec_fn=_ignore_sigxfsz,
    )
    pid = la.wait_paused("train:2:0")
    size = (run_dir / "checkpoints" / "last.pt").stat().st_size
    limit = size // 4  # every checkpoint is bigger than this; logs and sidecars are not
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, limit))
    la.resume("train:2:0")
    rc = la.wait()
    err = la.err.read_text()
    assert rc == 1, la.output()[-3000:]
    assert "her2exp: disk full: checkpoint" in err and "could not be written" in err
    assert "File too large" in err and "the previous last.pt is intact" in err
    assert last_epoch(run_dir) == 1
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


# -- MLflow server away mid-run --------------------------------------------------------------
class MlflowServer:
    """A real `mlflow server` on a fixed port and SQLite store, stopped and started at will."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root, self.url, self.proc = root, f"http://127.0.0.1:{self.port}", None

    def start(self, timeout: float = 120) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if not (self.root / "server.db").exists():
            mlflow_store(self.root / "server.db")
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.root}/server.db",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.root,
            env=env,
            start_new_session=True,  # its own process group: stop() ends the uvicorn child too
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"mlflow server did not come up within {timeout} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the uvicorn child leaves with its group
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    time.sleep(0.2)
            except OSError:
                return


@pytest.fixture
def server(tmp_path: Path):
    srv = MlflowServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


def sync_here(argv: list[str], monkeypatch, capsys) -> tuple[object, str, str]:
    """her2exp-sync's main in this process, as its console script calls it: (exit code, stdout,
    stderr). An interpreter start costs seconds; test_reliability_files and test_cli run
    her2exp-sync as a process."""
    from her2exp.cli.sync import main

    capsys.readouterr()
    monkeypatch.setattr("sys.argv", ["her2exp-sync", *argv])
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def test_mlflow_server_lost_and_back_mid_run_then_synced(
    server: MlflowServer, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Away in epoch 2 (buffered), back in epoch 3 (replayed by the run), away again from epoch 4
    to the end (the run warns what it deferred), then `her2exp-sync` sends the rest."""
    import mlflow

    run_dir = tmp_path / "run"
    points = "train:2:0,train:3:0,train:4:0"
    la = Launch(
        tmp_path,
        [
            *COMMON,
            f"tracking.uri={server.url}",
            "tracking.log_model=true",
            f"hydra.run.dir={run_dir}",
        ],
        points,
    )
    la.wait_paused("train:2:0")
    server.stop()
    la.resume("train:2:0")
    la.wait_paused("train:3:0")
    buffered = (run_dir / "mlflow_buffer.jsonl").read_text()
    server.start()
    # The run probes an absent server at most every RECONNECT_S: let one interval pass, so the
    # end of epoch 3 finds it back however fast the server restarted and the epoch ran.
    time.sleep(MlflowTracker.RECONNECT_S + 1.0)
    la.resume("train:3:0")
    la.wait_paused("train:4:0")
    replayed_mid_run = not (run_dir / "mlflow_buffer.jsonl").exists()
    server.stop()
    la.resume("train:4:0")
    rc = la.wait()
    err = la.err.read_text()
    assert rc == 0, la.output()[-3000:]
    assert '"step": 2' in buffered or ", 2]" in buffered  # epoch 2's metrics waited on disk
    assert replayed_mid_run, "the run did not replay its buffer when the server came back"
    assert f"MLflow server {server.url} unreachable: deferred" in err
    assert (
        "(epoch 4, final metrics)" in err
        and "the MLflow model" in err
        and "run status FINISHED" in err
    )
    assert f"her2exp-sync input={run_dir}" in err
    assert "her2exp: best val AUC" in la.out.read_text()  # training itself was untouched

    server.start()
    monkeypatch.chdir(tmp_path)
    code, out, err = sync_here([str(run_dir)], monkeypatch, capsys)
    assert code in (None, 0) and not (run_dir / "mlflow_buffer.jsonl").exists(), out + err
    code, out, err = sync_here([f"input={run_dir}"], monkeypatch, capsys)
    assert code in (None, 0) and "nothing to replay" in out, out + err

    client = mlflow.MlflowClient(tracking_uri=server.url)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for name in ("val_auc", "train_loss", "epoch_seconds"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, name))
        assert steps == [1, 2, 3, 4], (name, steps)
    best = json.loads((run_dir / "reports" / "best.json").read_text())
    assert run.data.metrics["test_auc"] == pytest.approx(best["test_auc"])
    assert int(run.data.tags["tracking_replayed_calls"]) >= 1
    arts = {a.path for a in client.list_artifacts(run_id, "reports")}
    assert "reports/best.json" in arts
    mlflow.set_tracking_uri(server.url)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")  # the deferred one, replayed
    assert set(model.metadata.metadata["thresholds"]) >= {"youden"}
    got = model.predict({"image": np.zeros((2, 32, 32, 3), dtype=np.uint8)})
    assert len(got) == 2 and got["prob_her2_pos"].between(0, 1).all()


# -- soak ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_soak_twenty_random_kill_points(tmp_path: Path, reference) -> None:
    """SIGKILL at 20 random instants in a row (training, evaluation, checkpoint writes, final
    reports, start-up); each time the same command resumes; every completed run equals the
    uninterrupted one. Prints the resume time and the worst work lost."""
    rng = random.Random(8)
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        str(ENTRY),
        *COMMON,
        *SKIP_NAN,
        "trainer.resume=auto",
        "tracking=off",
        f"hydra.run.dir={run_dir}",
    ]
    start = time.monotonic()
    subprocess.run(args, cwd=tmp_path, check=True, capture_output=True, timeout=600)
    full = time.monotonic() - start
    assert comparable(run_dir) == reference
    run_dir.rename(tmp_path / "warmup")
    kills, completed, lost = 0, 0, []
    while kills < 20:
        proc = subprocess.Popen(
            args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        delay = rng.uniform(0.5, full)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            kills += 1
            last = run_dir / "checkpoints" / "last.pt"
            if last.exists():
                checkpoint.load(last)  # always loadable, checksum verified
                lost.append(time.time() - last.stat().st_mtime)
            continue
        assert proc.returncode == 0
        assert comparable(run_dir) == reference
        completed += 1
        run_dir.rename(tmp_path / f"done{completed}")
    subprocess.run(args, cwd=tmp_path, check=True, capture_output=True, timeout=600)
    assert comparable(run_dir) == reference
    print(
        f"soak: {kills} kills, {completed + 1} completed runs equal to the reference; "
        f"uninterrupted run {full:.1f} s; most time since the last checkpoint at a kill "
        f"{max(lost, default=math.nan):.1f} s"
    )
