"""Shared fixtures: Hydra composition as the CLI does it, and one real smoke run through the CLI.

The smoke run (experiment=smoke into a temporary SQLite MLflow store) is trained once per session
and shared by every test that inspects what a run leaves behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

# One intra-op thread per process, set before torch is imported here or in any subprocess the
# tests start (her2exp-train, torchrun, the in-process elastic launch, mlflow server): the suite
# runs on 2 cores, often with 2 DDP workers, and PyTorch's default (one thread per core, per
# process) oversubscribes them; the toy models gain nothing from a second thread. torchrun alone
# already sets this for its workers. A value the caller exported is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
BIN = Path(sys.executable).parent


def compose_train(overrides: list[str] | None = None, output_dir: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml exactly as `her2exp-train` would, minus Hydra's run directory."""
    import her2exp.training.run  # noqa: F401 - registers the structured schema

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides or [])
    if output_dir is not None:
        with open_dict(cfg):
            cfg.output_dir = str(output_dir)
    return cfg


def eval_config(overrides: list[str], out: Path):
    """conf/eval.yaml as her2exp-eval composes it, MLflow logging off, reports under `out`."""
    from her2exp.cli.common import compose as compose_command

    cfg = compose_command("eval", ["tracking.backend=off", *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def checkpoint_with(smoke_run: SmokeRun, tmp_path: Path, **changes: object) -> Path:
    """The smoke run's best.pt as if it had been trained with `changes` (dotted keys)."""
    from omegaconf import OmegaConf

    from her2exp.core import checkpoint

    state = checkpoint.load(smoke_run.run_dir / "checkpoints" / "best.pt")
    cfg = OmegaConf.create(state["config"])
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    state["config"] = OmegaConf.to_yaml(cfg)
    return checkpoint.save(state, tmp_path / "best.pt")


_ROOT: list[Path] = []  # the session's shared temporary folder, set by `_session_root`


@pytest.fixture(scope="session", autouse=True)
def _session_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Record the session's temporary folder that every xdist worker sees (each worker's own
    basetemp is a `popen-gwN` folder inside it; without xdist it is the basetemp itself)."""
    root = tmp_path_factory.getbasetemp()
    _ROOT[:] = [root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root]


def built_once(name: str, build: Callable[[Path], dict]) -> dict:
    """`build(folder)` run once per session however many xdist workers ask, its JSON result
    read back by the others.

    Why: `make test` runs on two workers, and a session fixture is otherwise built by each
    worker that uses it (a trained run, a sweep, a migrated store: CPU time on the same two
    cores). The first worker to ask builds under a file lock while the other waits; a build
    that failed leaves no result, so the next worker to ask builds again (and fails with its
    own message).
    """
    from filelock import FileLock

    result = _ROOT[0] / f"{name}.json"
    with FileLock(f"{result}.lock"):
        if not result.is_file():
            folder = _ROOT[0] / name
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            value = build(folder)
            partial = result.with_suffix(".part")
            partial.write_text(json.dumps(value, default=str))
            partial.replace(result)
        return json.loads(result.read_text())


def _empty_store(folder: Path) -> dict:
    import mlflow

    template = folder / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
    return {"path": str(template)}


def mlflow_store(path: Path) -> Path:
    """Put an empty MLflow SQLite store at `path` (absent), copied from one made per session.

    Why: a new store runs all of MLflow's schema migrations (5-15 s on the test machine); a copy
    is the same database at the same schema head, as the run would have created it. Only for
    tests whose claim is not the store's creation (those let the command create it).
    """
    template = Path(built_once("store_template", _empty_store)["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    assert not path.exists(), f"{path} exists: mlflow_store only makes a new store"
    shutil.copyfile(template, path)
    return path


def copy_store(source: Path, target: Path) -> Path:
    """A consistent copy of a SQLite store that another worker may be writing to (SQLite's
    online backup, not a file copy that could catch a transaction half written)."""
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
    return target


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed `her2exp-train` console script the way the README tells a user to."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [str(BIN / "her2exp-train"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# The files whose tests start several training processes each (DDP workers, torchrun nodes,
# a reference run beside a broken one, MLflow servers): about half of the suite's time. Two of
# them side by side put 4-5 processes on the test machine's 2 cores and each runs ~30% slower,
# so `make test` (`--dist loadfile`) hands them to one xdist worker as one unit, collected
# first, while the other worker runs the in-process and single-process files. Measured with
# `pytest -v` through a clock: 92-123 s each alone beside light tests.
MULTI_PROCESS_FILES = (
    "tests/training/test_fault_tolerance.py",
    "tests/runtime/test_distributed.py",
    "tests/tracking/test_tracking.py",
    "tests/tracking/test_team_scale.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The multi-process files first, so their unit is the first a worker takes (a stable sort:
    everything else keeps its order)."""
    items.sort(key=lambda item: item.nodeid.split("::", 1)[0] not in MULTI_PROCESS_FILES)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadfile` with MULTI_PROCESS_FILES as one unit (see above); other modes as xdist
    has them."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class MultiProcessFilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "multi-process files" if path in MULTI_PROCESS_FILES else path

    return MultiProcessFilesTogether(config, log)


@dataclass
class SmokeRun:
    cwd: Path
    run_dir: Path
    uri: str
    run_id: str
    stdout: str
    stderr: str
    created: tuple[str, ...] = ()  # what the run left in its cwd (before other tests use it)


def _smoke_run(cwd: Path) -> dict:
    run_dir = cwd / "run"
    # The one smoke run whose report draws its figures (the tests of figures read them).
    args = ["experiment=smoke", "tracking.log_model=true", "evaluation.figures=true"]
    args.append(f"hydra.run.dir={run_dir}")
    proc = run_cli(args, cwd=cwd)
    assert proc.returncode == 0, f"smoke run failed:\n{proc.stdout}\n{proc.stderr}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("her2exp: MLflow run "))
    uri = f"sqlite:///{cwd}/mlflow.db"
    created = tuple(sorted(os.listdir(cwd)))
    return asdict(SmokeRun(cwd, run_dir, uri, line.split()[3], proc.stdout, proc.stderr, created))


@pytest.fixture(scope="session")
def smoke_run(_session_root: None) -> SmokeRun:
    """One real `her2exp-train experiment=smoke` (SQLite store, figures drawn, model logged),
    trained once for the whole session and read by every test of what a run leaves behind."""
    got = built_once("smoke", _smoke_run)  # SmokeRun's fields, as JSON
    paths = {"cwd": Path(got["cwd"]), "run_dir": Path(got["run_dir"])}
    return SmokeRun(**got | paths | {"created": tuple(got["created"])})


@pytest.fixture(scope="session")
def slide_cohort(tmp_path_factory: pytest.TempPathFactory):
    """Six small embedded slides (768 x 1024 px at 0.5 um/px, deflate tiles), written once and
    shared by every slide test, with the level-0 pixels they were written from."""
    from her2exp.data.synthetic_slides import make_cohort

    folder = tmp_path_factory.mktemp("slides")
    return folder, make_cohort(folder, n_slides=6, shape=(768, 1024), cell=128, keep_images=True)


@pytest.fixture(scope="session")
def tiled_slides(slide_cohort, tmp_path_factory: pytest.TempPathFactory):
    """The six slides tiled once by `her2exp-tile` (128 px tiles at 0.5 um/px, one per rendered
    tissue cell): (slide folder, cohort, tile output folder). Tests copy it before changing it."""
    from her2exp.cli.common import compose
    from her2exp.cli.tile import main

    folder, cohort = slide_cohort
    out = tmp_path_factory.mktemp("tiled") / "tiles"
    table = folder / "slides.csv"
    main(compose("tile", [f"slide_table={table}", f"out={out}", "tiles.size=128"]))
    return folder, cohort, out


@pytest.fixture(scope="session")
def slides_run(tiled_slides, tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    """One real `her2exp-train data=slides` under DDP (2 gloo processes), tiles read lazily
    from the slides and resized to 32 px; shared by every test of training on slides."""
    _, _, tiles = tiled_slides
    cwd = tmp_path_factory.mktemp("slides_run")
    run_dir = cwd / "run"
    args = ["experiment=smoke", "data=slides", f"data.path={tiles / 'tiles.parquet'}"]
    args += ["data.image_size=32", "data.num_workers=0", "trainer.nproc_per_node=2"]
    args += ["trainer.epochs=1", "tracking.log_checkpoint=false"]
    mlflow_store(cwd / "mlflow.db")
    proc = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=cwd)
    assert proc.returncode == 0, f"slides run failed:\n{proc.stdout}\n{proc.stderr}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("her2exp: MLflow run "))
    uri = f"sqlite:///{cwd}/mlflow.db"
    return SmokeRun(cwd, run_dir, uri, line.split()[3], proc.stdout, proc.stderr)


@dataclass
class SweepRun:
    parent_run_id: str
    uri: str
    sweep_dir: Path
    child_run_ids: list[str]


def _cv_sweep(cwd: Path) -> dict:
    import mlflow

    sweep_dir = cwd / "sweep"
    args = ["-m", "experiment=smoke", "data.split.folds=3", "data.split.fold=range(3)"]
    args += ["tracking.log_checkpoint=true", "trainer.epochs=1", f"hydra.sweep.dir={sweep_dir}"]
    proc = run_cli(args, cwd=cwd, timeout=900)
    assert proc.returncode == 0, f"cv sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    uri = f"sqlite:///{cwd}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("her2exp")
    (parent,) = client.search_runs([exp.experiment_id], "tags.sweep = 'parent'")
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    ordered = sorted(children, key=lambda r: int(r.data.tags["sweep.job_num"]))
    return asdict(SweepRun(parent.info.run_id, uri, sweep_dir, [r.info.run_id for r in ordered]))


@pytest.fixture(scope="session")
def cv_sweep(_session_root: None) -> SweepRun:
    """One real 3-fold CLI multirun of experiment=smoke (one epoch a fold, checkpoints logged)
    into a SQLite store, run once for the session: the CV parent's pooled results and the
    ensemble tests read it."""
    got = built_once("cv_sweep", _cv_sweep)  # SweepRun's fields, as JSON
    return SweepRun(**got | {"sweep_dir": Path(got["sweep_dir"])})


@pytest.fixture(scope="session")
def feature_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache for the session (`model.feature_cache_dir=`): a frozen backbone's tile
    embeddings are computed once and reused by every test that trains on the same images."""
    return tmp_path_factory.mktemp("feature_cache")
