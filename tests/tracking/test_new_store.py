"""Concurrent first use of a new SQLite store (issue 30, item 3): jobs started together on a
store that is not there yet all run. MLflow creates (and migrates) a new store when it opens it;
two processes doing that at once collide (`table ... already exists`, `duplicate column`), so
her2exp opens a SQLite store under an inter-process lock beside the database
(`tracking.store.open_store`). Real processes, real SQLite stores, no mocks."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

from conftest import BIN

# One job's first use of the store, as training's tracker does it, after a start barrier: every
# process waits, imports done, until all have written their ready file.
OPEN_TOGETHER = """
import sys, time
from pathlib import Path
from omegaconf import OmegaConf
import mlflow
from her2exp.tracking import MlflowTracker
db, barrier, me, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
(barrier / f"ready-{me}").touch()
while len(list(barrier.glob("ready-*"))) < n:
    time.sleep(0.001)
tracker = MlflowTracker(OmegaConf.create({"uri": f"sqlite:///{db}", "fallback": "none"}))
tracker.client.create_experiment(f"job{me}")
"""


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(p.wait(timeout=300), p.communicate()[1]) for p in procs]


def test_jobs_opening_a_new_store_together_all_run(tmp_path: Path) -> None:
    db = tmp_path / "store" / "mlflow.db"  # neither the database nor its folder exists yet
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    n = 2
    code = [sys.executable, "-c", OPEN_TOGETHER, str(db), str(barrier)]
    done = finish([start([*code, str(i), str(n)], tmp_path) for i in range(n)])
    assert all(rc == 0 for rc, _ in done), "\n".join(err for _, err in done)
    with closing(sqlite3.connect(db)) as con:
        names = {r[0] for r in con.execute("SELECT name FROM experiments")}
    assert {f"job{i}" for i in range(n)} <= names
    assert sorted(os.listdir(db.parent)) == ["mlflow.db"]  # the lock file went with the lock


def test_two_trainings_started_together_on_a_new_store_both_finish(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    procs = [
        start(
            [
                str(BIN / "her2exp-train"),
                "experiment=smoke",
                "trainer.epochs=1",
                f"tracking.uri=sqlite:///{db}",
                f"hydra.run.dir={tmp_path / f'run{i}'}",
            ],
            tmp_path,
        )
        for i in range(2)
    ]
    done = finish(procs)
    assert [rc for rc, _ in done] == [0, 0], "\n".join(err[-3000:] for _, err in done)
    with closing(sqlite3.connect(db)) as con:
        status = [r[0] for r in con.execute("SELECT status FROM runs")]
    assert status == ["FINISHED", "FINISHED"]
    assert not db.with_name("new.db.lock").exists()
