"""One name per concept (issue 32, docs/names.md): every old spelling still composes, as its
new key, with one warning naming the new key; the new keys are the commands' own; every
command that takes a trained model takes the same keys for it. Real Hydra composition."""

from __future__ import annotations

import sys

import pytest
from omegaconf import OmegaConf

from her2exp.cli.common import compose
from her2exp.config.common import SOURCES
from her2exp.config.keys import command_keys
from her2exp.config.renames import RENAMED

#: A value for each old key that its new key accepts.
VALUES = {
    "slide_table": "slides.csv",
    "tiles.workers": 3,
    "root": "/data/patches",
    "run_dir": "/runs/a",
    "dir": "/srv/mlflow",
    "workers": 2,
    "experiment": "other",
    "output": "scores.csv",
    "evaluation.tta": "d4",
    "output_dir": "reruns/a",
}
OLD_SPELLINGS = [(c, old, new) for c, table in RENAMED.items() for old, new in table.items()]


@pytest.mark.parametrize(("command", "old", "new"), OLD_SPELLINGS)
def test_an_old_spelling_still_works_and_names_the_new_key(command, old, new, capsys) -> None:
    assert new in {k.name for k in command_keys(command)}
    assert old not in {k.name for k in command_keys(command)}  # one name in the schema
    value = VALUES[old]
    cfg = compose(command, [f"{old}={value}"])
    assert OmegaConf.select(cfg, new) == value
    err = capsys.readouterr().err
    assert f"her2exp: warning: {old}= is an old name in her2exp-{command}: write {new}=" in err


def test_the_command_line_warns_and_refuses_in_the_new_names(tmp_path, monkeypatch, capsys):
    from her2exp.cli.tile import main

    missing = tmp_path / "slides.csv"
    monkeypatch.setattr(sys, "argv", ["her2exp-tile", f"slide_table={missing}", "out=x"])
    with pytest.raises(SystemExit) as info:
        main()
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2
    assert lines[0].startswith("her2exp: warning: slide_table= is an old name in her2exp-tile")
    assert lines[1] == f"her2exp: input={missing}: no such file", lines


@pytest.mark.parametrize("command", ["eval", "predict", "export"])
def test_every_command_that_takes_a_trained_model_takes_the_same_keys(command) -> None:
    keys = {k.name for k in command_keys(command)}
    expected = set(SOURCES) - ({"sweep_run_id"} if command == "export" else set())
    assert keys & set(SOURCES) == expected  # export: a graph of one run, never an ensemble
