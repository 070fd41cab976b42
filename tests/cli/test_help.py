"""Issue 32: `her2exp-<command> --help` is the command's own page (her2exp/cli/help.py), not
Hydra's stock one: its purpose, two or three examples, and only the groups and keys it takes,
each key with type, default, range and help (the schema's field metadata)."""

from __future__ import annotations

import importlib
import re
import sys

import pytest

from her2exp.config.commands import CHECKS
from her2exp.config.keys import command_keys

TRAIN_GROUPS = ["model", "loss", "data", "trainer", "stain", "tracking", "mil", "probe"]
GROUPS = {"train": [*TRAIN_GROUPS, "experiment"], "eval": ["data", "tracking"]}
GROUPS["prepare"] = ["data", "stain"]


def section(page: str, title: str) -> list[str]:
    """The indented lines under `title` (up to the next blank line)."""
    if title not in page:
        return []
    body = page.split(title, 1)[1].split("\n\n", 1)[0]
    return [line for line in body.splitlines()[1:] if line.startswith("  ")]


@pytest.mark.parametrize("command", sorted(CHECKS))
def test_help_shows_the_commands_purpose_examples_and_only_its_own_keys(
    command: str, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(sys, "argv", [f"her2exp-{command}", "--help"])
    assert importlib.import_module(f"her2exp.cli.{command}").main() is None
    page = capsys.readouterr().out
    assert page.startswith(f"her2exp-{command}") and "powered by Hydra" not in page
    examples = section(page, "Examples:")
    assert 2 <= len(examples) <= 3, page
    assert all(e.startswith(f"  her2exp-{command} ") for e in examples), examples
    groups = [line.split()[0] for line in section(page, "Groups") if not line.startswith("   ")]
    assert groups == GROUPS.get(command, []), page
    keys = re.findall(r"^  (\S+): \S", page, flags=re.MULTILINE)
    assert keys == [k.name for k in command_keys(command)]
    assert ("trainer.epochs" in keys) == (command == "train")
    assert ("tiles.processes" in keys) == (command == "tile")


def test_a_key_shows_its_type_default_range_and_help(monkeypatch, capsys) -> None:
    """Defaults as composed with the other overrides given (experiment=smoke: 2 epochs)."""
    monkeypatch.setattr(sys, "argv", ["her2exp-train", "experiment=smoke", "-h"])
    importlib.import_module("her2exp.cli.train").main()
    page = capsys.readouterr().out
    assert "  trainer.epochs: int = 2 (an integer >= 1)\n      training epochs" in page
    assert "  experiment  fm_probe, medical_grade, slurm, [smoke]" in page
