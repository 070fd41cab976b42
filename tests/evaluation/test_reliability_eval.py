"""Issue 15, "nothing of the user's lost", for her2exp-eval, her2exp-predict and the tracking
store: every user mistake is one `her2exp: ...` line and exit 2 before any work (nothing scored,
no MLflow run, no database created by a look-up); outputs of an earlier run never stay beside
new ones; no silent fallback (thresholds, stain, focal label smoothing).

In-process through each command's main() (a spy on evaluation.score proves nothing was scored);
one real subprocess per command for the exit code; real SQLite stores throughout."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from PIL import Image

from conftest import REPO, SmokeRun, copy_store
from her2exp import evaluation
from her2exp.cli.common import compose
from her2exp.core import checkpoint
from her2exp.data import synthetic
from her2exp.evaluation import cohort
from her2exp.models import losses


# -- helpers -------------------------------------------------------------------------------------
def best_pt(smoke_run: SmokeRun) -> Path:
    return smoke_run.run_dir / "checkpoints" / "best.pt"


def checkpoint_like(smoke_run: SmokeRun, path: Path, changes: dict, drop: tuple = ()) -> Path:
    """The smoke run's best.pt with config `changes` (dotted keys) and state keys `drop`ped."""
    state = checkpoint.load(best_pt(smoke_run))
    cfg = OmegaConf.create(state["config"])
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    state["config"] = OmegaConf.to_yaml(cfg)
    for key in drop:
        state.pop(key)
    return checkpoint.save(state, path)


def command(name: str, overrides: list[str], out: Path | None = None):
    """conf/<name>.yaml as the command composes it (eval: reports under `out`)."""
    cfg = compose(name, overrides)
    if out is not None:
        with open_dict(cfg):
            cfg.output_dir = str(out)
    return cfg


def refused(name: str, cfg, capsys) -> str:
    """Run a command's main(cfg) in-process; it must exit 2 with one `her2exp: ` line."""
    import importlib

    main = importlib.import_module(f"her2exp.cli.{name}").main
    with pytest.raises(SystemExit) as exit_info:
        main(cfg)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("her2exp: ") and err.count("\n") == 1, err
    return err


