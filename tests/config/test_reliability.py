"""Issue 15, the training side: every number has a range, no override gives a traceback, a
patient with both labels is named before training, a run directory is never overwritten by
accident and a resume never continues a changed experiment (her2exp/config/, cli/schemas.py,
data/sources.py, rundir.py)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf, open_dict
from PIL import Image

from conftest import compose_train
from her2exp import config
from her2exp.cli import common
from her2exp.config import ConfigError
from her2exp.config import commands as schemas
from her2exp.core import checkpoint
from her2exp.data import sources, synthetic
from her2exp.data.sources import DataValidationError
from her2exp.runtime import rundir

COMMANDS = {"train": config.TrainConfig, **schemas.SCHEMAS}
#: What a command needs to pass its checks at all (the walk changes one number at a time).
REQUIRED = {
    "eval": ["run_id=abc"],
    "predict": ["input=.", "run_id=abc"],
    "manifest": ["input=."],
    "prepare": ["out=x", "stain=macenko"],
    "tile": ["input=pyproject.toml", "out=x"],
    "promote": ["name=her2", "version=1"],
    "export": ["run_id=abc"],
}
NUMERIC = {name: config.numeric_fields(schema) for name, schema in COMMANDS.items()}


# -- 6. every numeric option has its range ---------------------------------------------------
def test_every_numeric_option_declares_its_range() -> None:
    missing = [
        f"{name}: {key}"
        for name, schema in COMMANDS.items()
        for key, _, _, bounds in config.numeric_fields(schema)
        if bounds is None
    ]
    assert not missing, f"numeric options without a range (config.ranged): {missing}"


@pytest.mark.parametrize("command", [c for c in sorted(COMMANDS) if NUMERIC[c]])
def test_a_value_outside_each_range_is_refused_naming_the_key(command: str) -> None:
    """The schema walk: for every number of every command, each value just past a bound (and
    NaN) is refused by the command's own checks with the key named, before any work."""
    base, tried = schemas.validate_only(command, REQUIRED.get(command, [])), 0
    for key, kind, _, bounds in NUMERIC[command]:
        for value in bounds.outside(kind is int):
            cfg = copy.deepcopy(base)
            OmegaConf.update(cfg, key, value)  # as an override merges it (typed by the schema)
            with pytest.raises(ConfigError) as info:
                schemas.CHECKS[command](cfg)
            assert f"{key}=" in str(info.value) and "is not allowed" in str(info.value)
            tried += 1
    assert tried >= (60 if command == "train" else 1)


def test_the_two_values_the_probe_found_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"trainer.min_lr_ratio=-1.0 is not allowed \(.*\[0, 1\]"):
        schemas.validate_only("train", ["trainer.min_lr_ratio=-1"])
    with pytest.raises(ConfigError, match=r"loss.label_smoothing=1.5 is not allowed"):
        schemas.validate_only("train", ["loss.label_smoothing=1.5"])
    cfg = schemas.validate_only("train", ["trainer.min_lr_ratio=0", "loss.label_smoothing=0.1"])
    assert cfg.trainer.min_lr_ratio == 0


def _leaf_keys(schema: type, prefix: str = "") -> list[str]:
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    keys = []
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        base = inner[0] if len(inner) == 1 else hint
        if dataclasses.is_dataclass(base):
            keys += _leaf_keys(base, f"{prefix}{f.name}.")
        elif f.name != "output_dir":
            keys.append(f"{prefix}{f.name}")
    return keys


VALUES = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["null", "true", "false", "abc", "''", "[1,2]", "{a:1}", "0", "-1", "1e400"]),
    st.text(alphabet="ab01.+-_/ ", min_size=1, max_size=6).map(lambda s: f"'{s}'"),
)


