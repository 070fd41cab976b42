"""The user's own data: folder and manifest sources on real files, validation, the manifest CLI,
the synthetic export, and one training run on an exported folder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf, open_dict
from PIL import Image

from conftest import compose_train
from her2exp import data
from her2exp.cli import manifest as manifest_cli
from her2exp.cli.common import compose
from her2exp.config import ConfigError, DataConfig, validate
from her2exp.data import splits, synthetic
from her2exp.data.sources import DataValidationError

SIZE = 32
REGEX = "^([^-]+)-"  # the patient of "P0003-S0_001.png"


@pytest.fixture(scope="module")
def patches() -> synthetic.SyntheticData:
    return synthetic.generate(n_patients=12, patches_per_patient=4, image_size=SIZE, seed=0)


def cfg_for(source: str, **overrides) -> OmegaConf:
    cfg = OmegaConf.structured(DataConfig)
    cfg.source = source
    cfg.image_size = SIZE
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def write_tree(root: Path, d: synthetic.SyntheticData) -> list[str]:
    """her2_neg/ and her2_pos/ PNGs named <slide>_<k>.png; returns the relative paths."""
    rel = []
    for k, (image, rec) in enumerate(zip(d.images, d.frame.to_dict("records"), strict=True)):
        path = f"{('her2_neg', 'her2_pos')[rec['label']]}/{rec['slide_id']}_{k:03d}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / path)
        rel.append(path)
    return rel


def split_by_patient(d: synthetic.SyntheticData) -> dict[str, str]:
    """An explicit split with both classes in every split (12 patients, 3 HER2+)."""
    patients = d.frame.groupby("patient_id")["label"].max()
    out = {}
    for status in (0, 1):
        ids = sorted(patients.index[patients == status])
        names = ["val", "test"] + ["train"] * (len(ids) - 2)
        out.update(dict(zip(ids, names, strict=True)))
    return out


def write_manifest(root: Path, d: synthetic.SyntheticData, rel: list[str], **extra) -> Path:
    frame = pd.DataFrame(
        {
            "path": rel,
            "label": d.frame["label"].to_numpy(),
            "patient_id": d.frame["patient_id"].to_numpy(),
            "slide_id": d.frame["slide_id"].to_numpy(),
            "site": d.frame["site"].to_numpy(),
            **extra,
        }
    )
    path = root / "manifest.csv"
    frame.to_csv(path, index=False)
    return path


# --- sources ------------------------------------------------------------------------------------


def test_folder_reads_png_jpeg_tiff_rgba_gray_and_other_sizes(
    tmp_path: Path, patches: synthetic.SyntheticData, caplog: pytest.LogCaptureFixture
) -> None:
    rel = write_tree(tmp_path, patches)
    # Rewrite a few files in other formats, modes and sizes.
    img = patches.images
    Image.fromarray(img[1]).save(tmp_path / rel[1].replace(".png", ".jpg"), quality=95)
    Image.fromarray(img[2]).save(tmp_path / rel[2].replace(".png", ".tif"))
    rgba = np.dstack([img[3], np.full(img[3].shape[:2], 255, np.uint8)])
    rgba[:4, :4, 3] = 0  # transparent corner: background, composited on white
    Image.fromarray(rgba, "RGBA").save(tmp_path / rel[3])
    Image.fromarray(img[4]).convert("L").save(tmp_path / rel[4])
    Image.fromarray(img[5]).resize((48, 48)).save(tmp_path / rel[5])
    for i in (1, 2):
        (tmp_path / rel[i]).unlink()
    with caplog.at_level(logging.INFO, logger="her2exp.data"):
        bundle = data.build(cfg_for("folder", root=str(tmp_path), patient_regex=REGEX), seed=0)
    m = bundle.manifest
    assert bundle.images.dtype == np.uint8 and bundle.images.shape == (len(img), SIZE, SIZE, 3)
    assert list(m.columns[:6]) == ["path", "label", "patient_id", "slide_id", "site", "split"]
    assert set(m["patient_id"]) == set(patches.frame["patient_id"])
    assert (m.groupby("patient_id")["split"].nunique() == 1).all()
    by_name = {Path(p).stem: i for i, p in enumerate(m["path"])}
    stem = Path(rel[0]).stem
    np.testing.assert_array_equal(bundle.images[by_name[stem]], img[0])  # PNG: lossless
    tif = bundle.images[by_name[Path(rel[2]).stem]]
    np.testing.assert_array_equal(tif, img[2])
    jpg = bundle.images[by_name[Path(rel[1]).stem]].astype(int)
    assert np.abs(jpg - img[1]).mean() < 6
    rgba_out = bundle.images[by_name[Path(rel[3]).stem]]
    assert (rgba_out[:4, :4] == 255).all()
    np.testing.assert_array_equal(rgba_out[8:, 8:], img[3][8:, 8:])
    gray = bundle.images[by_name[Path(rel[4]).stem]]
    assert (gray[..., 0] == gray[..., 1]).all()
    notes = " | ".join(bundle.notes)
    assert "RGBA converted" in notes and "grayscale converted" in notes
    assert "resized from 48x48 to 32x32" in notes
    assert "resized from 48x48" in caplog.text
    assert len(bundle.skipped) == 0


def test_folder_without_patient_regex_warns_that_splits_may_leak(
    tmp_path: Path, patches: synthetic.SyntheticData, caplog: pytest.LogCaptureFixture
) -> None:
    write_tree(tmp_path, patches)
    with caplog.at_level(logging.WARNING, logger="her2exp.data"):
        bundle = data.build(cfg_for("folder", root=str(tmp_path)), seed=0)
    assert bundle.manifest["patient_id"].nunique() == len(bundle.manifest)
    assert "each is its own patient" in caplog.text and "splits" in caplog.text


def test_fingerprint_hashes_file_contents(tmp_path: Path, patches: synthetic.SyntheticData) -> None:
    rel = write_tree(tmp_path, patches)
    cfg = cfg_for("folder", root=str(tmp_path), patient_regex=REGEX)
    first = data.build(cfg, seed=0).fingerprint
    assert data.build(cfg, seed=0).fingerprint == first
    changed = patches.images[7].copy()
    changed[0, 0, 0] ^= 1  # one pixel, one bit
    Image.fromarray(changed).save(tmp_path / rel[7])
    assert data.build(cfg, seed=0).fingerprint != first
    assert data.build(cfg, seed=1).fingerprint != data.build(cfg, seed=0).fingerprint


def test_manifest_csv_and_parquet_honour_the_split_column(
    tmp_path: Path, patches: synthetic.SyntheticData
) -> None:
    rel = write_tree(tmp_path / "patches", patches)
    # Relative to the manifest, and absolute, both work.
    rel = [f"patches/{p}" for p in rel]
    rel[0] = str((tmp_path / rel[0]).resolve())
    split_of = split_by_patient(patches)
    split = [split_of[p] for p in patches.frame["patient_id"]]
    csv = write_manifest(tmp_path, patches, rel, split=split)
    bundle = data.build(cfg_for("manifest", path=str(csv)), seed=0)
    assert bundle.manifest["split"].tolist() == split
    assert bundle.manifest["site"].tolist() == patches.frame["site"].tolist()
    np.testing.assert_array_equal(bundle.images, patches.images)
    parquet = tmp_path / "manifest.parquet"
    pd.read_csv(csv).to_parquet(parquet)
    again = data.build(cfg_for("manifest", path=str(parquet)), seed=0)
    assert again.manifest["split"].tolist() == split
    np.testing.assert_array_equal(again.images, patches.images)
    # An external cohort ignores the split column.
    cohort = data.build_cohort(cfg_for("manifest", path=str(csv)), seed=0)
    assert set(cohort.manifest["split"]) == {"cohort"}


def test_manifest_without_split_is_grouped_by_patient_and_seeded(
    tmp_path: Path, patches: synthetic.SyntheticData
) -> None:
    csv = write_manifest(tmp_path, patches, write_tree(tmp_path, patches))
    a = data.build(cfg_for("manifest", path=str(csv)), seed=5)
    b = data.build(cfg_for("manifest", path=str(csv)), seed=5)
    assert a.manifest["split"].tolist() == b.manifest["split"].tolist()
    assert (a.manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(a.manifest["split"]) == set(splits.SPLITS)


def test_split_never_puts_a_patient_in_two_splits() -> None:
    """Property test over random manifests: sizes, patches per patient, prevalence, seeds."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        n_patients = int(rng.integers(3, 80))
        status = (rng.random(n_patients) < rng.uniform(0.05, 0.6)).astype(int)
        per = rng.integers(1, 8, size=n_patients)
        pid = np.repeat([f"p{i}" for i in range(n_patients)], per)
        frame = pd.DataFrame({"patient_id": pid, "label": np.repeat(status, per)})
        if rng.random() < 0.3:  # patients with mixed patch labels (heterogeneous tumours)
            frame.loc[rng.random(len(frame)) < 0.1, "label"] = 1
        train = rng.uniform(0.4, 0.8)
        val = rng.uniform(0.05, (1 - train) * 0.9)
        split = splits.assign(frame, (train, val, 1 - train - val), seed=trial)
        assert split.notna().all()
        assert set(split) <= set(splits.SPLITS)
        assert (frame.assign(split=split).groupby("patient_id")["split"].nunique() == 1).all()
        patients = (
            frame.assign(split=split)
            .groupby("patient_id")
            .agg(label=("label", "max"), split=("split", "first"))
        )
        for cls in (0, 1):  # a stratum of >= 3 patients reaches every split
            if (patients["label"] == cls).sum() >= 3:
                assert set(patients.loc[patients["label"] == cls, "split"]) == set(splits.SPLITS)