def cli(name: str, args: list[str], cwd: Path) -> subprocess.Popen:
    """`python -m her2exp.cli.<name>` of this checkout, started (not awaited)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", f"her2exp.cli.{name}", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_exit_2_in_one_line(proc: subprocess.Popen, *needles: str, timeout: int = 60) -> None:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"still running after {timeout} s: {proc.args}") from None
    assert proc.returncode == 2, out[-2000:] + err[-2000:]
    assert err.startswith("her2exp: ") and err.count("\n") == 1, err
    assert all(n in err for n in needles), err


@pytest.fixture
def no_scoring(monkeypatch):
    """evaluation.score (the scoring pass of her2exp-eval) fails the test if it is called:
    patched where score_cohort looks it up (evaluation.cohort) and on the package."""

    def scored(*_args, **_kwargs):
        raise AssertionError("the cohort was scored before the mistake was reported")

    monkeypatch.setattr(evaluation, "score", scored)
    monkeypatch.setattr(cohort, "score", scored)


def store_copy(smoke_run: SmokeRun, folder: Path) -> str:
    """A copy of the smoke run's SQLite store (creating and migrating a new one costs ~7 s);
    use it with a new tracking.experiment, whose artifacts then go beside the copy."""
    copy_store(smoke_run.cwd / "mlflow.db", folder / "copy.db")
    return f"sqlite:///{folder / 'copy.db'}"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def patches(folder: Path, n: int = 3, broken: bool = False) -> Path:
    """A folder of `n` readable PNG patches (and one that is not a PNG if `broken`)."""
    folder.mkdir(parents=True)
    data = synthetic.generate(n_patients=2, patches_per_patient=2, image_size=32, seed=3)
    for i in range(n):
        Image.fromarray(data.images[i]).save(folder / f"p{i}.png")
    if broken:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


# -- 7: her2exp-eval checks before it scores -----------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        ["evaluation.operating_point=nope"],
        ["evaluation.operating_point=sens95", "evaluation.target_sensitivity=0.95"],  # not frozen
    ],
)
def test_eval_refuses_an_unknown_operating_point_before_scoring(
    smoke_run, tmp_path, no_scoring, capsys, overrides
) -> None:
    cfg = command("eval", [f"checkpoint={best_pt(smoke_run)}", "tracking.backend=off", *overrides])
    err = refused("eval", cfg, capsys)
    assert "evaluation.operating_point=" in err


@pytest.mark.parametrize("source", ["checkpoint", "run_id"])
def test_eval_refuses_an_unreachable_server_before_scoring(
    smoke_run, tmp_path, no_scoring, monkeypatch, capsys, source
) -> None:
    # Training's bound on MLflow's own HTTP retries, shortened further for the test.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{closed_port()}"
    given = f"checkpoint={best_pt(smoke_run)}" if source == "checkpoint" else "run_id=abc"
    cfg = command("eval", [given, f"tracking.uri={uri}"], tmp_path / "out")
    err = refused("eval", cfg, capsys)
    assert f"tracking.uri={uri} cannot be reached" in err
    assert not (tmp_path / "out" / "reports").exists()


# -- 8: tracking store faults --------------------------------------------------------------------
def lookup_command(name: str, smoke_run: SmokeRun, uri: str, tmp_path: Path):
    """A command that has to look something up in the store at `uri`."""
    if name == "eval":
        return command("eval", ["run_id=nope", f"tracking.uri={uri}"], tmp_path / "out")
    if name == "predict":
        inputs = patches(tmp_path / "in")
        return command("predict", ["run_id=nope", f"input={inputs}", f"tracking.uri={uri}"])
    if name == "rerun":
        return command("rerun", ["run_id=nope", f"tracking.uri={uri}"])
    return command("compare", [f"tracking.uri={uri}", f"out={tmp_path / 'compare.csv'}"])


LOOKUPS = ["eval", "predict", "compare", "rerun"]


@pytest.mark.parametrize("name", LOOKUPS)
def test_a_look_up_in_a_store_that_is_not_there_creates_nothing(
    smoke_run, tmp_path, monkeypatch, capsys, name
) -> None:
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "typo" / "mlflow.db"
    err = refused(name, lookup_command(name, smoke_run, f"sqlite:///{db}", tmp_path), capsys)
    assert f"tracking.uri=sqlite:///{db} cannot be used: {db} does not exist" in err
    assert not db.parent.exists()  # neither the database nor its folder
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("name", LOOKUPS)
def test_a_file_that_is_not_a_database_is_named_not_a_traceback(
    smoke_run, tmp_path, monkeypatch, capsys, name
) -> None:
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    db.write_text("my notes, not a database\n")
    err = refused(name, lookup_command(name, smoke_run, f"sqlite:///{db}", tmp_path), capsys)
    assert f"tracking.uri=sqlite:///{db} cannot be used: {db} is not an SQLite database" in err
    assert db.read_text() == "my notes, not a database\n"


def test_another_programs_sqlite_database_is_left_alone(tmp_path, capsys) -> None:
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE patients (id TEXT)")
    before = db.read_bytes()
    cfg = command("compare", [f"tracking.uri=sqlite:///{db}", f"out={tmp_path / 'c.csv'}"])
    err = refused("compare", cfg, capsys)
    assert "without MLflow's tables" in err and db.read_bytes() == before


def test_eval_into_an_unwritable_store_fails_before_scoring(
    smoke_run, tmp_path, no_scoring, capsys
) -> None:
    cfg = command("eval", [f"checkpoint={best_pt(smoke_run)}", "tracking.uri=sqlite:////proc/x.db"])
    err = refused("eval", cfg, capsys)
    assert "tracking.uri=sqlite:////proc/x.db cannot be used: cannot create a file in /proc" in err


def test_store_checks_leave_a_good_store_alone(smoke_run, tmp_path) -> None:
    from her2exp import tracking

    assert tracking.store_problem(smoke_run.uri, lookup=True) is None
    assert tracking.store_problem(smoke_run.uri) is None
    new = tmp_path / "new" / "mlflow.db"  # a new store for a training run: MLflow creates it
    assert tracking.store_problem(f"sqlite:///{new}") is None and not new.parent.exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    assert tracking.store_problem(f"sqlite:///{empty}", lookup=True) is None


# -- 9: no stale outputs -------------------------------------------------------------------------
def test_predict_removes_the_errors_file_of_an_earlier_run(smoke_run, tmp_path, capsys) -> None:
    out = tmp_path / "preds.csv"
    errors = tmp_path / "preds.errors.csv"
    ckpt = f"checkpoint={best_pt(smoke_run)}"
    from her2exp.cli.predict import main

    main(command("predict", [ckpt, f"input={patches(tmp_path / 'a', broken=True)}", f"out={out}"]))
    assert errors.is_file()
    again = [ckpt, f"input={patches(tmp_path / 'b', n=2)}", f"out={out}"]
    before = out.read_bytes()
    capsys.readouterr()  # the first run's report of its unreadable file
    err = refused("predict", command("predict", again), capsys)  # no overwrite: kept as it was
    assert f"out={out} exists" in err and "overwrite=true" in err
    assert out.read_bytes() == before and errors.is_file()
    main(command("predict", [*again, "overwrite=true"]))
    assert not errors.exists(), "an errors list about folder a stayed beside folder b's predictions"
    import pandas as pd

    assert all("/b/" in p for p in pd.read_csv(out)["path"])


def test_eval_into_the_same_folder_leaves_no_other_cohorts_reports(smoke_run, tmp_path) -> None:
    import mlflow

    out = tmp_path / "eval"
    small = [f"checkpoint={best_pt(smoke_run)}", "data.n_patients=4", "data.patches_per_patient=4"]
    evaluation.evaluate_cohort(command("eval", [*small, "tracking.backend=off",
                                                 "cohort_name=site1"], out))  # fmt: skip
    assert (out / "reports" / "predictions_site1.csv").is_file()
    uri = store_copy(smoke_run, tmp_path)
    given = [f"tracking.uri={uri}", "tracking.experiment=again", "cohort_name=site2"]
    second = command("eval", [*small, *given], out)
    run_id = evaluation.evaluate_cohort(second)["mlflow_run_id"]
    left = sorted(p.name for p in (out / "reports").iterdir())
    assert not [n for n in left if "site1" in n], left
    assert {"predictions_site2.csv", "confusion_site2.png", "false_negatives_site2.png"} <= set(
        left
    )
    uploaded = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run_id, "reports")}
    assert "reports/predictions_site2.csv" in uploaded
    assert not [p for p in uploaded if "site1" in p], uploaded


def test_a_hostile_cohort_name_writes_only_inside_the_reports(smoke_run, tmp_path) -> None:
    """Item 1 for her2exp-eval: cohort_name is the user's text and names report files."""
    out = tmp_path / "a" / "b" / "eval"
    small = [f"checkpoint={best_pt(smoke_run)}", "data.n_patients=4", "data.patches_per_patient=4"]
    evaluation.evaluate_cohort(
        command("eval", [*small, "tracking.backend=off", "cohort_name='../../../../escaped'"], out)
    )
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(out in p.parents for p in written), written
    assert any(p.name.startswith("predictions_") for p in (out / "reports").iterdir())


