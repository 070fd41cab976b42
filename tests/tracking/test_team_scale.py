"""Team scale with the real engines: `her2exp-server` (PostgreSQL + `mlflow server`), concurrent
sweep jobs (joblib, submitit_local) logging into one store, the SLURM launcher config, and two
torchrun "nodes" meeting through c10d rendezvous.

The PostgreSQL tests skip, saying why, where PostgreSQL's server programs are not installed
(`.ci/run` installs Debian's package); nothing here is mocked.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import BIN, CONF, mlflow_store, run_cli
from her2exp.apps.server import PostgresUnavailable, _pg_bin, wait_http
from her2exp.runtime.distributed import free_port


@dataclass
class TeamServer:
    url: str
    root: Path
    pg_port: int


@pytest.fixture(scope="module")
def team_server():
    """`her2exp-server` as a user starts it: a private PostgreSQL cluster + `mlflow server`."""
    try:
        _pg_bin("initdb")
        import psycopg2  # noqa: F401 - the driver MLflow's SQLAlchemy store needs
    except (PostgresUnavailable, ImportError) as exc:
        pytest.skip(f"PostgreSQL unavailable here: {exc}")
    # Under /tmp rather than pytest's tmp root, which is private to root: as root the cluster
    # belongs to the postgres user, who must reach its directory.
    root = Path(tempfile.mkdtemp(prefix="her2exp-team-"))
    port, pg_port = free_port(), free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        [str(BIN / "her2exp-server"), f"dir={root}", f"port={port}", f"pg_port={pg_port}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", 300, proc)
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        pytest.fail(f"her2exp-server did not come up: {exc}\n{(root / 'server.log').read_text()}")
    yield TeamServer(url, root, pg_port)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    log.close()
    stopped = not (root / "pgdata" / "postmaster.pid").exists()
    shutil.rmtree(root, ignore_errors=True)
    assert stopped, "her2exp-server left PostgreSQL running after SIGTERM"


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def _check_sweep(uri: str, experiment: str, n_jobs: int, epochs: int) -> list:
    """Exactly one parent and n_jobs FINISHED children, each with its whole metric history."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert len(parents) == 1, f"{len(parents)} parent runs"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == n_jobs + 1, f"{len(runs)} runs for a {n_jobs}-job sweep (+1 parent)"
    assert sorted(int(c.data.tags["sweep.job_num"]) for c in children) == list(range(n_jobs))
    for child in children:
        assert child.info.status == "FINISHED", child.info
        assert "tracking_errors" not in child.data.tags, child.data.tags["tracking_errors"]
        history = client.get_metric_history(child.info.run_id, "val_auc")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1))
        assert "test_auc" in child.data.metrics
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_jobs"] == n_jobs
    assert parent.data.metrics["n_finished"] == n_jobs
    return children


def _overlapped(children: list) -> bool:
    """Whether at least two jobs ran at the same time (the launcher really ran them at once)."""
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))


SWEEP = ["experiment=smoke", "trainer.epochs=2", "tracking.log_model=false",
         "tracking.log_checkpoint=false"]  # fmt: skip