# --- HER2 scores --------------------------------------------------------------------------------


@pytest.mark.parametrize(("equivocal", "label_2plus"), [("exclude", None), ("positive", 1),
                                                        ("negative", 0)])  # fmt: skip
def test_score_folders_and_score_column_map_2plus_by_equivocal(
    tmp_path: Path, patches: synthetic.SyntheticData, equivocal: str, label_2plus: int | None
) -> None:
    scores = ["0", "1+", "2+", "3+"]
    rows = []
    for k, image in enumerate(patches.images[:24]):
        score = scores[k % 4]
        # One patch per patient: a patient with every score would carry both labels, an error
        # of its own (tests/test_reliability.py).
        rel = f"{score}/p{k}-s_{k:03d}.png"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / rel)
        rows.append({"path": rel, "score": score.rstrip("+") if k % 8 == 2 else score})
    expected = {"0": 0, "1+": 0, "2+": label_2plus, "3+": 1}
    folder = data.build_cohort(
        cfg_for("folder", root=str(tmp_path), patient_regex=REGEX, equivocal=equivocal), 0
    )
    pd.DataFrame(rows).to_csv(tmp_path / "scores.csv", index=False)
    manifest = data.build_cohort(
        cfg_for("manifest", path=str(tmp_path / "scores.csv"), equivocal=equivocal), 0
    )
    for bundle in (folder, manifest):
        m = bundle.manifest
        assert len(m) == (18 if label_2plus is None else 24)
        for score, label in expected.items():
            got = m.loc[m["her2_score"] == score, "label"]
            assert (got == label).all() if label is not None else got.empty


