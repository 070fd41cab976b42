"""Bags (mil=...): a MIL run on the smoke data trains on bags of cached tile embeddings and reports
bag-level metrics at thresholds frozen on the val bags; exact resume; DDP scores each bag once;
her2exp-eval and her2exp-predict score bags; refusals. (The heads themselves: test_mil_heads.)"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from conftest import compose_train
from her2exp import data, evaluation, metrics
from her2exp.cli.common import compose
from her2exp.config import ConfigError, validate
from her2exp.core import checkpoint
from her2exp.data import bags as mil_bags
from her2exp.training import run as train_mod

# No dropout: two DDP ranks (seeded seed + rank) then train what one process trains.
MIL = ["experiment=smoke", "tracking=off", "mil=abmil", "mil.dropout=0", "data.n_patients=32"]


def _train(tmp: Path, cache: Path, *extra: str) -> dict:
    cfg = compose_train([*MIL, f"model.feature_cache_dir={cache}", *extra], tmp)
    return train_mod.run(cfg)


def _preds(run_dir: Path, split: str) -> pd.DataFrame:
    return pd.read_csv(run_dir / "reports" / f"predictions_{split}.csv")


@pytest.fixture(scope="module")
def mil_run(tmp_path_factory: pytest.TempPathFactory, feature_cache_dir: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("mil_run")
    summary = _train(run_dir, feature_cache_dir)
    assert summary["decision_level"] == "patient"
    return run_dir


def test_mil_run_reports_bags_at_thresholds_frozen_on_val_bags(mil_run: Path) -> None:
    cfg = compose_train([*MIL])
    bundle = data.build(cfg.data, cfg.seed)
    val, test = _preds(mil_run, "val"), _preds(mil_run, "test")
    for split, table in (("val", val), ("test", test)):
        rows = bundle.manifest.iloc[bundle.indices(split)]
        assert sorted(table["bag_id"]) == sorted(rows["patient_id"].unique())  # one row per bag
        labels = rows.groupby("patient_id")["label"].first()
        assert (table["label"].to_numpy() == labels.loc[table["bag_id"]].to_numpy()).all()
        assert (table["n_tiles"] == 12).all()
    best = checkpoint.load(mil_run / "checkpoints" / "best.pt")
    assert best["decision_level"] == "patient" and set(best["thresholds"]) == {"tile", "patient"}
    e = cfg.evaluation
    chosen = metrics.operating_points(
        val["label"].to_numpy(), val["prob_her2_pos"].to_numpy(), e.target_sensitivity
    )
    assert best["thresholds"]["patient"] == pytest.approx(chosen)  # chosen on the val bags
    for name, t in best["thresholds"]["patient"].items():
        assert (test[f"called_her2_pos_{name}"] == (test["prob_her2_pos"] >= t)).all()
    # attention: every tile of every bag once, summing to 1 per bag, on the manifest rows
    att = pd.read_csv(mil_run / "reports" / "attention_test.csv")
    assert {"bag_id", "row", "attention", "slide_id", "patient_id"} <= set(att.columns)
    assert sorted(att["row"]) == sorted(bundle.indices("test"))
    assert (bundle.manifest.loc[att["row"], "patient_id"].to_numpy() == att["bag_id"]).all()
    np.testing.assert_allclose(att.groupby("bag_id")["attention"].sum(), 1.0, rtol=1e-5)
    summary = (mil_run / "reports" / "summary.md").read_text()
    assert (
        "each unit scored is a **bag**" in summary and "Bag level (one bag per patient)" in summary
    )
    assert not list((mil_run / "reports").glob("false_negatives_*.png"))  # no patch galleries


def test_mil_resume_equals_uninterrupted(mil_run: Path, tmp_path: Path, feature_cache_dir) -> None:
    first = _train(tmp_path / "a", feature_cache_dir, "trainer.stop_after_epoch=1")
    assert first["interrupted"] and first["last_epoch"] == 1
    last = tmp_path / "a" / "checkpoints" / "last.pt"
    _train(tmp_path / "b", feature_cache_dir, f"trainer.resume={last}")
    for split in ("val", "test"):
        pd.testing.assert_frame_equal(_preds(tmp_path / "b", split), _preds(mil_run, split))
    a = checkpoint.load(tmp_path / "b" / "checkpoints" / "best.pt")["model"]
    b = checkpoint.load(mil_run / "checkpoints" / "best.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in b if k.startswith("head."))


def test_mil_ddp_scores_each_bag_once_as_one_process(
    mil_run: Path, tmp_path: Path, feature_cache_dir
) -> None:
    """Two gloo workers: bags sharded by the DistributedSampler in training (the two ranks'
    batches make up the one process's batch) and in exact-once shards in evaluation."""
    _train(tmp_path / "two", feature_cache_dir, "trainer.nproc_per_node=2")
    for split in ("val", "test"):
        one, two = _preds(mil_run, split), _preds(tmp_path / "two", split)
        assert two["bag_id"].is_unique and list(two["bag_id"]) == list(one["bag_id"])
        np.testing.assert_allclose(two["prob_her2_pos"], one["prob_her2_pos"], atol=1e-5)
        att = pd.read_csv(tmp_path / "two" / "reports" / f"attention_{split}.csv")
        assert att["row"].is_unique and att["bag_id"].nunique() == len(two)


def test_eval_and_predict_score_bags(mil_run: Path, tmp_path: Path) -> None:
    ckpt = mil_run / "checkpoints" / "best.pt"
    out = tmp_path / "eval"
    figures = ["evaluation.figures=true", "evaluation.operating_point=p50"]
    ecfg = compose("eval", [f"checkpoint={ckpt}", "tracking=off", "split=test", *figures])
    with open_dict(ecfg):
        ecfg.output_dir = str(out)
    result = evaluation.evaluate_cohort(ecfg)
    assert result["evaluation"].n == len(_preds(mil_run, "test"))
    got, want = _preds(out, "test"), _preds(mil_run, "test")
    np.testing.assert_allclose(got["prob_her2_pos"], want["prob_her2_pos"], atol=1e-5)
    assert (out / "reports" / "attention_test.csv").is_file()
    # One attention gallery per missed and per false bag at the operating point (figures on);
    # none in the run's own reports (experiment=smoke: evaluation.figures=false).
    wrong = got["called_her2_pos_p50"] != got["label"]
    drawn = {p.name for p in (out / "reports").glob("attention_f[np]_*.png")}
    assert len(drawn) == int(wrong.sum())
    assert not list((mil_run / "reports").glob("attention_f[np]_*.png"))
    # a new cohort: its tiles embedded by the run's frozen backbone, one row per patient bag
    new = ["data.n_patients=6", "data.patches_per_patient=3", "data.data_seed=9"]
    ecfg = compose("eval", [f"checkpoint={ckpt}", "tracking=off", *new])
    with open_dict(ecfg):
        ecfg.output_dir = str(tmp_path / "cohort")
    assert evaluation.evaluate_cohort(ecfg)["evaluation"].n == 6
    att = pd.read_csv(tmp_path / "cohort" / "reports" / "attention_external.csv")
    assert len(att) == 18 and att["bag_id"].nunique() == 6
    # predict on a folder of the test patches, grouped into patients by groups=
    from her2exp.apps.predict import predict_folder

    cfg = compose_train([*MIL])
    bundle = data.build(cfg.data, cfg.seed)
    folder, names = tmp_path / "tiles", []
    folder.mkdir()
    for row in bundle.indices("test"):
        Image.fromarray(bundle.images[row]).save(folder / f"t{row:04d}.png")
        pid = bundle.manifest["patient_id"].iloc[row]
        names.append((f"t{row:04d}.png", f"{pid}-S0", pid))
    groups = tmp_path / "groups.csv"
    pd.DataFrame(names, columns=["path", "slide_id", "patient_id"]).to_csv(groups, index=False)
    base = [f"checkpoint={ckpt}", f"input={folder}", f"out={tmp_path / 'p.csv'}"]
    with pytest.raises(ConfigError, match="give groups="):
        predict_folder(compose("predict", base))
    pred = predict_folder(compose("predict", [*base, f"groups={groups}"]))
    assert pred.level == "patient" and len(pred.groups) == len(want)
    bag_p = pred.groups.set_index("patient_id")["prob_her2_pos"]
    np.testing.assert_allclose(bag_p.loc[want["bag_id"]], want["prob_her2_pos"], atol=1e-5)
    assert {"bag_id", "attention", "called_her2_pos_youden"} <= set(pred.tiles.columns)
    np.testing.assert_allclose(pred.tiles.groupby("bag_id")["attention"].sum(), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["mil=abmil", "model.cache_features=false"], "model.cache_features=False"),
        (["mil=abmil", "evaluation.decision_level=tile"], "evaluation.decision_level='tile'"),
        (["mil=abmil", "data.bag_by=slide", "evaluation.decision_level=tile"], "slide or patient"),
        (["data.bag_by=site"], "data.bag_by='site' is not allowed (one of patient, slide)"),
        (["mil.name=transmil"], "mil.name='transmil' is not allowed"),
    ],
)
def test_mil_refusals(extra: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_train(["experiment=smoke", *extra], Path("/tmp/unused")))


