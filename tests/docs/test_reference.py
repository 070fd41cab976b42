"""Issue 33: docs/reference is generated from the code (her2exp/cli/reference.py), and a committed
page that no longer matches the code fails here, naming the page. The pages hold every key of
every command and every option of conf/, and are MyST that `sphinx-build -W` takes: one title,
no heading level skipped, no absolute path of this checkout."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import CONF, REPO
from her2exp.cli.help import show_value
from her2exp.cli.reference import PAGES, flatten, main, text
from her2exp.config.commands import CHECKS
from her2exp.config.keys import command_keys

REFERENCE = REPO / "docs" / "reference"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pages generated now, through the module's command line (`make reference`)."""
    out = tmp_path_factory.mktemp("reference")
    assert main([str(out)]) == 0
    return out


def test_every_committed_page_equals_a_fresh_generation(fresh: Path) -> None:
    stale = [
        name
        for name in sorted(PAGES)
        if not (REFERENCE / name).is_file()
        or (REFERENCE / name).read_text() != (fresh / name).read_text()
    ]
    assert not stale, f"docs/reference/{', '.join(stale)} stale: run make docs (make reference)"
    assert sorted(p.name for p in fresh.iterdir()) == sorted(PAGES)


def sections(page: str, marker: str) -> dict[str, str]:
    """The page's sections under headings that start with `marker`, by heading text."""
    found: dict[str, str] = {}
    for chunk in page.split(f"\n{marker}")[1:]:
        title, _, body = chunk.partition("\n")
        found[title.strip()] = body.split(f"\n{marker[:-1]} ", 1)[0]
    return found


def test_every_command_of_pyproject_and_each_of_its_keys_is_in_commands_md(fresh: Path) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    by_command = sections((fresh / "commands.md").read_text(), "## ")
    assert sorted(by_command) == sorted(scripts) == sorted(f"her2exp-{c}" for c in CHECKS)
    for command in CHECKS:
        section = by_command[f"her2exp-{command}"]
        missing = [k.name for k in command_keys(command) if f"| `{k.name}` |" not in section]
        assert not missing, f"her2exp-{command}: {missing} not in commands.md"
    # The composed default (conf/trainer/default.yaml's 6), not the schema's 10.
    assert "`trainer.epochs` | `int` | `6` | an integer >= 1 |" in by_command["her2exp-train"]


def test_every_option_file_of_conf_and_each_key_it_sets_is_in_groups_md(fresh: Path) -> None:
    by_option = sections((fresh / "groups.md").read_text(), "### ")
    options = sorted(p for p in CONF.glob("*/**/*.yaml"))
    assert len(options) > 40
    for path in options:
        group = path.parent.relative_to(CONF).as_posix()
        section = by_option[f"{group}={path.stem}"]
        values = yaml.safe_load(path.read_text()) or {}
        values.pop("defaults", None)
        unset = [key for key, _ in flatten(values) if f"{key}: " not in section]
        assert not unset, f"{group}={path.stem}: {unset} not in groups.md"
    for entry in CONF.glob("*.yaml"):
        assert entry.name in by_option
    medical = by_option["experiment=medical_grade"]
    assert "override /trainer: medical" in medical and "trainer.early_stop_patience: 15" in medical
    assert "trainer.lr: 3e-4" in by_option["trainer=medical"]


@pytest.mark.parametrize("name", sorted(PAGES))
def test_pages_are_one_titled_myst_document_without_a_local_path(fresh: Path, name: str) -> None:
    page = (fresh / name).read_text()
    levels, fenced = [], False
    for line in page.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            levels.append(len(line.split(" ", 1)[0]))
    assert levels[0] == 1 and levels.count(1) == 1, levels
    assert all(b - a <= 1 for a, b in zip(levels, levels[1:], strict=False)), levels
    assert str(REPO) not in page and str(Path.home()) not in page


def test_text_escapes_markdown_outside_code_spans_and_pipes_everywhere() -> None:
    assert text("a|b <run dir>\n*x* `c|<d>`") == r"a\|b \<run dir> \*x\* `c\|<d>`"
    assert text("# not a heading > x") == r"\# not a heading > x"


def test_a_string_in_a_list_keeps_its_spaces_quoted_as_an_override_writes_it() -> None:
    """conf/hydra/launcher/her2_slurm.yaml's `setup` once read `[exportNCCL_...=1]`."""
    assert show_value(["export X=1", "a"]) == "['export X=1',a]"
    assert show_value({"neg": 0, "pos": [1, None]}) == "{neg:0,pos:[1,null]}"