# Compositions per command (~0.25 s each): the commands with the most keys and cross-group
# checks get the most; the rest share one composition path (hydra_command) and get fewer.
EXAMPLES = {"train": 25, "eval": 25, "predict": 25}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_any_override_is_accepted_or_one_line_never_a_traceback(command: str) -> None:
    """Property: compose + the command's checks (the validate-only entry) either accept the
    overrides or raise what the command convention prints as one `her2exp: ...` line."""
    keys = _leaf_keys(COMMANDS[command])
    overrides = st.lists(st.tuples(st.sampled_from(keys), VALUES), min_size=1, max_size=3)

    @settings(
        max_examples=EXAMPLES.get(command, 12),
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(overrides)
    def check(pairs: list[tuple[str, str]]) -> None:
        argv = [f"{k}={v}" for k, v in pairs]
        try:
            schemas.validate_only(command, argv)
        except Exception as exc:  # noqa: BLE001 - the property is about what escapes
            assert common._is_user_error(exc), (argv, repr(exc))
            line = common.one_line(exc) if not isinstance(exc, ConfigError) else str(exc)
            assert line and "\n" not in line, (argv, line)

    check()


# -- 2. a patient whose patches carry both labels ------------------------------------------------
def _mixed_manifest(root: Path) -> Path:
    """12 patients of synthetic patches; patient P0000 gets one patch relabelled HER2+."""
    d = synthetic.generate(n_patients=12, patches_per_patient=4, image_size=32, seed=0)
    rows = []
    for k, (image, rec) in enumerate(zip(d.images, d.frame.to_dict("records"), strict=True)):
        rel = f"img/{k:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / rel)
        rows.append({"path": rel, "label": rec["label"], "patient_id": rec["patient_id"]})
    frame = pd.DataFrame(rows)
    negative = frame.groupby("patient_id")["label"].max().eq(0)
    victim = sorted(negative.index[negative])[0]
    first = frame.index[frame["patient_id"] == victim][0]
    frame.loc[first, "label"] = 1  # 1 HER2+ patch, 3 HER2-: majority says HER2-
    frame.to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def _data_cfg(path: Path, **extra):
    cfg = compose_train(["data=manifest", f"data.path={path}", "data.image_size=32"]).data
    with open_dict(cfg):
        for k, v in extra.items():
            cfg[k] = v
    return cfg


def test_a_patient_with_both_labels_is_listed_before_training(tmp_path: Path) -> None:
    path = _mixed_manifest(tmp_path)
    victim = pd.read_csv(path).groupby("patient_id")["label"].nunique().pipe(lambda s: s[s > 1])
    (pid,) = victim.index
    for seed in (0, 1, 2):  # whichever split the patient would land in
        with pytest.raises(DataValidationError) as info:
            sources.load(_data_cfg(path), seed)
        message = str(info.value)
        assert f"patient {pid!r}" in message and "1 HER2+ (img/" in message
        assert "3 HER2- (" in message and "data.patient_label=max|majority" in message
    with pytest.raises(ConfigError, match="data.patient_label='mean' is not allowed"):
        schemas.validate_only("train", ["data.patient_label=mean"])


@pytest.mark.parametrize(("rule", "status"), [("max", 1), ("majority", 0)])
def test_patient_label_max_or_majority_relabels_every_patch(
    tmp_path: Path, rule: str, status: int
) -> None:
    path = _mixed_manifest(tmp_path)
    frame = pd.read_csv(path)
    pid = frame.groupby("patient_id")["label"].nunique().pipe(lambda s: s[s > 1]).index[0]
    loaded = sources.load(_data_cfg(path, patient_label=rule), 0)
    labels = loaded.manifest.loc[loaded.manifest["patient_id"] == pid, "label"]
    assert len(labels) == 4 and set(labels) == {status}
    others = loaded.manifest[loaded.manifest["patient_id"] != pid]
    by_path = frame.set_index(frame["path"].map(lambda rel: str(tmp_path / rel)))["label"]
    expected = by_path.loc[others["path"]].to_numpy()
    assert (others["label"].to_numpy() == expected).all()  # nobody else changes


# -- 3. and 5. the run directory --------------------------------------------------------------
@pytest.fixture()
def earlier_run(tmp_path: Path, smoke_run) -> Path:
    """A run directory holding the session smoke run's checkpoints (config experiment=smoke)."""
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run.run_dir / "checkpoints", run_dir / "checkpoints")
    shutil.copytree(smoke_run.run_dir / "reports", run_dir / "reports")
    return run_dir


def _plan(run_dir: Path, *overrides: str) -> rundir.ResumePlan:
    cfg = compose_train(["experiment=smoke", "tracking=off", *overrides], run_dir)
    return rundir.plan(cfg, run_dir, restarts=0)


