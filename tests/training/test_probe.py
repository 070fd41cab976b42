"""Probe protocols (experiment=fm_probe, probe=linear|knn|abmil): the kNN head against
scikit-learn, the leaderboard's mean +- sd from the children's own tables, and one real CLI
multirun (backbone x protocol x 2 seeds, one shared feature cache) whose parent run holds the
leaderboard that `her2exp-compare leaderboard=true` prints.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from conftest import CONF, compose_train, mlflow_store, run_cli
from her2exp.config.commands import validate_only
from her2exp.core import checkpoint
from her2exp.evaluation import crossval
from her2exp.training.probe import KNNHead

SMOKE = ["model=test_resnet", "data.n_patients=24", "data.patches_per_patient=12"]
SMOKE += ["data.image_size=32", "data.batch_size=32", "data.positive_fraction=0.5"]
SMOKE += [
    "trainer.epochs=2",
    "trainer.warmup_epochs=0.5",
    "trainer.lr=3e-3",
    "trainer.progress=false",
]
SMOKE += ["evaluation.n_boot=0", "evaluation.gallery_max=0", "evaluation.figures=false"]
SMOKE += ["tracking.log_model=false"]


def knn_probs(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """scikit-learn's kNN probe: P(HER2+) by KNeighborsClassifier(metric='cosine')."""
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train_x, train_y)
    return knn.predict_proba(x)[:, list(knn.classes_).index(1)]