# -- 12: no silent fallbacks ---------------------------------------------------------------------
def test_predict_refuses_a_checkpoint_without_frozen_thresholds(smoke_run, tmp_path, capsys):
    ckpt = checkpoint_like(smoke_run, tmp_path / "old.pt", {}, drop=("thresholds",))
    assert "threshold_youden_val" in checkpoint.load(ckpt)  # what the old fallback read
    out = tmp_path / "preds.csv"
    args = [f"checkpoint={ckpt}", f"input={patches(tmp_path / 'in')}", f"out={out}"]
    err = refused("predict", command("predict", args), capsys)
    assert f"checkpoint={ckpt}: the checkpoint holds no frozen thresholds" in err
    assert not out.exists()


@pytest.mark.parametrize("name", ["eval", "predict"])
def test_a_macenko_run_without_its_stain_reference_is_refused(
    smoke_run, tmp_path, no_scoring, capsys, name
) -> None:
    ckpt = checkpoint_like(smoke_run, tmp_path / "macenko.pt", {"stain.name": "macenko"})
    state = checkpoint.load(ckpt)
    state["stain"] = None  # trained with stain=macenko, the fitted reference lost
    checkpoint.save(state, ckpt)
    if name == "eval":
        cfg = command("eval", [f"checkpoint={ckpt}", "tracking.backend=off"], tmp_path / "out")
    else:
        args = [f"checkpoint={ckpt}", f"input={patches(tmp_path / 'in')}"]
        cfg = command("predict", [*args, f"out={tmp_path / 'p.csv'}"])
    err = refused(name, cfg, capsys)
    assert f"checkpoint={ckpt}: the run was trained with stain=macenko" in err
    assert "no fitted stain reference" in err and not (tmp_path / "p.csv").exists()


