"""`her2exp-server` / `make mlflow-server`: a team's MLflow tracking server on PostgreSQL.

Why it exists: one SQLite file serves one workstation; a team (concurrent sweeps, several
machines) needs a tracking server whose backend store takes concurrent writers. This starts
`mlflow server` with a PostgreSQL backend store and a served artifact store, bound to 127.0.0.1
unless told otherwise. Given ``backend_store_uri=`` it uses that database (the team's
PostgreSQL); without one it creates and runs a private PostgreSQL cluster under ``dir=`` (Debian's
``postgresql`` package), so a laptop or CI has the same set-up as the team.

    her2exp-server out=.mlflow-server port=5000          # local PostgreSQL + mlflow server
    her2exp-server backend_store_uri=postgresql+psycopg2://user@db:5432/mlflow \\
        artifacts_destination=s3://bucket/mlflow host=0.0.0.0 port=5000

(the command is her2exp/cli/server.py; this module is the process management)

Runs then use ``tracking=server tracking.uri=http://HOST:PORT``. Nothing here is imported by
training; MLflow itself stays in tracking/.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from her2exp.runtime.distributed import free_port

__all__ = [
    "PostgresCluster",
    "PostgresUnavailable",
    "mlflow_server_command",
    "serve",
    "wait_http",
]

DB_NAME = "mlflow"
DB_USER = "her2exp"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's server programs are not installed here."""


def _pg_bin(name: str) -> str:
    """Path of a PostgreSQL server program: PATH first, then Debian's versioned directory."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    if candidates:
        return candidates[0]
    raise PostgresUnavailable(
        f"PostgreSQL's {name} was not found: install Debian's postgresql package "
        "(apt-get install postgresql) or pass backend_store_uri= of an existing database"
    )


class PostgresCluster:
    """A private PostgreSQL cluster in ``root`` on 127.0.0.1:``port``, trust auth on loopback.

    initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` system user
    (created by Debian's package) and its commands run through ``runuser``.
    """

    def __init__(self, root: str | Path, port: int) -> None:
        self.root = Path(root).resolve()
        self.data = self.root / "pgdata"
        self.port = int(port)
        self._as: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise PostgresUnavailable("running as root needs runuser to start PostgreSQL")
            self._as = [runuser, "-u", "postgres", "--"]

    @property
    def uri(self) -> str:
        """SQLAlchemy URI of the MLflow database (psycopg2 named: SQLAlchemy 2.1 defaults to 3)."""
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self._as, *cmd], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self) -> PostgresCluster:
        """initdb on first use, start, and create the MLflow database if missing."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as:
            shutil.chown(self.root, "postgres")
            if subprocess.run([*self._as, "test", "-w", str(self.root)]).returncode != 0:
                raise PostgresUnavailable(
                    f"the postgres user cannot write {self.root} (a parent directory is private "
                    "to root): choose a dir= it can reach, e.g. under /tmp or /srv"
                )
        if not (self.data / "PG_VERSION").is_file():
            initdb = _pg_bin("initdb")
            self._run(initdb, "-D", str(self.data), "-U", DB_USER, "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        logfile = str(self.root / "postgres.log")
        pg_ctl = _pg_bin("pg_ctl")
        self._run(
            pg_ctl, "-D", str(self.data), "-o", options, "-l", logfile, "-w", "-t", "120", "start"
        )
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'")
        if exists.strip() != "1":
            self._psql(f"CREATE DATABASE {DB_NAME}")
        return self

    def _psql(self, sql: str) -> str:
        psql = _pg_bin("psql")
        cmd = [psql, "-h", str(self.root), "-p", str(self.port), "-U", DB_USER]
        return self._run(*cmd, "-d", "postgres", "-tAc", sql).stdout

    def stop(self) -> None:
        if (self.data / "postmaster.pid").is_file():
            pg_ctl = _pg_bin("pg_ctl")
            stop = [*self._as, pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"]
            subprocess.run(stop, capture_output=True)


def mlflow_server_command(
    backend_store_uri: str, artifacts_destination: str, host: str, port: int, workers: int = 1
) -> list[str]:
    """The `mlflow server` command line: backend store + artifacts served through the server."""
    mlflow = Path(sys.executable).parent / "mlflow"
    return [str(mlflow) if mlflow.exists() else "mlflow", "server"] + [
        *("--backend-store-uri", backend_store_uri),
        *("--artifacts-destination", artifacts_destination),
        "--serve-artifacts",
        *("--host", host, "--port", str(port), "--workers", str(workers)),
    ]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll url until it answers 200; fail early if the server process has died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def serve(
    dir: str,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    host: str = "127.0.0.1",
    port: int = 5000,
    pg_port: int = 0,
    workers: int = 1,
) -> int:
    """Start (PostgreSQL and) `mlflow server`, wait until SIGTERM/SIGINT, stop both; exit code.

    Raises PostgresUnavailable (before anything started) when no backend can be had."""
    root = Path(dir).resolve()
    cluster = None
    backend = backend_store_uri
    if backend is None:
        cluster = PostgresCluster(root, pg_port or free_port()).start()
        backend = cluster.uri
    artifacts = artifacts_destination or str(root / "artifacts")
    server = subprocess.Popen(mlflow_server_command(backend, artifacts, host, port, workers))

    def _stop(signum: int, _frame: object) -> None:
        server.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        wait_http(f"http://{host}:{port}/health", 300, server)
        print(
            f"her2exp-server: MLflow on http://{host}:{port} (backend {backend}, artifacts "
            f"{artifacts}); runs: tracking=server tracking.uri=http://{host}:{port}",
            flush=True,
        )
        return server.wait()
    except (RuntimeError, TimeoutError) as exc:
        print(f"her2exp-server: {exc}", file=sys.stderr)
        server.terminate()
        return 1
    finally:
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        if cluster is not None:
            cluster.stop()