def head_probs(head: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(head(torch.from_numpy(x)).float(), dim=1)[:, 1].double().numpy()


def test_the_knn_head_is_scikit_learns_knn_and_survives_a_checkpoint(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train_x = rng.normal(size=(200, 16)).astype(np.float32)
    train_y = (train_x[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(np.int64)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    head = KNNHead(16, k=7)
    head.fit(torch.from_numpy(train_x), torch.from_numpy(train_y))
    expected = knn_probs(train_x, train_y, x, 7)
    assert len(np.unique(expected)) > 3  # votes of every kind, not one constant
    np.testing.assert_allclose(head_probs(head, x), expected, rtol=0, atol=1e-6)
    # best.pt carries the bank: an unfitted head of the run's config loads it (resized).
    path = checkpoint.save({"model": head.state_dict()}, tmp_path / "knn.pt")
    fresh = KNNHead(16, k=7)
    fresh.load_state_dict(checkpoint.load(path)["model"])
    np.testing.assert_array_equal(head_probs(fresh, x), head_probs(head, x))
    with pytest.raises(ValueError, match="probe.k=201 .* more than the 200 training embeddings"):
        KNNHead(16, k=201).fit(torch.from_numpy(train_x), torch.from_numpy(train_y))


def test_probe_configs_compose_and_bad_ones_are_one_line() -> None:
    cfg = compose_train(["experiment=fm_probe", "probe=knn", "probe.k=3", "model=test_resnet"])
    assert (cfg.model.head, cfg.model.knn_k, cfg.probe.name) == ("knn", 3, "knn")
    assert cfg.model.cache_features and cfg.model.finetune == "frozen" and not cfg.data.augment
    assert cfg.data.split_seed == 0 and cfg.data.data_seed == 0
    linear = compose_train(["experiment=fm_probe", "model=test_resnet"])
    assert (linear.probe.name, linear.model.head, linear.model.drop_rate) == ("linear", "linear", 0)
    for overrides, expected in (
        (["probe=knn", "model.cache_features=false"], "model.head='knn' is not allowed"),
        (["probe=knn", "model.head=linear"], "model.head='linear' is not allowed (knn with"),
        (["experiment=fm_probe", "probe.k=0"], "probe.k=0 is not allowed"),
        (["experiment=fm_probe", "probe.name=svm"], "probe.name='svm' is not allowed"),
    ):
        with pytest.raises(ValueError, match=re.escape(expected)):
            validate_only("train", ["model=test_resnet", *overrides])


HAS_MIL = (CONF / "mil" / "abmil.yaml").is_file()  # the mil group (issue 19's `mil` part)
#: The CLI sweep's protocols: ABMIL joins once the mil group is there.
PROTOCOLS = ["knn", "linear", "abmil"] if HAS_MIL else ["knn", "linear"]


@pytest.mark.skipif(not HAS_MIL, reason="needs the mil group")
def test_probe_abmil_composes_patient_level_abmil() -> None:
    cfg = compose_train(["experiment=fm_probe", "probe=abmil", "model=test_resnet"])
    assert (cfg.mil.name, cfg.data.bag_by, cfg.probe.name) == ("abmil", "patient", "abmil")
    assert cfg.evaluation.decision_level == "patient"


# --- the leaderboard on child folders built here ----------------------------------------------


def write_probe_child(
    sweep: Path, job: int, backbone: str, protocol: str, seed: int, rng
) -> pd.DataFrame:
    """A finished fm_probe job's folder: config, overrides, patient-level test predictions."""
    run = sweep / str(job)
    (run / "reports").mkdir(parents=True)
    (run / ".hydra").mkdir()
    cfg = {
        "seed": seed,
        "output_dir": str(run),
        "model": {"name": f"timm_{backbone}", "head": "knn" if protocol == "knn" else "linear"},
        "probe": {"name": protocol},
        "data": {"split_seed": 0, "data_seed": 0},
        "evaluation": {"decision_level": "patient", "operating_point": "youden"},
    }
    (run / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg))
    overrides = ["experiment=fm_probe", f"model={backbone}", f"probe={protocol}", f"seed={seed}"]
    (run / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    labels = np.array([0] * 6 + [1] * 4)
    probs = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    table = pd.DataFrame(
        {"patient_id": [f"P{i}" for i in range(10)], "label": labels, "prob_her2_pos": probs}
    )
    table["called_her2_pos_youden"] = (probs >= rng.uniform(0.3, 0.6)).astype(int)
    table.to_csv(run / "reports" / "predictions_test.csv", index=False)  # tile table: present
    table.to_csv(run / "reports" / "predictions_patients_test.csv", index=False)
    return table


def test_the_leaderboard_is_the_mean_and_sd_of_each_groups_own_runs(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    tables: dict[tuple[str, str], list[pd.DataFrame]] = {}
    job = 0
    for seed in (0, 1):
        for backbone in ("uni", "h_optimus_0"):
            for protocol in ("linear", "knn"):
                t = write_probe_child(tmp_path, job, backbone, protocol, seed, rng)
                tables.setdefault((backbone, protocol), []).append(t)
                job += 1
    result = crossval.summarise(tmp_path)
    assert result.kind == "leaderboard"
    board = pd.read_csv(tmp_path / "cv" / "leaderboard.csv")
    assert len(board) == 4 and set(zip(board.backbone, board.protocol, strict=True)) == set(tables)
    assert list(board["test_auc_mean"]) == sorted(board["test_auc_mean"], reverse=True)
    for _, row in board.iterrows():
        own = tables[(row["backbone"], row["protocol"])]
        aucs = [roc_auc_score(t["label"], t["prob_her2_pos"]) for t in own]
        sens = [t.loc[t["label"] == 1, "called_her2_pos_youden"].mean() for t in own]
        assert row["n_runs"] == 2 and row["level"] == "patient"
        assert row["test_auc_mean"] == pytest.approx(np.mean(aucs))
        assert row["test_auc_sd"] == pytest.approx(np.std(aucs, ddof=1))
        assert row["test_sensitivity_mean"] == pytest.approx(np.mean(sens))
        assert row["test_sensitivity_sd"] == pytest.approx(np.std(sens, ddof=1))
        assert row["test_auc_ci_low"] < row["test_auc_mean"] < row["test_auc_ci_high"]
        assert row["group"] == f"model={row['backbone']} probe={row['protocol']}"
        key = f"leaderboard_{row['backbone']}_{row['protocol']}_test_auc_mean"
        assert result.metrics[key] == pytest.approx(row["test_auc_mean"])
    assert "| uni | knn | patient | 2 |" in (tmp_path / "cv" / "leaderboard.md").read_text()


def test_a_probe_sweep_of_one_group_is_a_one_row_leaderboard(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    for seed in (0, 1, 2):
        write_probe_child(tmp_path, seed, "uni", "linear", seed, rng)
    assert crossval.summarise(tmp_path).kind == "leaderboard"
    board = pd.read_csv(tmp_path / "cv" / "leaderboard.csv")
    assert len(board) == 1 and board["n_runs"].item() == 3 and board["group"].isna().all()


# --- one real CLI multirun ----------------------------------------------------------------------


@dataclass
class ProbeSweep:
    cwd: Path
    sweep_dir: Path
    uri: str
    weights: Path
    stdout: str


@pytest.fixture(scope="module")
def probe_sweep(tmp_path_factory: pytest.TempPathFactory, feature_cache_dir: Path) -> ProbeSweep:
    """`her2exp-train -m experiment=fm_probe probe=linear,knn probe.n_runs=2` on smoke-sized
    data (report figures off: a job is ~4 s): one backbone (random test_resnet weights saved
    once, as a foundation model's file is, so every seed embeds with the same backbone) x
    protocol x 2 seeds into a SQLite store."""
    import timm

    cwd = tmp_path_factory.mktemp("probe_sweep")
    torch.manual_seed(0)
    weights = cwd / "backbone.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    mlflow_store(cwd / "mlflow.db")
    sweep_dir = cwd / "sweep"
    args = [
        "-m",
        "experiment=fm_probe",
        f"probe={','.join(PROTOCOLS)}",
        "probe.n_runs=2",
        "probe.k=5",
    ]
    args += [*SMOKE, f"model.weights={weights}", f"model.feature_cache_dir={feature_cache_dir}"]
    proc = run_cli([*args, f"hydra.sweep.dir={sweep_dir}"], cwd=cwd, timeout=900)
    assert proc.returncode == 0, (
        f"probe sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return ProbeSweep(cwd, sweep_dir, f"sqlite:///{cwd}/mlflow.db", weights, proc.stdout)


def children(sweep: ProbeSweep) -> dict[tuple[str, int], Path]:
    out = {}
    for run in sorted(p for p in sweep.sweep_dir.iterdir() if p.name.isdigit()):
        cfg = OmegaConf.load(run / "config_resolved.yaml")
        out[(cfg.probe.name, int(cfg.seed))] = run
    return out


def test_the_knn_run_scores_what_scikit_learn_scores(
    probe_sweep: ProbeSweep, tmp_path: Path
) -> None:
    """The run's recorded test probabilities are sklearn's KNeighborsClassifier fitted on the
    run's training embeddings (re-embedded here from its data and backbone file), and
    her2exp-eval of its best.pt gives them again, with the same frozen calls."""
    from her2exp import data, evaluation
    from her2exp.engine import Preprocess, features

    run_dir = children(probe_sweep)[("knn", 0)]
    run = evaluation.load_run(
        OmegaConf.create({"checkpoint": str(run_dir / "checkpoints" / "best.pt")})
    )
    model = evaluation.load_model(run, torch.device("cpu"))
    bundle = data.build(run.cfg.data, run.cfg.seed)
    pre = Preprocess(torch.device("cpu"), tuple(run.cfg.data.mean), tuple(run.cfg.data.std))
    emb = {s: features.embed(model, bundle.view(s), pre).numpy() for s in ("train", "test")}
    bank = model.head.bank.numpy()
    np.testing.assert_allclose(
        bank, emb["train"] / np.linalg.norm(emb["train"], axis=1, keepdims=True), atol=1e-5
    )
    assert np.array_equal(model.head.bank_labels.numpy(), bundle.labels("train"))
    expected = knn_probs(emb["train"], bundle.labels("train"), emb["test"], 5)
    recorded = pd.read_csv(run_dir / "reports" / "predictions_test.csv")["prob_her2_pos"]
    np.testing.assert_allclose(recorded.to_numpy(), expected, rtol=0, atol=1e-6)
    # her2exp-eval from best.pt alone (backbone and bank in it) repeats the run's test table.
    from omegaconf import open_dict

    from her2exp.cli.common import compose

    best = run_dir / "checkpoints" / "best.pt"
    ecfg = compose("eval", ["tracking=off", f"checkpoint={best}", "split=test"])
    with open_dict(ecfg):
        ecfg.output_dir = str(tmp_path)
        ecfg.evaluation.figures = False
    evaluation.evaluate_cohort(ecfg)
    again = pd.read_csv(tmp_path / "reports" / "predictions_test.csv")
    np.testing.assert_array_equal(again["prob_her2_pos"].to_numpy(), recorded.to_numpy())
    calls = [c for c in again.columns if c.startswith("called_")]
    assert calls and again[calls].equals(
        pd.read_csv(run_dir / "reports" / "predictions_test.csv")[calls]
    )
    assert len(np.unique(expected)) > 2


def test_the_linear_probe_trains_its_head_on_a_frozen_backbone(probe_sweep: ProbeSweep) -> None:
    run_dir = children(probe_sweep)[("linear", 1)]
    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    saved = torch.load(probe_sweep.weights, weights_only=True)
    for name, tensor in saved.items():  # the backbone is the file, untouched by training
        assert torch.equal(last["model"][f"backbone.{name}"], tensor), name
    steps = [s["step"] for s in last["optimizer"]["state"].values()]
    assert len(steps) == 2 and min(float(s) for s in steps) > 0  # the head's weight and bias
    assert [h["epoch"] for h in last["history"]] == [1, 2]


def test_the_sweep_parent_holds_the_leaderboard_compare_prints(
    probe_sweep: ProbeSweep, tmp_path: Path, monkeypatch, capsys
) -> None:
    import mlflow

    from her2exp.cli.compare import main

    client = mlflow.MlflowClient(tracking_uri=probe_sweep.uri)
    exp = client.get_experiment_by_name("her2exp")
    (parent,) = client.search_runs([exp.experiment_id], "tags.sweep = 'parent'")
    assert parent.data.tags["sweep.kind"] == "leaderboard"
    kids = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(kids) == 2 * len(PROTOCOLS)
    computed = sorted(int(r.data.metrics.get("features_computed", 0)) for r in kids)
    assert computed[-2] == 0 < computed[-1]  # one backbone file, one data set: embedded once
    # Each protocol's mean and sd over its two seeds, from the children's own tables.
    board = pd.read_csv(probe_sweep.sweep_dir / "cv" / "leaderboard.csv")
    assert sorted(board["protocol"]) == sorted(PROTOCOLS) and set(board["n_runs"]) == {2}
    for _, row in board.iterrows():
        runs = [children(probe_sweep)[(row["protocol"], seed)] for seed in (0, 1)]
        tables = [pd.read_csv(r / "reports" / crossval.LEVEL_FILES[row["level"]]) for r in runs]
        aucs = [roc_auc_score(t["label"], t["prob_her2_pos"]) for t in tables]
        assert row["test_auc_mean"] == pytest.approx(np.mean(aucs))
        assert row["test_auc_sd"] == pytest.approx(np.std(aucs, ddof=1))
        assert row["level"] == "patient" or row["protocol"] == "abmil"
        key = f"leaderboard_test_resnet_{row['protocol']}_test_auc_mean"
        assert parent.data.metrics[key] == pytest.approx(row["test_auc_mean"])
    knn = board[board["protocol"] == "knn"].iloc[0]
    assert knn["test_auc_sd"] == 0  # no training: the seeds agree on a fixed backbone
    out = tmp_path / "leaderboard.csv"
    monkeypatch.chdir(probe_sweep.cwd)  # the store's artifacts are relative to it
    argv = ["her2exp-compare", "leaderboard=true", f"tracking.uri={probe_sweep.uri}", f"out={out}"]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    printed = capsys.readouterr().out
    assert (
        "test_resnet | knn | patient | 2 |" in printed
        and f"leaderboard of {len(PROTOCOLS)}" in printed
    )
    pd.testing.assert_frame_equal(pd.read_csv(out), board)
    from her2exp.apps.compare import leaderboard
    from her2exp.config import ConfigError

    with pytest.raises(ConfigError, match="sweep=all: a leaderboard is one sweep's"):
        leaderboard("her2exp", "all", probe_sweep.uri)
    child = kids[0].info.run_id  # a run without one: refused in one line, naming it
    with pytest.raises(ConfigError, match=f"sweep={child}: run has no child runs"):
        leaderboard("her2exp", child, probe_sweep.uri)