def focal_cfg(**kw: object):
    base = {"name": "focal", "gamma": 2.0, "alpha": None, "use_class_weights": False}
    return OmegaConf.create({**base, "label_smoothing": 0.0, **kw})


def test_focal_label_smoothing_matches_a_hand_computation() -> None:
    """Two samples, eps=0.1, gamma=2: q = y (1 - eps) + eps / 2, FL = -sum_c q_c (1-p_c)^2 log p_c,
    averaged over the batch."""
    logits = torch.tensor([[2.0, -1.0], [0.5, 1.5]])
    target = torch.tensor([0, 1])
    eps, gamma = 0.1, 2.0
    expected = 0.0
    for row, y in zip(logits.tolist(), target.tolist(), strict=True):
        z = np.exp(row) / np.exp(row).sum()
        for c in (0, 1):
            q = (1 - eps) * (c == y) + eps / 2
            expected += -q * (1 - z[c]) ** gamma * np.log(z[c])
    expected /= 2
    loss = losses.build(focal_cfg(label_smoothing=eps), np.array([0, 1]))
    assert float(loss(logits, target)) == pytest.approx(expected, rel=1e-6)
    unsmoothed = losses.build(focal_cfg(), np.array([0, 1]))(logits, target)
    assert float(loss(logits, target)) != pytest.approx(float(unsmoothed), rel=1e-3)


def test_focal_label_smoothing_zero_is_unchanged_and_gamma_zero_is_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(29, 2, generator=g) * 3, torch.randint(0, 2, (29,), generator=g)
    w = torch.tensor([0.4, 1.6])
    # eps=0: the loss as it was, -alpha_t w_t (1 - p_t)^gamma log p_t / sum(alpha_t w_t)
    log_pt = F.log_softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
    a_t = torch.where(target == 1, 0.25, 0.75) * w[target]
    before = (-a_t * (1 - log_pt.exp()) ** 2.0 * log_pt).sum() / a_t.sum()
    now = losses.FocalLoss(gamma=2.0, alpha=0.25, weight=w, label_smoothing=0.0)(logits, target)
    torch.testing.assert_close(now, before)
    for eps in (0.1, 0.3):
        focal = losses.FocalLoss(gamma=0.0, weight=w, label_smoothing=eps)(logits, target)
        ce = F.cross_entropy(logits, target, weight=w, label_smoothing=eps)
        torch.testing.assert_close(focal, ce)


