"""Hydra composition of every group option, schema validation, and bad input caught early."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF, compose_train, run_cli
from her2exp.config import ConfigError, validate
from her2exp.training import run as train_mod

GROUPS = ["model", "loss", "data", "trainer", "stain", "tracking", "experiment", "mil"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override",
    [f"{g}={o}" for g in GROUPS for o in _options(g)],
)
def test_every_group_option_composes_and_validates(override: str) -> None:
    group, option = override.split("=")
    # ViTs without dynamic_img_size (H-optimus-0, Prov-GigaPath) take their 224 px only.
    fixed = OmegaConf.load(CONF / group / f"{option}.yaml").get("min_image_size", 0)
    size = [f"data.image_size={fixed}"] if group == "model" and fixed > 64 else []
    cfg = compose_train([override, *size], output_dir=Path("/tmp/unused"))
    validate(cfg)
    if group == "loss":
        assert cfg[group].name == option
    if group == "model":  # the timm architecture; foundation models name their hub in hub_id
        assert cfg.model.name == OmegaConf.load(CONF / "model" / f"{option}.yaml").name


def test_defaults_are_the_documented_ones() -> None:
    cfg = compose_train()
    assert cfg.model.name == "resnet18" and cfg.model.pretrained is False
    assert cfg.data.source == "synthetic" and cfg.loss.name == "ce"
    assert cfg.tracking.backend == "mlflow" and cfg.tracking.uri == "sqlite:///mlflow.db"
    assert cfg.trainer.amp == "auto" and cfg.stain.name == "none"


def test_experiment_bundles_override_groups() -> None:
    smoke = compose_train(["experiment=smoke"])
    assert smoke.model.name == "test_resnet" and smoke.trainer.epochs == 2
    medical = compose_train(["experiment=medical_grade"])
    assert medical.loss.name == "focal" and medical.loss.use_class_weights
    assert medical.trainer.epochs == 50 and medical.trainer.early_stop_patience == 15


def test_unknown_key_fails_at_compose_time() -> None:
    with pytest.raises(ConfigCompositionException, match="trainer.learning_rate"):
        compose_train(["trainer.learning_rate=0.1"])
    # An explicit append gets past Hydra but not validation: the structured schema is closed.
    cfg = compose_train(["+trainer.learning_rate=0.1"])
    with pytest.raises(ConfigError, match=r"trainer.learning_rate is not a key .*trainer.lr\?"):
        validate(cfg)


def test_every_key_of_every_command_has_help() -> None:
    """The help `--help` prints sits in each schema field's metadata (ranged/option)."""
    from her2exp.config.commands import CHECKS
    from her2exp.config.keys import command_keys

    assert [f"{c}: {k.name}" for c in CHECKS for k in command_keys(c) if not k.help] == []


def test_typo_in_a_config_file_fails_at_compose_time(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "trainer" / "typo.yaml").write_text("epochs: 3\nlearning_rate: 0.1\n")
    import her2exp.training.run  # noqa: F401 - registers the schema

    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="Key 'learning_rate' not in"):
            compose(config_name="train", overrides=["trainer=typo"])


def test_wrong_type_fails_at_compose_time() -> None:
    with pytest.raises(ConfigCompositionException, match="trainer.epochs"):
        compose_train(["trainer.epochs=many"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.lr=0", "trainer.lr"),
        ("trainer.lr=-1e-3", "trainer.lr"),
        ("trainer.epochs=0", "trainer.epochs"),
        ("trainer.accumulation_steps=0", "trainer.accumulation_steps"),
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.amp=fp8", "trainer.amp"),
        ("loss.alpha=1.5", "loss.alpha"),
        ("data.split.test=0.5", "data.split"),
        ("data.image_size=8", "data.image_size"),
        ("data.prefetch_factor=2", "data.prefetch_factor"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override: str, key: str) -> None:
    cfg = compose_train([override])
    with pytest.raises(ConfigError, match=f"^{key}=") as info:
        validate(cfg)
    assert "allowed" in str(info.value)


def test_unknown_timm_model_names_close_matches(tmp_path: Path) -> None:
    cfg = compose_train(["experiment=smoke", "model.name=resnet181", "tracking=off"], tmp_path)
    with pytest.raises(ConfigError, match="model.name='resnet181'.*did you mean: .*resnet18"):
        train_mod.train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_image_too_small_for_the_model_fails_before_training(tmp_path: Path) -> None:
    # A ViT with a fixed 224 px position embedding cannot take 32 px patches; only a forward
    # pass finds that out, and it runs before the data set is built.
    cfg = compose_train(
        ["experiment=smoke", "tracking=off", "model.name=vit_tiny_patch16_224"], tmp_path
    )
    with pytest.raises(
        ConfigError, match=r"data.image_size=32 does not fit model.name=vit.*input size is 224 px"
    ):
        train_mod.train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_split_without_a_class_is_refused(tmp_path: Path) -> None:
    # 4 patients, 1 HER2+: that patient can only sit in one split.
    cfg = compose_train(
        ["experiment=smoke", "tracking=off", "data.n_patients=4", "data.patches_per_patient=3"],
        tmp_path,
    )
    with pytest.raises(ConfigError, match="split '(train|val|test)' has no HER2\\+"):
        train_mod.train(cfg)


def test_cli_reports_bad_input_in_one_line_and_exits_nonzero(tmp_path: Path) -> None:
    proc = run_cli(
        ["experiment=smoke", "trainer.lr=0", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "her2exp: trainer.lr=0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing tracked, nothing trained


def test_deprecated_option_still_composes_and_warns() -> None:
    """trainer.monitor does nothing any more: an old run's config (monitor: val_auc) still
    validates, with a warning naming the option, so `her2exp-rerun` keeps working."""
    cfg = compose_train(["trainer.monitor=val_auc"], Path("/tmp/unused"))
    with pytest.warns(FutureWarning, match=r"trainer.monitor='val_auc' is deprecated"):
        validate(cfg)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate(compose_train([], Path("/tmp/unused")))  # unset: silent


def test_deprecated_constant_is_still_importable_with_a_warning() -> None:
    from her2exp.config import STAIN_CHOICES
    from her2exp.stain import pipeline

    with pytest.warns(FutureWarning, match="STAIN_CHOICES is deprecated"):
        assert pipeline.STAIN_CHOICES == STAIN_CHOICES
