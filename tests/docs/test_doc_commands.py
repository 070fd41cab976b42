"""Every command line the README and the documentation site show is composed (issue 33).

The README's commands had drifted from the commands (old key names, keys that no longer
existed) with nothing to notice. Here each `her2exp-*`, `torchrun ... -m her2exp.train`,
`python -m her2exp.train` and `make <target> ARGS=...` line of a ```bash block goes through what
the command itself runs before any work, in-process: the name table (no old spelling), the flag
and key checks with their did-you-mean, Hydra's composition over conf/ with the schema's types,
each value of a `-m` sweep, and the command's own value checks. The checks that look at the
user's files (a data root, a run id, a slide table) are the only thing left out: a page's
example paths do not exist here.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from her2exp.cli.common import check_flags, check_sweep
from her2exp.config import ConfigError
from her2exp.config.commands import CHECKS
from her2exp.config.compose import compose_hydra, is_multirun, without_hydra
from her2exp.config.keys import check_overrides
from her2exp.config.renames import renamed
from her2exp.core.errors import UserError

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if "_build" not in p.parts]
_FENCE = re.compile(r"(```+|~~~+)\s*\{?([\w-]*)")
_SHELL = {"bash", "sh", "shell", "console", "zsh"}
_ASSIGN = re.compile(r"(?:export\s+)?([A-Za-z_]\w*)=(\S.*)")
_SHOWS = {"--help", "-h", "--hydra-help", "--shell-completion", "--cfg", "-c", "--info", "-i"}
_MODULES = {"her2exp.train": "train"}


@dataclass(frozen=True)
class Line:
    """One command line as a page shows it, and where."""

    page: str
    number: int
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.number}: {self.text}"


def shell_lines(page: Path) -> list[Line]:
    """The logical lines of a page's shell blocks: continuations joined, prompts dropped."""
    lines: list[Line] = []
    fence, shell, pending, start = "", False, "", 0
    variables: dict[str, str] = {}
    for number, raw in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not fence:
            opening = _FENCE.match(line)
            if opening:
                fence, shell = opening.group(1), opening.group(2).lower() in _SHELL
            continue
        if line.startswith(fence) and not line.strip("`~"):
            fence = ""
            continue
        if not shell:
            continue
        if not pending:
            start, line = number, line.removeprefix("$ ")
        pending = f"{pending} {line}".strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        assigned = _ASSIGN.fullmatch(pending)
        if assigned:  # D="data=... data.path=..." on its own line, used as $D below
            variables[assigned.group(1)] = " ".join(shlex.split(assigned.group(2)))
        elif pending and not pending.startswith("#"):
            lines.append(Line(_name(page), start, _expand(pending, variables)))
        pending = ""
    return lines


def _expand(line: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: variables.get(m.group(1), m.group(0)), line)


def _name(page: Path) -> str:
    return page.relative_to(REPO).as_posix() if page.is_relative_to(REPO) else page.name


def _make_recipe(target: str) -> list[str] | None:
    """The her2exp command of a Makefile target that passes $(ARGS) on, as tokens."""
    recipe = re.search(
        rf"^{re.escape(target)}:.*?\n((?:\t.*\n?)+)", (REPO / "Makefile").read_text(), re.M
    )
    if recipe is None:
        raise AssertionError(f"make {target}: no such target in the Makefile")
    for raw in recipe.group(1).splitlines():
        if "$(ARGS)" in raw and ("her2exp" in raw) and "her2exp.bench" not in raw:
            raw = raw.replace("$(VENV)/bin/", "").replace("$(CURDIR)", str(REPO))
            return shlex.split(raw.replace("$(ARGS)", "").strip())
    return None


