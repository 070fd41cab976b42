"""Nothing of a finished or running run is lost to `trainer.resume=auto` (issue 30, 1, 2 and 6):
`her2exp-train` on copies of the session's smoke run (directory and SQLite store): real
processes where two runs meet, its main from sys.argv in this process for a lone refusal.

- a finished run whose last.pt was deleted cannot be resumed: refused, naming trainer.overwrite;
- a last.pt that is a directory: refused, nothing overwritten;
- the same command started twice: the second is refused naming the first's pid, the first
  finishes with one MLflow run whose metrics were logged once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from conftest import REPO, SmokeRun, copy_store, mlflow_store, run_cli
from her2exp.runtime.rundir import RunDir

ENTRY = REPO / "tests" / "fault_entry.py"  # her2exp-train with a pause point


def _finished_copy(smoke_run: SmokeRun, tmp_path: Path) -> tuple[RunDir, str]:
    """The smoke run's directory and store, copied; its mlflow_run.json names the copy's store
    (as the original names its own), so a resume would continue the finished run there."""
    run = RunDir(Path(shutil.copytree(smoke_run.run_dir, tmp_path / "run")))
    uri = f"sqlite:///{copy_store(smoke_run.cwd / 'mlflow.db', tmp_path / 'mlflow.db')}"
    info = json.loads(run.mlflow_run.read_text()) | {"tracking_uri": uri}
    run.mlflow_run.write_text(json.dumps(info))
    return run, uri


def _state(run: RunDir, uri: str, run_id: str) -> dict:
    """What must not change: the run's best.pt, reports, resolved config (bytes and mtimes) and
    its MLflow run (status, end, metrics, tags)."""
    files = [run.best, run.config_resolved, *sorted(run.reports.rglob("*"))]
    got = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files if p.is_file()}
    mlrun = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    got["mlflow"] = (mlrun.info.status, mlrun.info.end_time, mlrun.data.metrics, mlrun.data.tags)
    return got


def _refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr
    assert proc.returncode == 2, proc.stdout[-2000:] + err[-2000:]
    assert err.startswith("her2exp: ") and err.count("\n") == 1, err
    assert all(n in err for n in needles), err
    return err


def _train_here(args: list[str], cwd: Path, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """her2exp-train's main() in this process, as its console script calls it (sys.argv, the
    cwd): its exit status and output as a process's. An interpreter start costs seconds;
    test_precheck's real console script is refused by the same resume check (rundir.plan)."""
    from her2exp.cli.train import main

    capsys.readouterr()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["her2exp-train", *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        main()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, printed.out, printed.err)


@pytest.mark.parametrize("damage", ["deleted", "a directory"])
def test_resume_auto_never_trains_into_a_finished_run(
    smoke_run: SmokeRun, tmp_path: Path, damage: str, monkeypatch, capsys
) -> None:
    """last.pt deleted (users delete it: it is the large file) or a directory: refused before
    any work (another lr, too: nothing would report it), best.pt, reports, config_resolved.yaml
    and the FINISHED MLflow run unchanged."""
    run, uri = _finished_copy(smoke_run, tmp_path)
    run.last.unlink()
    if damage == "a directory":
        run.last.mkdir()
    before = _state(run, uri, smoke_run.run_id)
    args = [
        "experiment=smoke",
        f"hydra.run.dir={run.root}",
        "trainer.resume=auto",
        "trainer.lr=0.01",
        f"tracking.uri={uri}",
    ]
    proc = _train_here(args, tmp_path, monkeypatch, capsys)
    if damage == "deleted":
        _refused(proc, f"hydra.run.dir={run.root}", "no last.pt to resume", "trainer.overwrite")
    else:
        _refused(proc, f"{run.last} is not a file", "trainer.overwrite=true")
    assert _state(run, uri, smoke_run.run_id) == before
    assert before["mlflow"][0] == "FINISHED"


def test_the_same_command_started_twice_trains_once(tmp_path: Path) -> None:
    """The first start holds the run directory (paused in its first epoch); the second, the very
    same command, is refused naming the first's pid; the first finishes alone."""
    uri = f"sqlite:///{mlflow_store(tmp_path / 'mlflow.db')}"
    run = RunDir(tmp_path / "run")
    args = [
        "experiment=smoke",
        "trainer.resume=auto",
        f"hydra.run.dir={run.root}",
        f"tracking.uri={uri}",
        "tracking.log_model=false",
    ]
    marker = tmp_path / "first"
    env = {**os.environ, "HER2EXP_TEST_PAUSE": "train:1:1", "HER2EXP_TEST_MARKER": str(marker)}
    with open(tmp_path / "first.out", "w") as out:
        first = subprocess.Popen(
            [sys.executable, str(ENTRY), *args], cwd=tmp_path, env=env, stdout=out, stderr=out
        )
    paused = Path(f"{marker}.train_1_1")
    try:
        deadline = time.monotonic() + 240
        while not paused.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert paused.exists(), (tmp_path / "first.out").read_text()[-3000:]
        hydra_files = sorted(run.hydra.iterdir())
        stamps = [(p.name, p.stat().st_mtime_ns, p.read_bytes()) for p in hydra_files]
        second = run_cli(args, cwd=tmp_path)
        _refused(second, f"run directory {run.root} is in use by pid {first.pid} on host ")
        # refused before Hydra's run: the first run's .hydra/ is not rewritten
        assert [(p.name, p.stat().st_mtime_ns, p.read_bytes()) for p in hydra_files] == stamps
        assert sorted(run.hydra.iterdir()) == hydra_files
        assert f'"pid": {first.pid}' in run.lock.read_text()  # the holder's record
        Path(f"{paused}.go").touch()
        assert first.wait(timeout=300) == 0, (tmp_path / "first.out").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    client = mlflow.MlflowClient(tracking_uri=uri)
    (only,) = client.search_runs([client.get_experiment_by_name("her2exp").experiment_id])
    assert only.info.status == "FINISHED" and "attempts" not in only.data.tags  # never reopened
    steps = [m.step for m in client.get_metric_history(only.info.run_id, "val_auc")]
    assert steps == [1, 2]  # each epoch once: the refused start logged nothing