def test_mil_group_sets_what_bags_need_and_none_keeps_fingerprints() -> None:
    cfg = compose_train(["mil=abmil", "data.bag_by=slide"], Path("/tmp/unused"))
    assert cfg.model.finetune == "frozen" and cfg.model.cache_features and not cfg.data.augment
    assert cfg.evaluation.decision_level == "slide"
    validate(cfg)
    plain = compose_train(["experiment=smoke"], Path("/tmp/unused"))
    assert plain.mil.name == "none" and plain.evaluation.decision_level == "tile"
    manifest = pd.DataFrame({"patient_id": ["a"], "label": [0]})
    before = plain.data.copy()  # a config from before bags existed
    with open_dict(before):
        del before["bag_by"]
    other = plain.data.copy()
    other.bag_by = "slide"
    assert data._fingerprint(plain.data, 1, manifest) == data._fingerprint(before, 1, manifest)
    assert data._fingerprint(other, 1, manifest) == data._fingerprint(before, 1, manifest)


def test_bags_group_pad_and_refuse_mixed_labels() -> None:
    rows = pd.DataFrame(
        {"patient_id": ["b", "a", "b", "a", "b"], "label": [1, 0, 1, 0, 1], "site": ["s"] * 5}
    )
    bags = mil_bags.group_bags(rows, "patient")
    assert bags.ids == ["b", "a"] and [m.tolist() for m in bags.members] == [[0, 2, 4], [1, 3]]
    assert bags.labels.tolist() == [1, 0]
    feats = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    x, y, idx = mil_bags.collate_bags([mil_bags.BagDataset(feats, bags)[i] for i in (1, 0)])
    assert x.shape == (2, 3, 3) and y.tolist() == [0, 1] and idx.tolist() == [1, 0]
    f, mask = mil_bags.unpack(x)
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    assert torch.equal(f[0, :2], feats[[1, 3]]) and torch.equal(f[0, 2], torch.zeros(2))
    with pytest.raises(ValueError, match="1 bag\\(s\\) hold tiles of both labels \\(a\\)"):
        mil_bags.group_bags(rows.assign(label=[1, 0, 1, 1, 1]), "patient")
    with pytest.raises(ValueError, match="no slide_id column"):
        mil_bags.group_bags(rows, "slide")
    tiles = rows.assign(row=[10, 11, 12, 13, 14], slide_id="S", x=[0, 1, 2, 3, 4], y=0)
    table = mil_bags.attention_table(tiles, bags, np.array([0.2, 0.3, 0.5, 0.4, 0.6]))
    assert list(table.columns) == ["bag_id", "row", "attention", "slide_id", "patient_id", "x", "y"]
    assert table["row"].tolist() == [10, 12, 14, 11, 13] and table["x"].tolist() == [0, 2, 4, 1, 3]
    assert mil_bags.bag_rows(tiles, bags).columns.tolist() == [
        "bag_id",
        "label",
        "patient_id",
        "site",
        "n_tiles",
    ]