def command_of(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(config name, arguments) of one command's tokens, or None for another program's."""
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):  # VAR=value prefix
        tokens = tokens[1:]
    if not tokens:
        return None
    program, args = Path(tokens[0]).name, tokens[1:]
    if program.startswith("her2exp-") and "$" not in program:  # not a `for c in ...` loop
        command = program.removeprefix("her2exp-")
        if not (REPO / "conf" / f"{command}.yaml").is_file():
            raise AssertionError(f"{program}: no such command (no conf/{command}.yaml)")
        return command, args
    if program in {"torchrun", "python", "python3", "srun"} and "-m" in args:
        at = args.index("-m")
        module = args[at + 1] if at + 1 < len(args) else ""
        return (_MODULES[module], args[at + 2 :]) if module in _MODULES else None
    if program == "make":
        targets = [a for a in args if "=" not in a and not a.startswith("-")]
        extra = [a.partition("=")[2] for a in args if a.startswith("ARGS=")]
        recipe = _make_recipe(targets[0]) if targets else None
        if recipe is None:
            return None
        found = command_of(recipe)
        return None if found is None else (found[0], found[1] + shlex.split(" ".join(extra)))
    return None


def commands(line: Line) -> list[tuple[str, list[str]]]:
    """Every her2exp command of a shell line (`a && b`, `a; b`, pipes)."""
    out = []
    for part in re.split(r"\s(?:&&|\|\||;|\|)\s", line.text):
        try:
            tokens = shlex.split(part, comments=True)
        except ValueError as exc:  # another tool's multi-line quote (curl -d "{ ...)
            if not re.match(r"\s*(\S+=\S+\s+)*(her2exp-|torchrun|make|python)", part):
                continue
            raise AssertionError(f"{line}: not a shell line ({exc})") from None
        found = command_of(tokens)
        if found is not None:
            out.append(found)
    return out


def compose_line(command: str, args: list[str]) -> None:
    """What the command runs on `args` before any work, as cli.common.hydra_command does."""
    if any(a in _SHOWS for a in args):  # shows something, runs nothing
        return
    new, notes = renamed(command, args)
    assert not notes, f"old spelling: {notes}"
    check_flags(command, new)
    overrides = [a for a in new if not a.startswith("-")]
    check_overrides(command, overrides)
    if "-m" in new or "--multirun" in new:
        check_sweep(command, new)  # each value of each swept key composed
        return
    full = compose_hydra(command, overrides)
    if not is_multirun(full):
        _values_only(command, without_hydra(full))


def _values_only(command: str, cfg: object) -> None:
    """The command's own checks, where they ask about values; a refusal naming a file, folder,
    run or table the page only names as an example (missing here, or there from an earlier
    try) is the user's data, not the line."""
    try:
        CHECKS[command](cfg)
    except (UserError, ConfigError) as exc:
        if not _about_missing_input(str(exc)):
            raise


_MISSING = re.compile(
    r"(does not exist|not found|no such|not a (file|folder|directory)|no run|cannot reach|"
    r"unreachable|no MLflow|no experiment|not readable|is empty|no registered|is not empty|exists)",
    re.I,
)


def _about_missing_input(message: str) -> bool:
    return bool(_MISSING.search(message))


ALL_LINES = [line for page in PAGES for line in shell_lines(page)]


#: One test per distinct command line (the first page showing it names it): the README and
#: Getting started share their tour.
def _key(line: Line) -> tuple:
    return tuple((command, tuple(args)) for command, args in commands(line))


HER2EXP_LINES = list({_key(ln): ln for ln in reversed(ALL_LINES) if commands(ln)}.values())[::-1]


def test_the_pages_show_commands() -> None:
    """The extraction finds the README's commands (an empty list would pass everything)."""
    readme = [line for line in HER2EXP_LINES if line.page == "README.md"]
    assert any("make train" in line.text for line in ALL_LINES if line.page == "README.md")
    assert len(readme) >= 3, [str(line) for line in readme]


@pytest.mark.parametrize("line", HER2EXP_LINES, ids=str)
def test_command_line_composes(line: Line) -> None:
    for command, args in commands(line):
        try:
            compose_line(command, args)
        except Exception as exc:  # noqa: BLE001 - the page line is the news, not the stack
            pytest.fail(f"{line}\n  her2exp-{command}: {type(exc).__name__}: {exc}")


def test_a_wrong_line_is_caught(tmp_path: Path) -> None:
    """The check refuses what a stale page would show: an old name, an unknown key and a value
    the command's checks refuse (not taken for a missing example file)."""
    page = tmp_path / "p.md"
    page.write_text(
        "```bash\nher2exp-tile slide_table=t.csv out=o\nher2exp-train trainer.epoch=3\n"
        "her2exp-train trainer.lr=-1\n```\n"
    )
    lines = shell_lines(page.resolve())
    assert [line.text for line in lines] == [
        "her2exp-tile slide_table=t.csv out=o",
        "her2exp-train trainer.epoch=3",
        "her2exp-train trainer.lr=-1",  # a value the command's own checks refuse
    ]
    for line in lines:
        (command, args), *_ = commands(line)
        with pytest.raises(Exception):  # noqa: B017 - an AssertionError or the one-line error
            compose_line(command, args)


def test_make_lines_compose_their_recipe() -> None:
    """`make train ARGS=...` is the recipe's her2exp-train with the ARGS appended."""
    line = Line("x", 1, 'make train ARGS="trainer.epochs=2 model=resnet10t"')
    assert commands(line) == [("train", ["trainer.epochs=2", "model=resnet10t"])]