def test_training_through_the_postgres_backed_server(
    team_server: TeamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg2

    monkeypatch.setenv("HER2EXP_TRACKING_URI", team_server.url)  # tracking=server reads it
    proc = run_cli(["tracking=server", *SWEEP, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = next(ln.split()[3] for ln in proc.stdout.splitlines()
                  if ln.startswith("her2exp: MLflow run "))  # fmt: skip
    assert f"in {team_server.url}" in proc.stdout

    client = _client(team_server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "test_resnet"
    assert 0.0 <= run.data.metrics["best_val_auc"] <= 1.0
    # Artifacts go through the server into its artifact store, and read back the same.
    names = {a.path for a in client.list_artifacts(run_id, "reports")}
    assert "reports/summary.md" in names
    got = Path(client.download_artifacts(run_id, "reports/summary.md", str(tmp_path)))
    assert got.read_text() == (tmp_path / "run" / "reports" / "summary.md").read_text()
    assert list((team_server.root / "artifacts").rglob("summary.md"))
    # ...and the run itself lives in PostgreSQL.
    with psycopg2.connect(host="127.0.0.1", port=team_server.pg_port, user="her2exp",
                          dbname="mlflow") as conn, conn.cursor() as cur:  # fmt: skip
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
        assert cur.fetchone() == ("FINISHED",)


@pytest.mark.slow
def test_concurrent_joblib_jobs_log_into_the_server(
    team_server: TeamServer, tmp_path: Path
) -> None:
    """In `make test-slow` only: test_two_concurrent_joblib_jobs_share_one_sqlite_store proves
    two concurrent joblib jobs logging under one parent, and
    test_training_through_the_postgres_backed_server a run logging through this server."""
    experiment = f"joblib-{tmp_path.name}"
    start = time.monotonic()
    proc = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SWEEP,
                    "loss=ce,focal", f"tracking.uri={team_server.url}",
                    f"tracking.experiment={experiment}",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)  # fmt: skip
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Two jobs at once already write the same experiment concurrently through the server.
    children = _check_sweep(team_server.url, experiment, n_jobs=2, epochs=2)
    assert _overlapped(children), "joblib ran the jobs one after another"
    print(f"2-job concurrent sweep (joblib, n_jobs=2) into PostgreSQL: {seconds:.1f} s")


def test_two_concurrent_joblib_jobs_share_one_sqlite_store(tmp_path: Path) -> None:
    """Two joblib jobs log into one SQLite store at the same time. The claim needs their runs
    to overlap; on a loaded 2-core machine loky's second worker can come up after the first
    worker finished both short jobs, which proves nothing either way, so a sweep that ran
    one after another is run again (into a fresh store), up to three times, before the test
    fails. Three epochs, not SWEEP's two: a run logs few metrics since they were curated
    (tracking/schema.py), and a job shorter than a loky worker's start-up never overlaps."""
    attempts = 3
    for attempt in range(attempts):
        cwd = tmp_path / f"attempt{attempt}"
        cwd.mkdir()
        uri = f"sqlite:///{cwd}/mlflow.db"  # fresh: the sweep callback creates it before fan-out
        proc = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SWEEP,
                        "trainer.epochs=3", "loss=ce,focal", f"tracking.uri={uri}",
                        f"hydra.sweep.dir={cwd / 'sweep'}"], cwd)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "database is locked" not in proc.stdout + proc.stderr
        children = _check_sweep(uri, "her2exp", n_jobs=2, epochs=3)
        if _overlapped(children):
            return
    raise AssertionError(f"joblib ran the jobs one after another, {attempts} times")


def test_submitit_local_jobs_each_run_ddp(tmp_path: Path) -> None:
    """The SLURM shape on one machine: submitit starts the job, which trains on 2 processes.

    One job: a second would prove nothing _check_sweep does not see with one (the parent's job
    count, job numbers, each child's history); concurrent jobs are the joblib tests' and several
    DDP jobs in one sweep test_distributed's in-process multirun.
    """
    uri = f"sqlite:///{mlflow_store(tmp_path / 'mlflow.db')}"
    proc = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15",
                    "experiment=smoke", "model.name=test_convnext", "trainer.epochs=1",
                    "trainer.nproc_per_node=2", "tracking.log_model=false",
                    "tracking.log_checkpoint=false", "loss=focal", f"tracking.uri={uri}",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (child,) = _check_sweep(uri, "her2exp", n_jobs=1, epochs=1)
    assert child.data.tags["world_size"] == "2"
    assert (tmp_path / "sweep" / ".submitit").is_dir()  # submitit, not the basic launcher, ran it
    logs = {p.name for p in (tmp_path / "sweep" / "0").glob("train_rank*.log")}
    assert logs == {"train_rank0.log", "train_rank1.log"}


def test_slurm_launcher_config_composes_and_validates(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_class
    from omegaconf import open_dict

    import her2exp.training.run  # noqa: F401 - registers the schema
    from her2exp.config import validate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["experiment=slurm", "hydra.launcher.partition=a100",
                                 "trainer.nproc_per_node=8"])  # fmt: skip
    HydraConfig.instance().set_config(cfg)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert launcher.partition == "a100"
    assert launcher.tasks_per_node == 1  # one task per node; DDP workers started in-process
    assert launcher.timeout_min > 0 and launcher.max_num_timeout >= 1  # requeued on time-out
    assert launcher.signal_delay_s > 0
    assert launcher.gpus_per_node == 8  # one GPU per DDP worker of the job
    assert cfg.trainer.resume == "auto"  # a requeued job continues from its last.pt
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.output_dir = str(tmp_path)
    validate(cfg)


def test_two_torchrun_nodes_meet_through_c10d_and_train_one_model(tmp_path: Path) -> None:
    port = free_port()
    mlflow_store(tmp_path / "mlflow.db")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = [str(BIN / "torchrun"), "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=her2exp-{port}",
            "-m", "her2exp.train", "experiment=smoke", "model.name=test_convnext",
            "trainer.epochs=1", "tracking.log_model=false",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    nodes = [
        subprocess.Popen(
            args,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    try:
        outs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    for node, out in zip(nodes, outs, strict=True):
        assert node.returncode == 0, out[-4000:]
    announced = [
        ln for out in outs for ln in out.splitlines() if ln.startswith("her2exp: MLflow run")
    ]
    assert len(announced) == 1, "exactly one node's rank 0 reports the run"
    client = _client(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("her2exp").experiment_id])
    assert run.data.tags["world_size"] == "2" and run.info.status == "FINISHED"
    logs = {p.name for p in (tmp_path / "run").glob("train_rank*.log")}
    assert logs == {"train_rank0.log", "train_rank1.log"}
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


def test_a_locked_store_is_retried_with_back_off_until_the_lock_goes(tmp_path: Path) -> None:
    """A writer meets another's exclusive SQLite lock: with_retries backs off and succeeds.

    (MLflow's own SQLite sessions wait up to 20 s on a lock first; the retries are what covers a
    longer lock, PostgreSQL serialisation failures and an overloaded server's 429/5xx.)
    """
    import sqlite3
    import threading

    from her2exp.tracking import is_transient, with_retries

    db = tmp_path / "store.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE metrics (key TEXT, value REAL)")
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        locked.set()
        release.wait(20)
        conn.execute("COMMIT")
        conn.close()

    attempts = []

    def log_metric() -> None:
        attempts.append(time.monotonic())
        with sqlite3.connect(db, timeout=0) as conn:  # no busy wait: fail at once if locked
            conn.execute("INSERT INTO metrics VALUES ('val_auc', 0.9)")

    holder = threading.Thread(target=hold_lock)
    holder.start()
    locked.wait(10)
    threading.Timer(1.0, release.set).start()
    try:
        with pytest.raises(sqlite3.OperationalError) as once:
            log_metric()
        assert is_transient(once.value), once.value
        # What concurrent jobs' get-or-create of the shared dataset row raised on PostgreSQL:
        seen = 'BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "dataset_pk"'  # noqa: E501
        assert is_transient(RuntimeError(seen))
        assert not is_transient(ValueError("metric value must be a number"))
        with_retries(log_metric, attempts=6, base_delay_s=0.1)
    finally:
        release.set()
        holder.join()
    assert len(attempts) >= 3  # failed at least once more, then got through
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    assert gaps[-1] > gaps[0]  # backing off
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM metrics").fetchone() == (1,)
    calls = []

    def wrong_value() -> None:
        calls.append(1)
        raise ValueError("metric value must be a number")

    with pytest.raises(ValueError):
        with_retries(wrong_value)
    assert calls == [1]  # a real mistake is not retried
