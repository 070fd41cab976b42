"""The run directory's advisory lock (her2exp/runtime/runlock.py), with a real second process:
held, it refuses another taker naming the holder; its holder killed with SIGKILL, it is free."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose_train
from her2exp.config import ConfigError
from her2exp.runtime import rundir, runlock
from her2exp.runtime.rundir import RunDir

HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from her2exp.runtime import runlock\n"
    "lock = runlock.acquire(Path(sys.argv[1]))\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def test_a_held_lock_names_its_holder_and_a_killed_holder_frees_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as info:
            runlock.acquire(run_dir)
        message = str(info.value)
        assert f"in use by pid {child.pid} on host {socket.gethostname()} since " in message
        assert "wait for it or choose another hydra.run.dir" in message and "\n" not in message
        lock, refusal = runlock.take(run_dir, rank=0)  # what build_runtime agrees across ranks
        assert not lock.held and refusal == message
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    with runlock.acquire(run_dir) as lock:  # the kernel dropped the dead holder's lock
        assert lock.held and f'"pid": {os.getpid()}' in RunDir(run_dir).lock.read_text()
        with runlock.acquire(run_dir) as again:  # re-entrant in one process: the same writer
            assert again.held
        assert lock.held
    assert RunDir(run_dir.resolve()).lock not in runlock._HELD  # released: descriptor closed


def test_the_lock_file_is_not_taken_for_an_earlier_run(tmp_path: Path) -> None:
    """A directory holding only the lock file (a run refused before its first epoch, or a
    finished run's leftover) starts fresh, with or without trainer.resume=auto."""
    run_dir = tmp_path / "run"
    runlock.acquire(run_dir).release()
    assert RunDir(run_dir).lock.is_file()
    for overrides in ([], ["trainer.resume=auto"]):
        cfg = compose_train(["experiment=smoke", "tracking=off", *overrides], run_dir)
        assert rundir.plan(cfg, run_dir, restarts=0).path is None