def test_a_run_directory_with_a_checkpoint_is_not_overwritten(earlier_run: Path) -> None:
    from her2exp.training.run import train

    before = {p: p.read_bytes() for p in earlier_run.rglob("*") if p.is_file()}
    cfg = compose_train(["experiment=smoke", "tracking=off"], earlier_run)
    with pytest.raises(ConfigError, match="holds the checkpoint .*last.pt of an earlier run"):
        train(cfg)
    assert {p: p.read_bytes() for p in earlier_run.rglob("*") if p.is_file()} == before
    assert _plan(earlier_run, "trainer.resume=auto").path == earlier_run / "checkpoints/last.pt"


def test_overwrite_true_removes_the_earlier_run_then_starts_fresh(earlier_run: Path) -> None:
    from her2exp.training.builders import build_runtime

    cfg = compose_train(["experiment=smoke", "tracking=off", "trainer.overwrite=true"], earlier_run)
    runtime = build_runtime(cfg)
    assert runtime.resume.path is None and not runtime.continue_run
    assert not (earlier_run / "checkpoints").exists() and not (earlier_run / "reports").exists()
    (earlier_run / "mlflow_buffer.jsonl").write_text('{"op": "log_metric"}\n')
    (earlier_run / "checkpoints").mkdir()
    checkpoint.save({"epoch": 1}, earlier_run / "checkpoints" / "last.pt")
    with pytest.raises(ConfigError, match="still holds MLflow calls of the earlier run"):
        build_runtime(cfg)  # unsent calls are not thrown away silently


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.lr=0.01", "trainer.lr: 0.003 -> 0.01"),
        ("model.drop_rate=0.3", "model.drop_rate: 0.0 -> 0.3"),
        ("trainer.epochs=5", "trainer.epochs: 2 -> 5"),  # the cosine schedule spans the epochs
        ("data.n_patients=30", "data.n_patients: 24 -> 30"),
    ],
)
def test_resume_refuses_a_changed_experiment_listing_the_keys(
    earlier_run: Path, override: str, key: str
) -> None:
    with pytest.raises(ConfigError, match="was trained with another experiment") as info:
        _plan(earlier_run, "trainer.resume=auto", override)
    assert key in str(info.value) and "trainer.resume_force=true" in str(info.value)
    forced = _plan(earlier_run, "trainer.resume=auto", override, "trainer.resume_force=true")
    assert forced.path is not None and forced.forced_changes == [key]


def test_resume_allows_what_does_not_change_the_experiment(earlier_run: Path) -> None:
    plan = _plan(
        earlier_run,
        "trainer.resume=auto",
        "data.num_workers=1",
        "trainer.progress=true",
        "tracking.experiment=other",
        "trainer.stop_after_epoch=1",
        "evaluation.n_boot=50",
    )
    assert plan.path is not None and plan.forced_changes == []


def test_resume_refuses_other_data(earlier_run: Path, tmp_path: Path) -> None:
    """Same config, other data: the stored fingerprint differs (a re-saved copy, checksum ok)."""
    from her2exp.training.run import train

    last = earlier_run / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    assert state["data_fingerprint"]  # every last.pt records its data now
    checkpoint.save({**state, "data_fingerprint": "0" * 16}, last)
    cfg = compose_train(["experiment=smoke", "tracking=off", "trainer.resume=auto"], earlier_run)
    with pytest.raises(ConfigError, match="was trained on other data .*resume_force=true"):
        train(cfg)
    assert checkpoint.load(last)["epoch"] == state["epoch"]  # untouched


def test_a_missing_or_damaged_resume_checkpoint_is_one_error_before_any_work(
    tmp_path: Path, earlier_run: Path
) -> None:
    with pytest.raises(ConfigError, match=r"trainer.resume=.*nope.pt: no such file"):
        _plan(tmp_path / "fresh", f"trainer.resume={tmp_path / 'nope.pt'}")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk.pt is not a her2exp checkpoint that loads"):
        _plan(tmp_path / "fresh", f"trainer.resume={junk}")
    last = earlier_run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:-10])  # truncated: the checksum no longer matches
    with pytest.raises(ConfigError, match=r"does not match its checksum"):
        _plan(earlier_run, "trainer.resume=auto")


def test_training_writes_only_its_run_directory_and_tracking_store(smoke_run) -> None:
    """The other commands are covered in test_reliability_files.py; the shared smoke run ran in
    an empty cwd with the default tracking URI (./mlflow.db, artifacts in ./mlartifacts)."""
    assert set(smoke_run.created) == {"run", "mlflow.db", "mlartifacts"}
