"""Shared fixtures: Hydra composition as the CLI does it, and one real smoke run through the CLI.

The smoke run (experiment=smoke into a temporary SQLite MLflow store) is trained once per session
and shared by every test that inspects what a run leaves behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
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


_STORE_TEMPLATE: list[Path] = []  # one empty MLflow SQLite store per session, made on first use


def mlflow_store(path: Path) -> Path:
    """Put an empty MLflow SQLite store at `path` (absent), copied from one made per session.

    Why: a new store runs all of MLflow's schema migrations (5-15 s on the test machine); a copy
    is the same database at the same schema head, as the run would have created it. Only for
    tests whose claim is not the store's creation (those let the command create it).
    """
    import shutil
    import tempfile

    if not _STORE_TEMPLATE:
        import mlflow

        template = Path(tempfile.mkdtemp(prefix="her2exp-store-")) / "mlflow.db"
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
        _STORE_TEMPLATE.append(template)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert not path.exists(), f"{path} exists: mlflow_store only makes a new store"
    shutil.copyfile(_STORE_TEMPLATE[0], path)
    return path


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


@dataclass
class SmokeRun:
    cwd: Path
    run_dir: Path
    uri: str
    run_id: str
    stdout: str
    stderr: str
    created: tuple[str, ...] = ()  # what the run left in its cwd (before other tests use it)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    cwd = tmp_path_factory.mktemp("smoke")
    run_dir = cwd / "run"
    # The one smoke run whose report draws its figures (the tests of figures read them).
    args = ["experiment=smoke", "tracking.log_model=true", "evaluation.figures=true"]
    args.append(f"hydra.run.dir={run_dir}")
    proc = run_cli(args, cwd=cwd)
    assert proc.returncode == 0, f"smoke run failed:\n{proc.stdout}\n{proc.stderr}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("her2exp: MLflow run "))
    run_id = line.split()[3]
    uri = f"sqlite:///{cwd}/mlflow.db"
    created = tuple(sorted(os.listdir(cwd)))
    return SmokeRun(cwd, run_dir, uri, run_id, proc.stdout, proc.stderr, created)


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


@pytest.fixture(scope="session")
def cv_sweep(tmp_path_factory: pytest.TempPathFactory) -> SweepRun:
    """One real 3-fold CLI multirun of experiment=smoke (one epoch a fold, checkpoints logged)
    into a SQLite store: the CV parent's pooled results and the ensemble tests read it."""
    import mlflow

    cwd = tmp_path_factory.mktemp("cv_sweep")
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
    return SweepRun(parent.info.run_id, uri, sweep_dir, [r.info.run_id for r in ordered])


@pytest.fixture(scope="session")
def feature_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache for the session (`model.feature_cache_dir=`): a frozen backbone's tile
    embeddings are computed once and reused by every test that trains on the same images."""
    return tmp_path_factory.mktemp("feature_cache")
