"""The one model of a sweep (`her2exp.tracking.sweep_model`): one classification for the sweep
callback's summary and the ensemble, the same from MLflow and from the run directories; a
hyper-parameter grid refused as an ensemble by `her2exp-eval`'s main (sys.argv in this process),
before any checkpoint; and, read from the source, one definition of the classification and
MLflow imported only in her2exp/tracking."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from conftest import REPO, SweepRun, mlflow_store, run_cli
from her2exp.tracking.sweep import client_for, finished_children, sweep_children
from her2exp.tracking.sweep_model import SweepChild, not_an_ensemble, sweep_kind

PACKAGE = REPO / "her2exp"


def child(job: int, **params: object) -> SweepChild:
    """A record as MLflow holds it: every value a string, null as 'None'."""
    base = {"seed": 1, "data.split_seed": 0, "data.data_seed": 0, "data.split.fold": None}
    base |= {"probe.name": "none", "trainer.lr": 0.001, "output_dir": f"/sweep/{job}"}
    return SweepChild(job, f"run{job}", {k: str(v) for k, v in (base | params).items()})


def test_the_one_classification_of_records() -> None:
    folds = [child(k, **{"data.split.fold": k, "data.split.folds": 3}) for k in range(3)]
    assert sweep_kind(folds) == "cv"
    assert sweep_kind([child(0, seed=1), child(1, seed=2)]) == "repeat"
    grid = [child(0, **{"trainer.lr": 0.001}), child(1, **{"trainer.lr": 0.003})]
    assert sweep_kind(grid) == "plain"
    probes = [child(j, seed=j, **{"probe.name": "linear"}) for j in range(2)]
    assert sweep_kind(probes) == "leaderboard"
    backbones = [child(j, seed=j % 2, **{"model.name": f"m{j // 2}"}) for j in range(4)]
    assert sweep_kind(backbones) == "leaderboard"  # two settings, each repeated over seeds
    assert sweep_kind([child(0)]) == "plain"


def test_only_seeds_or_folds_make_an_ensemble() -> None:
    assert not_an_ensemble([child(0, seed=1), child(1, seed=2)]) is None
    assert not_an_ensemble([child(0)]) is None  # one member: its own mean
    grid = [child(0, **{"trainer.lr": 0.001}), child(1, **{"trainer.lr": 0.003})]
    assert not_an_ensemble(grid) == (
        "its children differ in trainer.lr, not only in seeds or folds: a hyper-parameter "
        "grid (plain sweep), not an ensemble"
    )
    probes = [child(j, seed=j, **{"probe.name": "knn"}) for j in range(2)]
    assert "leaderboard" in str(not_an_ensemble(probes))


def test_mlflow_and_the_run_directories_classify_the_cv_sweep_alike(cv_sweep: SweepRun) -> None:
    client = client_for(cv_sweep.uri)
    tracked = finished_children(client, cv_sweep.parent_run_id, cv_sweep.uri, cv_sweep.sweep_dir)
    on_disk = sweep_children(cv_sweep.sweep_dir)  # the view with tracking off
    assert sweep_kind(tracked) == sweep_kind(on_disk) == "cv"
    assert [c.run_id for c in tracked] == cv_sweep.child_run_ids  # in job order
    assert [(c.job, c.run_id, c.fold, c.run_dir) for c in tracked] == [
        (c.job, c.run_id, c.fold, c.run_dir) for c in on_disk
    ]
    listed = sweep_children(cv_sweep.sweep_dir, client, cv_sweep.parent_run_id)
    assert listed == tracked
    for mine, theirs in zip(tracked, on_disk, strict=True):  # the same strings, key by key
        shared = set(mine.params) & set(theirs.params)
        assert len(shared) > 0.9 * len(mine.params)
        assert {k: mine.params[k] for k in shared} == {k: theirs.params[k] for k in shared}


@pytest.fixture(scope="module")
def lr_grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A real two-point learning-rate grid (`her2exp-train -m trainer.lr=...`, one epoch, no
    checkpoints logged: an ensemble of it could not even load its members) into SQLite."""
    cwd = tmp_path_factory.mktemp("lr_grid")
    mlflow_store(cwd / "mlflow.db")
    args = ["-m", "experiment=smoke", "trainer.epochs=1", "trainer.lr=0.001,0.003"]
    args += ["tracking.log_model=false", "tracking.log_checkpoint=false", "evaluation.n_boot=0"]
    args += ["data.n_patients=12", "data.patches_per_patient=6"]  # a grid of any size is refused
    proc = run_cli([*args, f"hydra.sweep.dir={cwd / 'sweep'}"], cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    exp = client.get_experiment_by_name("her2exp")
    (parent,) = client.search_runs([exp.experiment_id], "tags.sweep = 'parent'")
    return cwd, parent.info.run_id


def test_her2exp_eval_refuses_a_grid_as_an_ensemble(
    lr_grid: tuple[Path, str], monkeypatch, capsys
) -> None:
    """her2exp-eval's main() in this process, as its console script calls it (sys.argv, the
    cwd): the path from the command line to the one line is the script's; an interpreter start
    would cost seconds (test_cli's real scripts prove the same exit 2 and one line)."""
    from her2exp.cli.eval import main

    cwd, parent = lr_grid
    args = [f"sweep_run_id={parent}", f"tracking.uri=sqlite:///{cwd}/mlflow.db"]
    args += ["data.n_patients=8", "data.patches_per_patient=6", "evaluation.n_boot=0"]
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["her2exp-eval", *args, f"output_dir={cwd / 'eval'}"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.strip() == (
        f"her2exp: sweep_run_id={parent!r}: its children differ in trainer.lr, not only in "
        "seeds or folds: a hyper-parameter grid (plain sweep), not an ensemble; evaluate one "
        "child with run_id="
    )
    assert not (cwd / "eval").exists()


def test_her2exp_predict_refuses_a_grid_as_an_ensemble(lr_grid: tuple[Path, str], tmp_path) -> None:
    """predict's sweep_run_id= takes the same road (evaluation.ensemble.load_ensemble)."""
    from PIL import Image

    from her2exp.apps.predict import predict_folder
    from her2exp.cli.common import compose
    from her2exp.config import ConfigError

    cwd, parent = lr_grid
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32), (180, 120, 160)).save(tmp_path / "in" / "p.png")
    opts = compose("predict", [f"sweep_run_id={parent}", f"tracking.uri=sqlite:///{cwd}/mlflow.db",
                               f"input={tmp_path / 'in'}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"differ in trainer\.lr.*not an ensemble"):
        predict_folder(opts)


# --- read from the source ----------------------------------------------------------------------

#: Modules outside her2exp/tracking that import mlflow, and why they may.
MLFLOW_ELSEWHERE = {
    "serving_model.py": "the model-from-code file MLflow copies into every logged model",
    "bench/": "make bench times the served model through MLflow itself",
}


def modules() -> list[tuple[str, ast.Module]]:
    return [
        (p.relative_to(PACKAGE).as_posix(), ast.parse(p.read_text()))
        for p in sorted(PACKAGE.rglob("*.py"))
    ]


def test_the_sweep_is_classified_in_one_place() -> None:
    defined = [
        (name, node.name)
        for name, tree in modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and ("sweep_kind" in node.name or node.name == "not_an_ensemble")
    ]
    assert defined == [
        ("tracking/sweep_model.py", "sweep_kind"),
        ("tracking/sweep_model.py", "not_an_ensemble"),
    ]


def test_mlflow_is_imported_only_in_tracking() -> None:
    found = set()
    for name, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            if "mlflow" in roots and not name.startswith("tracking/"):
                found.add(name)
    allowed = {n for n in found if any(n.startswith(a) for a in MLFLOW_ELSEWHERE)}
    assert found - allowed == set()
    assert {"evaluation/ensemble.py", "apps/compare.py", "apps/export.py"}.isdisjoint(found)
