"""Progress bars (her2exp.core.progress): a long step draws its bar on stderr, on rank 0 only,
one switch turns every bar off, a log gets no line from a step of seconds, and tqdm is drawn
from that one module only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import SmokeRun, eval_config
from her2exp import evaluation
from her2exp.core import progress

PACKAGE = Path(__file__).resolve().parents[2] / "her2exp"


def test_scoring_a_cohort_draws_its_bar_on_rank_0_unless_switched_off(
    smoke_run: SmokeRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """her2exp-eval's scoring of a cohort, in-process: in a log (capsys: not a TTY) nothing for
    a step of seconds; with the log interval at 0 one plain line per refresh on stderr (no
    carriage return or cursor move), nothing on stdout; nothing with HER2EXP_PROGRESS=0, on
    rank 1, or inside `quiet` (trainer.progress=false)."""
    ckpt = smoke_run.run_dir / "checkpoints" / "best.pt"
    cohort_args = [f"checkpoint={ckpt}", "data.n_patients=4", "data.patches_per_patient=4"]
    run, _, cohort = evaluation.prepare_evaluation(eval_config(cohort_args, tmp_path))
    scorer = evaluation.build_scorer(run)
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)

    def drawn() -> str:
        capsys.readouterr()
        evaluation.score_cohort(scorer, cohort)
        printed = capsys.readouterr()
        assert printed.out == ""
        return printed.err

    assert drawn() == ""  # a log: a step under a minute writes nothing
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    err = drawn()
    assert "scoring external: 100% 1/1 [" in err, err
    assert "\r" not in err and "\x1b" not in err
    monkeypatch.setenv(progress.ENV, "0")
    assert drawn() == ""
    monkeypatch.setenv(progress.ENV, "1")
    with progress.quiet(True):
        assert drawn() == ""
    with progress.quiet(False):
        assert "scoring external" in drawn()
    monkeypatch.setenv("RANK", "1")
    assert drawn() == ""


def test_tqdm_is_imported_in_one_module_only() -> None:
    """Every bar goes through core.progress, so its rules (rank 0, stderr, the switch, log
    lines) hold for each; a direct `tqdm(...)` elsewhere would escape them."""
    importers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(n == "tqdm" or n.startswith("tqdm.") for n in names):
                importers.append(str(path.relative_to(PACKAGE)))
    assert importers == ["core/progress.py"]
