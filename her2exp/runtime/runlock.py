"""An advisory lock on a run directory, held for the life of the run by the one process that
writes into it (rank 0, or the parent of `trainer.nproc_per_node` workers).

Why: the recipe for pre-emptible jobs is the same `trainer.resume=auto` command in a fixed
`hydra.run.dir`, so a job requeued while its first copy still runs (or a command typed twice)
would otherwise train two processes into one checkpoints/ folder and one MLflow run. The second
start is refused in one line naming the holder, before `rundir.plan` reads the directory (its
clean-up of stale temporary files must never touch a running writer's).

How: `fcntl.flock` on `RunDir.lock`. The kernel drops the lock when the holder's descriptor is
closed, however the process ends (`kill -9`, OOM, a node's crash ends the server's lease), so a
dead run never leaves it stuck and there is no stale-lock clean-up to get wrong. The file also
records the holder (host, pid, start time, command) for the refusal's message; it stays behind
after the run, meaning nothing by itself: only a held flock means "in use", and rundir's checks
look at checkpoints/, never at this file.

Network file systems: Linux forwards flock on NFS (v4, and v3 with lockd) to the server as a
whole-file POSIX lock, so it holds across hosts (the message names the holder's host, whose pid
it is). On Lustre flock is cluster-wide only when the client mounts with `flock`; `localflock`
makes it node-local (two nodes are not kept apart); without either it fails with ENOSYS. A file
system that refuses flock (ENOSYS, EOPNOTSUPP, ENOLCK: no lock daemon) gets a warning and the
run goes on unlocked, as it did before the lock existed.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
from pathlib import Path

from her2exp.config import ConfigError
from her2exp.runtime.rundir import RunDir

log = logging.getLogger("her2exp")

#: Set by the parent that holds the lock for the `trainer.nproc_per_node` workers it spawns (the
#: resolved run directory): a worker opening the file again would be refused by its parent's lock.
HELD_ENV = "HER2EXP_RUN_LOCK_HELD"
#: flock's answers that mean "this file system cannot lock", not "someone holds it".
UNSUPPORTED = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK})


#: This process's held locks: lock file -> [descriptor, holders]. Re-entrant within a process
#: (a second open of the file would be refused by the first's flock): the same writer.
_HELD: dict[Path, list[int]] = {}


class RunLock:
    """A held lock (`path` set), or none (another rank, the parent holds it, or the file system
    cannot lock). Releasing the last holder in this process closes the descriptor, which drops
    the flock."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path

    @property
    def held(self) -> bool:
        return self.path is not None

    def release(self) -> None:
        if self.path is None:
            return
        entry = _HELD[self.path]
        entry[1] -= 1
        if entry[1] == 0:
            os.close(entry[0])
            del _HELD[self.path]
        self.path = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def take(run_dir: Path, rank: int) -> tuple[RunLock, str | None]:
    """Rank 0: (the lock, None), or (no lock, the refusal's line) when it is held elsewhere.
    Other ranks: (no lock, None); they learn rank 0's answer by a broadcast (build_runtime)."""
    if rank != 0:
        return RunLock(), None
    try:
        return acquire(run_dir), None
    except ConfigError as exc:
        return RunLock(), str(exc)


def acquire(run_dir: Path) -> RunLock:
    """Take `run_dir`'s lock (creating the directory), or refuse in one line naming its holder.

    Call it on rank 0 only, before anything reads or writes the run directory."""
    run_dir = Path(run_dir)
    if os.environ.get(HELD_ENV) == str(run_dir.resolve()):
        return RunLock()  # the parent that spawned this worker holds it
    path = RunDir(run_dir.resolve()).lock
    if path in _HELD:
        _HELD[path][1] += 1
        return RunLock(path)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask's mode, as every file
    except OSError as exc:
        raise ConfigError(
            f"hydra.run.dir={run_dir} cannot be written ({exc.strerror}): choose another "
            "hydra.run.dir"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise ConfigError(busy_message(run_dir, holder)) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno not in UNSUPPORTED:
            raise
        log.warning(
            "hydra.run.dir=%s: this file system cannot lock files (%s); a second start of the "
            "same command would not be refused, so start it once",
            run_dir,
            os.strerror(exc.errno),
        )
        return RunLock()
    _write_holder(fd)
    _HELD[path] = [fd, 1]
    return RunLock(path)


def check_free(run_dir: Path) -> None:
    """Refuse (one line naming the holder) when another process holds `run_dir`'s lock, without
    creating or writing anything: her2exp-train's check before Hydra writes `.hydra/` and the job
    log into the directory (training.run.check_start). A shared flock taken and dropped at once
    conflicts only with a holder's exclusive one. Two starts checked in the same instant both
    pass here; `acquire` still refuses the second."""
    run_dir = Path(run_dir)
    path = RunDir(run_dir.resolve()).lock
    if path in _HELD or os.environ.get(HELD_ENV) == str(run_dir.resolve()) or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # unreadable: acquire will say so, with the run directory named
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(busy_message(run_dir, _read_holder(fd))) from None
    except OSError as exc:
        if exc.errno not in UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def busy_message(run_dir: Path, holder: dict[str, object] | None) -> str:
    """The refusal's one line."""
    if not holder:
        return (
            f"run directory {run_dir} is in use by another process that has just started: wait "
            "for it or choose another hydra.run.dir"
        )
    return (
        f"run directory {run_dir} is in use by pid {holder.get('pid')} on host "
        f"{holder.get('host')} since {holder.get('since')} ({holder.get('command')}): wait for "
        "it or choose another hydra.run.dir"
    )


def holder_record() -> dict[str, object]:
    """Who holds the lock: what a refused second start prints."""
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else []
    command = shlex.join(argv)
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command if len(command) <= 300 else command[:297] + "...",
    }


def _write_holder(fd: int) -> None:
    """Rewritten in place, not by fileio's atomic replace: a new file under the name would be a
    new inode that the held flock no longer guards."""
    data = json.dumps(holder_record()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_holder(fd: int) -> dict[str, object] | None:
    """The holder's record; None while it is still being written (or was not JSON)."""
    try:
        record = json.loads(os.pread(fd, 65536, 0).decode())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
