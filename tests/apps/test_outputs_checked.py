"""Nothing of a finished run lost (issue 30): an output the command cannot write, or a look-up
that finds nothing, is refused in one line (exit 2) before any work and before any file is
written: her2exp-tile, -predict and -export check every output location first, and
her2exp-compare refuses a sweep id that is not there instead of writing an empty table."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

from conftest import BIN, SmokeRun, copy_store


def cli(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / f"her2exp-{name}"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The refusal: exit 2, one `her2exp: ...` line on stderr, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("her2exp: "), proc.stderr
    return lines[0]


# -- her2exp-compare: a sweep id that is not there -----------------------------------------------
def test_compare_refuses_a_sweep_id_that_is_not_there(smoke_run: SmokeRun, tmp_path: Path) -> None:
    db = copy_store(Path(smoke_run.uri[len("sqlite:///") :]), tmp_path / "mlflow.db")
    with closing(sqlite3.connect(db)) as con, con:  # compare's default experiment (an
        con.execute("UPDATE experiments SET name = 'her2exp' WHERE name = 'smoke'")  # override
    uri = f"sqlite:///{db}"  # experiment=smoke is taken for the config group of that name)
    out = tmp_path / "compare.csv"
    out.write_text("an earlier table\n")
    base = [f"tracking.uri={uri}", f"out={out}"]
    line = one_line(cli("compare", [*base, "sweep=0123456789abcdef"], tmp_path))
    assert "sweep=0123456789abcdef: no such run in experiment 'her2exp'" in line
    # A run that is there but is no sweep's parent (the smoke run has no children).
    line = one_line(cli("compare", [*base, f"sweep={smoke_run.run_id}"], tmp_path))
    assert f"sweep={smoke_run.run_id}: run has no child runs" in line
    assert out.read_text() == "an earlier table\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.csv", "mlflow.db"]