# --- validation ---------------------------------------------------------------------------------


def _bad_case(kind: str, root: Path, d: synthetic.SyntheticData) -> tuple[Path, dict, list[str]]:
    """One kind of bad input in a manifest: (manifest, extra cfg, strings the error must name)."""
    rel = write_tree(root, d)
    split = [split_by_patient(d)[p] for p in d.frame["patient_id"]]
    extra: dict = {}
    expect: list[str] = []
    labels = d.frame["label"].astype(str).tolist()
    if kind == "missing":
        (root / rel[0]).unlink()
        expect = [rel[0], "missing file"]
    elif kind == "truncated":
        raw = (root / rel[1]).read_bytes()
        (root / rel[1]).write_bytes(raw[: len(raw) // 2])
        expect = [rel[1], "truncated"]
    elif kind == "unreadable":
        (root / rel[2]).write_bytes(b"this is not a png")
        expect = [rel[2], "unreadable"]
    elif kind == "unknown_label":
        labels[3] = "maybe"
        expect = [rel[3], "unknown label 'maybe'"]
    elif kind == "duplicate":
        rel[5] = rel[4]
        expect = [rel[4], "duplicate path"]
    elif kind == "patient_in_two_splits":
        first = int(np.flatnonzero(d.frame["patient_id"] == d.frame["patient_id"][6])[0])
        split[first] = "test" if split[first] != "test" else "val"
        expect = ["patients in more than one split", str(d.frame["patient_id"][6])]
    elif kind == "split_missing_class":
        split = [
            "train" if s == "test" and lab == "1" else s
            for s, lab in zip(split, labels, strict=True)
        ]
        expect = ["split 'test' has no HER2+"]
    frame = pd.DataFrame({"path": rel, "label": labels, "patient_id": d.frame["patient_id"],
                          "split": split})  # fmt: skip
    path = root / "manifest.csv"
    frame.to_csv(path, index=False)
    return path, extra, expect


BAD_FILES = ["missing", "truncated", "unreadable", "unknown_label", "duplicate"]
STRUCTURAL = ["patient_in_two_splits", "split_missing_class"]


@pytest.mark.parametrize("kind", BAD_FILES + STRUCTURAL)
def test_each_bad_input_is_named(
    tmp_path: Path, patches: synthetic.SyntheticData, kind: str
) -> None:
    path, _, expect = _bad_case(kind, tmp_path, patches)
    with pytest.raises(DataValidationError) as info:
        data.build(cfg_for("manifest", path=str(path)), seed=0)
    for text in expect:
        assert text in str(info.value)
    assert isinstance(info.value, ValueError)


def test_all_bad_inputs_together_are_listed_in_one_error(
    tmp_path: Path, patches: synthetic.SyntheticData
) -> None:
    rel = write_tree(tmp_path, patches)
    labels = patches.frame["label"].astype(str).tolist()
    patient = patches.frame["patient_id"].tolist()
    split = [split_by_patient(patches)[p] for p in patient]
    (tmp_path / rel[0]).unlink()
    raw = (tmp_path / rel[1]).read_bytes()
    (tmp_path / rel[1]).write_bytes(raw[: len(raw) // 2])
    (tmp_path / rel[2]).write_bytes(b"garbage")
    labels[3] = "maybe"
    rel[5] = rel[4]
    moved = patient.index(patient[20])  # patient of row 20 gets one patch in another split
    split[moved] = "val" if split[moved] != "val" else "test"
    pd.DataFrame({"path": rel, "label": labels, "patient_id": patient, "split": split}).to_csv(
        tmp_path / "m.csv", index=False
    )
    with pytest.raises(DataValidationError) as info:
        data.build(cfg_for("manifest", path=str(tmp_path / "m.csv")), seed=0)
    msg = str(info.value)
    for text in (f"{rel[0]}: missing file", f"{rel[1]}: truncated", f"{rel[2]}: unreadable",
                 f"{rel[3]}: unknown label 'maybe'", "duplicate path",
                 f"patient '{patient[20]}' is in more than one split"):  # fmt: skip
        assert text in msg, text
    problems = info.value.problems
    assert set(problems.columns) == {"path", "problem"} and len(problems) >= 6


def test_folder_problems_unknown_folder_empty_folder_corrupt_png(
    tmp_path: Path, patches: synthetic.SyntheticData
) -> None:
    rel = write_tree(tmp_path, patches)
    (tmp_path / "her2_maybe").mkdir()
    Image.fromarray(patches.images[0]).save(tmp_path / "her2_maybe" / "P0000-S0_999.png")
    (tmp_path / "1+").mkdir()  # an empty class folder
    raw = (tmp_path / rel[9]).read_bytes()
    (tmp_path / rel[9]).write_bytes(raw[:-40])  # a corrupt (truncated) PNG
    cfg = cfg_for("folder", root=str(tmp_path), patient_regex=REGEX)
    with pytest.raises(DataValidationError) as info:
        data.build(cfg, seed=0)
    msg = str(info.value)
    assert "her2_maybe/P0000-S0_999.png: unknown label folder 'her2_maybe'" in msg
    assert "1+/: empty folder" in msg
    assert f"{rel[9]}: " in msg
    assert "data.on_bad_file=skip" in msg


def test_empty_or_missing_root_and_unset_paths(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="empty folder"):
        data.build(cfg_for("folder", root=str(tmp_path)), seed=0)
    with pytest.raises(DataValidationError, match="does not exist"):
        data.build(cfg_for("folder", root=str(tmp_path / "nope")), seed=0)
    with pytest.raises(DataValidationError, match="data.root"):
        data.build(cfg_for("folder"), seed=0)
    with pytest.raises(DataValidationError, match="manifest file not found"):
        data.build(cfg_for("manifest", path=str(tmp_path / "none.csv")), seed=0)
    (tmp_path / "cols.csv").write_text("file,class\na.png,1\n")
    with pytest.raises(DataValidationError, match="no 'path' column"):
        data.build(cfg_for("manifest", path=str(tmp_path / "cols.csv")), seed=0)


def test_skip_mode_drops_bad_files_and_lists_them(
    tmp_path: Path, patches: synthetic.SyntheticData
) -> None:
    rel = write_tree(tmp_path, patches)
    raw = (tmp_path / rel[1]).read_bytes()
    (tmp_path / rel[1]).write_bytes(raw[: len(raw) // 3])
    (tmp_path / rel[2]).unlink()
    labels = patches.frame["label"].astype(str).tolist()
    labels[3] = "maybe"
    split = [split_by_patient(patches)[p] for p in patches.frame["patient_id"]]
    frame = pd.DataFrame({"path": rel, "label": labels, "patient_id": patches.frame["patient_id"],
                          "split": split})  # fmt: skip
    frame.to_csv(tmp_path / "m.csv", index=False)
    cfg = cfg_for("manifest", path=str(tmp_path / "m.csv"), on_bad_file="skip")
    bundle = data.build(cfg, seed=0)
    assert len(bundle.manifest) == len(rel) - 3 == len(bundle.images)
    skipped = dict(zip(bundle.skipped["path"], bundle.skipped["problem"], strict=True))
    assert set(skipped) == {rel[1], rel[2], rel[3]}
    assert "truncated" in skipped[rel[1]] and skipped[rel[2]] == "missing file"
    assert rel[1] not in {Path(p).as_posix()[-len(rel[1]) :] for p in bundle.manifest["path"]}
    # Structural problems are not files: they still stop the run, even when skipping.
    frame.loc[10, "split"] = "test" if frame.loc[10, "split"] != "test" else "val"
    frame.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(DataValidationError, match="more than one split") as info:
        data.build(cfg, seed=0)
    assert "after skipping 3 bad files" in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.equivocal=maybe", "data.equivocal"),
        ("data.on_bad_file=ignore", "data.on_bad_file"),
        ("data.patient_regex='(unclosed'", "data.patient_regex"),
        ("data.patient_regex=P", "data.patient_regex"),
        ("data.label_map.her2_pos=2", "data.label_map"),
        ("data.verify=quick", "data.verify"),
        ("data.source=hdf5", "data.source"),
    ],
)
def test_bad_data_settings_fail_validation(override: str, key: str) -> None:
    cfg = compose_train(["data=folder", override])
    with pytest.raises(ConfigError, match=f"^{key}="):
        validate(cfg)


def test_score_map_leaves_2plus_to_equivocal() -> None:
    # "2+" cannot be written in a Hydra override key; a config file can set it.
    cfg = compose_train(["data=manifest"])
    with open_dict(cfg):
        cfg.data.score_map["2+"] = 1
    with pytest.raises(ConfigError, match="^data.score_map=.*data.equivocal decides 2"):
        validate(cfg)


# --- CLI, export, training ----------------------------------------------------------------------


def manifest_command(*overrides: str) -> int:
    """her2exp-manifest in this process (its main on the composed config): the exit status."""
    try:
        manifest_cli.main(compose("manifest", list(overrides)))
    except SystemExit as exc:
        return int(exc.code)
    return 0


def test_manifest_cli_writes_what_data_manifest_loads(
    tmp_path: Path, patches: synthetic.SyntheticData, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "patches"
    write_tree(root, patches)
    out = tmp_path / "lists" / "cohort.csv"
    argv = [f"input={root}", f"patient_regex='{REGEX}'", "seed=7", f"image_size={SIZE}"]
    assert manifest_command(*argv, f"out={out}") == 0
    assert "wrote 48 rows" in capsys.readouterr().out
    written = pd.read_csv(out)
    assert list(written.columns) == ["path", "label", "patient_id", "slide_id", "site", "split"]
    assert not written["path"].str.startswith("/").any()  # relative to the CSV: portable
    from_manifest = data.build(cfg_for("manifest", path=str(out)), seed=0)
    from_folder = data.build(cfg_for("folder", root=str(root), patient_regex=REGEX), seed=7)
    pd.testing.assert_frame_equal(from_manifest.manifest, from_folder.manifest)
    np.testing.assert_array_equal(from_manifest.images, from_folder.images)
    # A bad file: reported by name, exit status 2 (the user's data), nothing written.
    (root / written["path"][0].removeprefix("../../patches/")).write_bytes(b"\x89PNG\r\n")
    assert manifest_command(*argv, f"out={tmp_path / 'x.csv'}") == 2
    assert "unreadable" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_export_then_train_on_the_folder_streamed(tmp_path: Path) -> None:
    from her2exp.training.run import train

    root = tmp_path / "exported"
    export = [f"export_synthetic={root}", "n_patients=24", "patches_per_patient=6"]
    assert manifest_command(*export, f"image_size={SIZE}") == 0
    manifest = pd.read_csv(root / "manifest.csv")
    assert len(manifest) == 144 and (root / manifest["path"][0]).is_file()
    cfg = compose_train(
        ["experiment=smoke", "tracking=off", "data=folder", f"data.root={root}",
         f"data.image_size={SIZE}", f"data.patient_regex='{REGEX}'",
         # Streamed (data.cache=false): cache=true is every synthetic run's path,
         # and test_streaming.py shows the two feed the model the same inputs.
         "data.cache=false"],
        tmp_path / "run",
    )  # fmt: skip
    summary = train(cfg)
    assert 0.0 <= summary["best_val_auc"] <= 1.0
    assert 0.0 <= summary["test_evaluation"].auc.auc <= 1.0
    assert len(summary["data_fingerprint"]) == 16
