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

import pytest

from conftest import BIN, SmokeRun, copy_store
from her2exp.config.commands import validate_only
from her2exp.core.errors import UserError


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
def test_compare_refuses_a_sweep_id_that_is_not_there(
    smoke_run: SmokeRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    db = copy_store(Path(smoke_run.uri[len("sqlite:///") :]), tmp_path / "mlflow.db")
    with closing(sqlite3.connect(db)) as con, con:  # compare's default experiment (an
        con.execute("UPDATE experiments SET name = 'her2exp' WHERE name = 'smoke'")  # override
    uri = f"sqlite:///{db}"  # experiment=smoke is taken for the config group of that name)
    out = tmp_path / "compare.csv"
    out.write_text("an earlier table\n")
    base = [f"tracking.uri={uri}", f"out={out}"]
    line = one_line(cli("compare", [*base, "sweep=0123456789abcdef"], tmp_path))
    assert "sweep=0123456789abcdef: no such run in experiment 'her2exp'" in line
    # In-process from here (the command's own main, as the console script calls it): a run
    # that is there but is no sweep's parent (the smoke run has no children), an out= under a
    # file.
    from her2exp.cli.compare import main

    def in_process(args: list[str]) -> str:
        monkeypatch.setattr("sys.argv", ["her2exp-compare", *args])
        with pytest.raises(SystemExit) as exited:
            main()
        err = capsys.readouterr().err.strip()
        assert exited.value.code == 2 and err.count("\n") == 0, err
        return err

    line = in_process([*base, f"sweep={smoke_run.run_id}"])
    assert f"sweep={smoke_run.run_id}: run has no child runs" in line
    line = in_process([f"tracking.uri={uri}", f"out={out}/x.csv"])
    assert line.startswith(f"her2exp: out={out}/x.csv cannot be written: {out} is a file")
    assert out.read_text() == "an earlier table\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.csv", "mlflow.db"]


# -- her2exp-tile, -predict, -export: an output that cannot be written ---------------------------
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("a file, not a folder\n")
    return path


def sources(name: str, smoke_run: SmokeRun, tmp_path: Path) -> list[str]:
    """What each command needs besides out= to reach its output checks (real inputs)."""
    best = smoke_run.run_dir / "checkpoints" / "best.pt"
    if name == "tile":
        table = tmp_path / "slides.csv"
        table.write_text("path,label\nmissing.svs,her2_pos\n")
        return [f"input={table}"]
    if name == "predict":
        patches = tmp_path / "patches"
        patches.mkdir()
        (patches / "p0.png").write_bytes(b"")
        return [f"checkpoint={best}", f"input={patches}"]
    return [f"checkpoint={best}", "log=false"]


BAD_OUTS = ["/proc/her2exp-x.csv", "{file}/x.csv"]


@pytest.mark.parametrize("name", ["tile", "predict", "export"])
@pytest.mark.parametrize("bad", BAD_OUTS)
def test_an_unwritable_out_is_refused_before_any_work(
    smoke_run: SmokeRun, tmp_path: Path, name: str, bad: str
) -> None:
    args = sources(name, smoke_run, tmp_path)
    out = bad.format(file=a_file(tmp_path))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserError) as refusal:
        validate_only(name, [*args, f"out={out}"])
    message = str(refusal.value)
    assert message.startswith(f"out={out} cannot be written: ") and "\n" not in message
    assert "/proc" in message or "is a file, not a folder" in message
    assert sorted(tmp_path.rglob("*")) == before


def test_predict_refuses_an_unwritable_heatmap_folder(smoke_run: SmokeRun, tmp_path: Path) -> None:
    manifest = tmp_path / "tiles.parquet"  # slides: only its existence is checked first
    manifest.write_bytes(b"")
    best = smoke_run.run_dir / "checkpoints" / "best.pt"
    base = [f"checkpoint={best}", f"input={manifest}", f"out={tmp_path / 'p.csv'}"]
    for maps in ("/proc/her2exp-maps", f"{a_file(tmp_path)}/maps", str(a_file(tmp_path))):
        with pytest.raises(UserError, match=r"^heatmaps=.* cannot be written: "):
            validate_only("predict", [*base, f"heatmaps={maps}"])
    # The default folder, <out>_heatmaps beside the table, is checked too.
    with pytest.raises(UserError, match=r"^heatmaps=.*p_heatmaps cannot be written: .* not a"):
        (tmp_path / "p_heatmaps").write_text("a file where the folder goes\n")
        validate_only("predict", base)
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("name", ["tile", "predict", "export"])
def test_the_commands_refuse_an_unwritable_out_in_one_line(
    smoke_run: SmokeRun, tmp_path: Path, name: str
) -> None:
    args = sources(name, smoke_run, tmp_path)
    out = f"{a_file(tmp_path)}/x.csv"
    before = sorted(tmp_path.rglob("*"))
    line = one_line(cli(name, [*args, f"out={out}"], tmp_path))
    assert line.startswith(f"her2exp: out={out} cannot be written: ")
    assert sorted(p for p in tmp_path.rglob("*") if p.name != "outputs") == before
