"""Issue 30, item 4: a refused command line changes nothing of a run directory and creates none.

hydra_command (her2exp/cli/common.py) composes the command line and runs the command's checks
(her2exp-train's run-directory plan included) before Hydra's main creates the run directory and
writes `.hydra/` and the job log there.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from conftest import SmokeRun, copy_store, run_cli


def snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every file and folder under `folder`: its bytes (None for a folder) and mtime."""
    out = {}
    for path in sorted(folder.rglob("*")):
        data = path.read_bytes() if path.is_file() else None
        out[str(path.relative_to(folder))] = (data, path.stat().st_mtime_ns)
    return out


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("her2exp: "), err
    assert "Traceback" not in err, err
    return lines[0]


def test_a_refused_resume_leaves_the_earlier_run_as_it_was(
    smoke_run: SmokeRun, tmp_path: Path
) -> None:
    """The real console script, a real store: a resume that changes the experiment is refused
    (rundir.plan) before Hydra rewrites the run's `.hydra/` (cross-validation reads its
    overrides.yaml) or appends to its log; a killed attempt's stale temporary file stays too."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run.run_dir, run)
    copy_store(Path(smoke_run.uri.removeprefix("sqlite:///")), tmp_path / "mlflow.db")
    (run / "checkpoints" / ".last.pt.tmp").write_bytes(b"a killed attempt's write")
    before, entries = snapshot(tmp_path), sorted(p.name for p in tmp_path.iterdir())
    lr = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["trainer"]["lr"]
    args = ["experiment=smoke", f"hydra.run.dir={run}", "trainer.resume=auto"]
    proc = run_cli([*args, f"trainer.lr={lr * 10}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "was trained with another experiment; changed: trainer.lr" in one_line(proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == entries
    assert snapshot(tmp_path) == before  # .hydra/*, train.log, the store: same bytes, mtimes


def run_main(module: str, argv: list[str], monkeypatch, capsys) -> tuple[object, str, str]:
    """A command's main() in this process, as its console script calls it."""
    import importlib

    monkeypatch.setattr(sys, "argv", [f"her2exp-{module}", *argv])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    main = importlib.import_module(f"her2exp.cli.{module}").main
    try:
        code: object = main()
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("module", "argv", "expected"),
    [
        ("train", ["experiment=smoke", "trainer.lr=-1"], "trainer.lr=-1.0 is not allowed"),
        ("train", ["experiment=smoke", "model.name=resnet181"], "is not a timm model"),
        ("train", ["experiment=smoke", "tracking.uri=sqlite:////proc/x.db"], "cannot be used"),
        ("eval", ["run_id=x", "evaluation.n_boot=-1"], "evaluation.n_boot=-1 is not allowed"),
        ("eval", ["run_id=x", "checkpoint=/no/best.pt"], "give exactly one of run_id"),
    ],
)
def test_a_refused_command_line_creates_no_run_directory(
    module: str, argv: list[str], expected: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "new"
    code, _, err = run_main(module, [*argv, f"hydra.run.dir={run}"], monkeypatch, capsys)
    assert code == 2 and expected in one_line(err)
    assert not any(tmp_path.iterdir()), "a refused command left a directory behind"


def test_an_earlier_runs_checkpoint_without_resume_is_refused_before_hydra_writes(
    smoke_run: SmokeRun, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(smoke_run.run_dir, run)
    before = snapshot(run)
    argv = ["experiment=smoke", "tracking=off", f"hydra.run.dir={run}"]
    code, _, err = run_main("train", argv, monkeypatch, capsys)
    assert code == 2 and "holds the checkpoint" in one_line(err)
    assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_flags_that_show_something_pass_through(tmp_path: Path, monkeypatch, capsys) -> None:
    """--cfg shows the config as given, without the checks (nor a run directory)."""
    monkeypatch.chdir(tmp_path)
    argv = ["--cfg", "job", "trainer.lr=-1", f"hydra.run.dir={tmp_path / 'x'}"]
    code, out, _ = run_main("train", argv, monkeypatch, capsys)
    assert code is None and "lr: -1" in out
    assert not any(tmp_path.iterdir())


def test_an_accepted_run_still_records_its_command_in_hydra(smoke_run: SmokeRun) -> None:
    hydra = smoke_run.run_dir / ".hydra"
    assert sorted(p.name for p in hydra.iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]
    overrides = yaml.safe_load((hydra / "overrides.yaml").read_text())
    assert "experiment=smoke" in overrides
    assert f"output_dir: {smoke_run.run_dir}" in (hydra / "hydra.yaml").read_text()
    assert (smoke_run.run_dir / "train.log").is_file()


def test_eval_into_a_training_runs_directory_is_refused_before_hydra_writes(
    smoke_run: SmokeRun, tmp_path: Path, monkeypatch, capsys
) -> None:
    """her2exp-eval writes its own reports/ and .hydra/: pointed at a training run's directory
    (hydra.run.dir=<the run>) it would replace the run's summary, predictions and model card.
    Refused before Hydra writes; the library entry refuses it too."""
    from conftest import eval_config
    from her2exp import evaluation
    from her2exp.config import ConfigError

    run = tmp_path / "run"
    shutil.copytree(smoke_run.run_dir, run)
    before = snapshot(run)
    best = run / "checkpoints" / "best.pt"
    argv = [f"checkpoint={best}", "split=test", "tracking.backend=off", f"hydra.run.dir={run}"]
    code, _, err = run_main("eval", argv, monkeypatch, capsys)
    assert code == 2
    assert f"output directory {run} holds a training run (checkpoints" in one_line(err)
    with pytest.raises(ConfigError, match="would replace its reports/ and .hydra/"):
        evaluation.evaluate_cohort(eval_config([f"checkpoint={best}", "split=test"], run))
    assert snapshot(run) == before
