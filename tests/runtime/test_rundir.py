"""RunDir: the run directory's layout, spelled out in one place (her2exp/runtime/rundir.py).

A real trained run (the session's smoke run) is checked against it, on disk and in MLflow, and
the source tree is read so that the file names stay spelled out there alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mlflow

from conftest import SmokeRun
from her2exp.runtime.rundir import ARTIFACTS, HYDRA_ARTIFACT, RunDir, artifact

PACKAGE = Path(__file__).resolve().parents[2] / "her2exp"


def test_a_trained_run_holds_every_path_rundir_names(smoke_run: SmokeRun) -> None:
    """What a finished, tracked run leaves is where RunDir says; what only an offline, resumed
    or stain-normalised run leaves is absent."""
    run = RunDir(smoke_run.run_dir)
    for folder in (run.root, run.checkpoints, run.reports, run.hydra):
        assert folder.is_dir(), folder
    for path in (
        run.last,
        run.best,
        run.best_json,
        run.summary_md,
        run.config_resolved,
        run.mlflow_run,
        run.hydra_config,
        run.hydra_overrides,
        run.report("predictions_test.csv"),
    ):
        assert path.is_file(), path
    for path in (run.mlflow_buffer, run.mlflow_model_deferred, run.stain_reference):
        assert not path.exists(), path  # the smoke run reached its store and has no Macenko step
    assert set(run.run_outputs) == {
        run.checkpoints,
        run.reports,
        run.mlflow_run,
        run.mlflow_model_deferred,
    }


def test_the_runs_artifacts_have_the_same_layout(smoke_run: SmokeRun) -> None:
    """The artifact paths come from the same names: every one RunDir gives is in the run."""
    client = mlflow.MlflowClient(tracking_uri=smoke_run.uri)

    def listed(folder: str | None = None) -> set[str]:
        return {a.path for a in client.list_artifacts(smoke_run.run_id, folder)}

    top = listed()
    assert {artifact(ARTIFACTS.config_resolved), artifact(ARTIFACTS.reports), HYDRA_ARTIFACT} <= top
    assert artifact(ARTIFACTS.best) in listed(artifact(ARTIFACTS.checkpoints))
    reports = listed(artifact(ARTIFACTS.reports))
    assert {artifact(ARTIFACTS.best_json), artifact(ARTIFACTS.summary_md)} <= reports
    assert artifact(ARTIFACTS.best) == "checkpoints/best.pt"  # what older runs' readers fetch


def test_a_checkpoint_names_its_run_directory(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert RunDir.of_checkpoint(run.best) == RunDir(run.root.resolve())
    loose = tmp_path / "elsewhere" / "model.pt"  # a checkpoint copied out of its run
    assert RunDir.of_checkpoint(loose).root == loose.parent.resolve()


# -- the names are spelled out once ----------------------------------------------------------
NAMES = ("best.pt", "last.pt", "config_resolved.yaml", "mlflow_run.json", "best.json")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (module, class, function)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _path_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants naming one of NAMES as a path: the whole string, or its last component
    (`x/best.pt`). f-strings are messages (their constant parts are skipped); so is prose that
    merely mentions a file ("no such file (a last.pt, or auto)")."""
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            last = node.value.rsplit("/", 1)[-1]
            if last in NAMES:
                found.append((node.lineno, node.value))
    return found


def test_the_run_directorys_file_names_are_spelled_out_in_rundir_only() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "runtime" / "rundir.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(PACKAGE.parent)
        offenders += [f"{rel}:{line}: {value!r}" for line, value in _path_strings(tree)]
    assert not offenders, "use her2exp.runtime.rundir.RunDir (or ARTIFACTS):\n" + "\n".join(
        offenders
    )


def test_the_check_finds_a_path_string() -> None:
    """The check above can fail: a path built from the name is found, a message is not."""
    tree = ast.parse(
        '"""best.pt"""\n'
        'a = run / "checkpoints" / "best.pt"\n'
        'b = "checkpoints/last.pt"\n'
        'c = f"{run}/best.json is missing"\n'
        'd = "no such file (a last.pt, or auto)"\n'
    )
    assert sorted(v for _, v in _path_strings(tree)) == ["best.pt", "checkpoints/last.pt"]


def test_hydras_runtime_config_is_read_in_one_place() -> None:
    """HydraConfig is imported by runtime/hydra_run.py alone, and `HydraRun.current()` is called
    only at the entry of the two commands whose runs record their command line (her2exp-train,
    her2exp-eval); everything below takes the HydraRun it is handed (her2exp-rerun hands none:
    its run records the original's overrides, not `her2exp-rerun run_id=...`)."""
    importers, readers = set(), set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "hydra.core.hydra_config":
                importers.add(path.relative_to(PACKAGE.parent))
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "HydraRun.current":
                readers.add(path.relative_to(PACKAGE.parent))
    assert importers == {Path("her2exp/runtime/hydra_run.py")}
    assert readers == {Path("her2exp/cli/train.py"), Path("her2exp/cli/eval.py")}