# -- 13: a missing or damaged checkpoint, a bad data folder --------------------------------------
def bad_checkpoint(kind: str, smoke_run: SmokeRun, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "best.pt"
    good = best_pt(smoke_run).read_bytes()
    if kind == "truncated":  # a copy cut short (no sidecar, as an MLflow download has none)
        path.write_bytes(good[: len(good) // 2])
    elif kind == "checksum":  # one byte changed after the fact; the sidecar says so
        shutil.copy(checkpoint.checksum_path(best_pt(smoke_run)), checkpoint.checksum_path(path))
        damaged = bytearray(good)
        damaged[len(damaged) // 2] ^= 0xFF
        path.write_bytes(bytes(damaged))
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "not_her2exp":  # a real PyTorch file, not one of our checkpoints
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    return path  # "missing": not written


KINDS = ["missing", "truncated", "checksum", "random", "not_her2exp"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["eval", "predict"])
def test_a_bad_checkpoint_is_one_line_naming_it(
    smoke_run, tmp_path, no_scoring, capsys, name, kind
) -> None:
    ckpt = bad_checkpoint(kind, smoke_run, tmp_path / "ck")
    db = tmp_path / "mlflow.db"
    if name == "eval":
        cfg = command("eval", [f"checkpoint={ckpt}", f"tracking.uri=sqlite:///{db}"], tmp_path)
    else:
        args = [f"checkpoint={ckpt}", f"input={patches(tmp_path / 'in')}"]
        cfg = command("predict", [*args, f"out={tmp_path / 'p.csv'}"])
    err = refused(name, cfg, capsys)
    assert str(ckpt) in err and "Traceback" not in err
    assert not db.exists() and not (tmp_path / "p.csv").exists()  # no MLflow run, no output


def test_eval_of_a_run_without_a_checkpoint_is_one_line(
    smoke_run, tmp_path, no_scoring, capsys
) -> None:
    import mlflow

    uri = store_copy(smoke_run, tmp_path)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("e", (tmp_path / "art").as_uri()))
    capsys.readouterr()
    cfg = command("eval", [f"run_id={run.info.run_id}", f"tracking.uri={uri}"], tmp_path / "out")
    err = refused("eval", cfg, capsys)
    assert "has no checkpoints/best.pt artifact" in err


def bad_data_folder(kind: str, root: Path) -> Path:
    if kind == "empty":
        root.mkdir()
    elif kind == "no_class_folders":  # patches straight in the folder
        patches(root)
    return root  # "missing": not created


@pytest.mark.parametrize("kind", ["missing", "empty", "no_class_folders"])
def test_eval_refuses_a_bad_data_folder_in_one_line(
    smoke_run, tmp_path, no_scoring, capsys, kind
) -> None:
    root = bad_data_folder(kind, tmp_path / "cohort")
    db = tmp_path / "mlflow.db"
    args = [f"checkpoint={best_pt(smoke_run)}", "data=folder", f"data.root={root}"]
    cfg = command("eval", [*args, f"tracking.uri=sqlite:///{db}"], tmp_path / "out")
    err = refused("eval", cfg, capsys)
    assert f"data.root={root}" in err and not db.exists()


def test_user_mistakes_exit_2_through_the_real_commands(smoke_run, tmp_path) -> None:
    """The real console commands, started together: an unwritable store (was ~110 s of MLflow's
    retries, then a SQLAlchemy traceback, exit 1), a truncated checkpoint for her2exp-eval and a
    random file for her2exp-predict (were tracebacks)."""
    truncated = bad_checkpoint("truncated", smoke_run, tmp_path / "a")
    random = bad_checkpoint("random", smoke_run, tmp_path / "b")
    store = [f"checkpoint={best_pt(smoke_run)}", "tracking.uri=sqlite:////proc/x.db"]
    unwritable = cli("eval", [*store, f"hydra.run.dir={tmp_path / 'out1'}"], tmp_path)
    ev = cli("eval", [f"checkpoint={truncated}", f"hydra.run.dir={tmp_path / 'out2'}"], tmp_path)
    inputs = patches(tmp_path / "in")
    pr = cli("predict", [f"checkpoint={random}", f"input={inputs}", "out=p.csv"], tmp_path)
    assert_exit_2_in_one_line(unwritable, "tracking.uri=sqlite:////proc/x.db cannot be used")
    assert_exit_2_in_one_line(ev, f"checkpoint {truncated} could not be loaded")
    assert_exit_2_in_one_line(pr, f"checkpoint {random} could not be loaded")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "p.csv").exists()
