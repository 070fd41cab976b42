"""docs/reference/: the pages generated from the code, so that they cannot drift from it.

    python -m her2exp.cli.reference [OUT_DIR]     # `make reference`; OUT_DIR: docs/reference

A hand-written key table goes stale the day a default changes. Each page here is rendered from
what the commands run with: `commands.md` from every command's schema (config.keys.command_keys:
the type, default, range and help of `ranged`/`option`, in cli/help.py's wording, so that
`--help` and the page say the same), `groups.md` from conf/ (every group, every option with its
leading comment and the keys it sets), `mlflow.md` from tracking/schema.py (the metrics, tags and
artifacts a run writes). tests/docs/test_reference.py regenerates the pages and
fails on a committed page that differs. A page is one entry of PAGES (file name -> function
returning its MyST Markdown); output is deterministic (sorted, no time, no absolute path).

It sits in cli/, not apps/: the commands' purposes are their cli modules' docstrings and the
tables reuse cli/help.py, and only cli's own floor may import cli. Nothing heavy is imported
(the `light-cli` contract): a page that needs more imports it inside its function.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from her2exp.cli.help import command_defaults, key_range, purpose_and_examples, show_value
from her2exp.config.commands import CHECKS
from her2exp.config.compose import CONFIG_DIR
from her2exp.config.keys import command_groups, command_keys
from her2exp.core.fileio import atomic_write_text

DEFAULT_OUT = Path("docs/reference")
_GENERATED = (
    "Generated from the code by `make reference` (her2exp/cli/reference.py); "
    "{source}, not this page: tests/docs/test_reference.py fails while it is stale."
)
#: Outside code spans these would be Markdown (emphasis, raw HTML, links, MyST roles).
_SPECIAL = re.compile(r"([\\*_\[\]<|{}])|^([#>])")
_CODE_SPAN = re.compile(r"(`[^`\n]*`)")


def text(raw: str) -> str:
    """`raw` as literal Markdown on one line: Markdown characters escaped outside `code` spans,
    `|` escaped everywhere (a table cell ends at a bare one), newlines as spaces."""
    parts = _CODE_SPAN.split(" ".join(raw.split()))
    return "".join(
        p.replace("|", "\\|") if p.startswith("`") else _SPECIAL.sub(_escape, p) for p in parts
    )


def _escape(match: re.Match[str]) -> str:
    return "\\" + match.group(0)


def code(raw: str) -> str:
    """`raw` as a code span (an empty string shown as `""`)."""
    shown = raw if raw else '""'
    fence = "``" if "`" in shown else "`"
    return f"{fence}{shown.replace('|', chr(92) + '|')}{fence}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def command_section(command: str) -> list[str]:
    """her2exp-<command>: its purpose and examples (its cli module's docstring), its groups with
    the option each takes by default, and a table of every key."""
    doc = importlib.import_module(f"her2exp.cli.{command}").__doc__
    purpose, examples = purpose_and_examples(doc)
    defaults, choices = command_defaults(command, [])
    lines = [f"## her2exp-{command}", "", text(purpose), ""]
    if examples:
        lines += ["```text", *examples, "```", ""]
    groups = command_groups(command)
    if groups:
        chosen = ", ".join(f"{code(g)} = {code(str(choices.get(g)))}" for g in groups)
        lines += [f"Groups (`group=option`, options in [Config groups](groups.md)): {chosen}.", ""]
    rows = []
    for key in command_keys(command):
        help_text = text(key.help) if key.help.strip() else "**no help text**"
        value = code(show_value(defaults[key.name]))
        rows.append([code(key.name), code(key.type_name), value, text(key_range(key)), help_text])
    lines += _table(["Key", "Type", "Default", "Allowed", "Help"], rows)
    return [*lines, ""]


def commands_page() -> str:
    """Every command's keys: what `her2exp-<command> --help` prints, for every command."""
    lines = [
        "# Commands",
        "",
        _GENERATED.format(source="edit a key's help in her2exp/config/ or a command's docstring"),
        "",
        "Every command takes `key=value` overrides, and `group=option` for the groups it lists; "
        "`her2exp-<command> --help` prints the same facts, with the defaults of the options "
        "given. Allowed is the declared range (empty: any value of the type).",
        "",
    ]
    for command in sorted(CHECKS):
        lines += command_section(command)
    return "\n".join(lines).rstrip() + "\n"


def _leading_comment(path: Path) -> tuple[str | None, list[str]]:
    """(the `# @package` directive, the file's leading comment lines without `# `)."""
    package, comment = None, []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].removeprefix(" ")
        if body.startswith("@package"):
            package = body.split(None, 1)[1].strip()
        else:
            comment.append(body)
    return package, comment


def _comment_blocks(comment: list[str]) -> list[str]:
    """Prose lines as paragraphs; indented lines (command lines, examples) as text blocks."""
    out: list[str] = []
    prose: list[str] = []
    block: list[str] = []
    for line in [*comment, ""]:
        if line.startswith(" ") and line.strip():
            if prose:
                out += [text(" ".join(prose)), ""]
                prose = []
            block.append(line.strip())
            continue
        if block:
            out += ["```text", *block, "```", ""]
            block = []
        if line.strip():
            prose.append(line.strip())
        elif prose:
            out += [text(" ".join(prose)), ""]
            prose = []
    return out


def flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a loaded yaml mapping (an empty map is a leaf)."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from flatten(value, f"{prefix}{key}.")
    elif prefix:
        yield prefix[:-1], node


def _default_item(item: Any) -> str:
    if isinstance(item, dict):
        return ", ".join(f"{k}: {show_value(v)}" for k, v in item.items())
    return str(item)


def config_lines(path: Path, package: str) -> list[str]:
    """What a yaml file of conf/ sets: its defaults list, then every key it sets, dotted under
    its package (`trainer.epochs: 50` for conf/trainer/medical.yaml)."""
    loaded = yaml.safe_load(path.read_text()) or {}
    lines: list[str] = []
    defaults = loaded.pop("defaults", None) or []
    if defaults:
        lines += ["Defaults list:", "", "```text", *(_default_item(d) for d in defaults), "```", ""]
    prefix = "" if package in ("", "_global_") else f"{package}."
    values = [f"{key}: {show_value(v)}" for key, v in flatten(loaded, prefix)]
    if values:
        lines += ["Sets:", "", "```text", *values, "```", ""]
    elif not defaults:
        lines += ["Sets nothing: the schema's defaults stand.", ""]
    return lines


def option_section(group: str, path: Path) -> list[str]:
    """One option of a group: its leading comment and what it sets."""
    package, comment = _leading_comment(path)
    package = group.replace("/", ".") if package in (None, "_group_") else package
    lines = [f"### {group}={path.stem}", ""]
    lines += _comment_blocks(comment) or ["No leading comment in the file.", ""]
    return lines + config_lines(path, package)


def _entry_choices(conf: Path) -> dict[str, dict[str, str]]:
    """group -> {command: the option its entry config's defaults list takes}."""
    found: dict[str, dict[str, str]] = {}
    for entry in sorted(conf.glob("*.yaml")):
        for item in (yaml.safe_load(entry.read_text()) or {}).get("defaults", []):
            if isinstance(item, dict):
                for group, option in item.items():
                    found.setdefault(group, {})[f"her2exp-{entry.stem}"] = show_value(option)
    return found


def groups_page(conf: Path | None = None) -> str:
    """Every config group of conf/ and every option in it; then the entry configs."""
    conf = Path(CONFIG_DIR) if conf is None else conf
    train = yaml.safe_load((conf / "train.yaml").read_text()).get("defaults", [])
    rows = [
        [code(g), code(show_value(o))] for d in train if isinstance(d, dict) for g, o in d.items()
    ]
    lines = [
        "# Config groups",
        "",
        _GENERATED.format(source="edit conf/"),
        "",
        "A group is a folder of conf/ and an option one of its yaml files: `trainer=medical` "
        "composes conf/trainer/medical.yaml. Keys are shown as the command line writes them.",
        "",
        "## Defaults of her2exp-train",
        "",
        "The groups of conf/train.yaml's defaults list, in order, and the option each takes:",
        "",
        *_table(["Group", "Option"], rows),
        "",
    ]
    choices = _entry_choices(conf)
    groups = sorted({p.parent.relative_to(conf).as_posix() for p in conf.glob("*/**/*.yaml")})
    for group in groups:
        taken = choices.get(group, {})
        by = "; ".join(f"{c}: {code(o)}" for c, o in sorted(taken.items())) or "none"
        lines += [f"## {group}", "", f"Chosen by default by: {by}.", ""]
        for path in sorted((conf / group).glob("*.yaml")):
            lines += option_section(group, path)
    lines += ["## Entry configs", "", "conf/<command>.yaml, composed first by each command.", ""]
    for entry in sorted(conf.glob("*.yaml")):
        package, comment = _leading_comment(entry)
        lines += [f"### {entry.name}", "", *_comment_blocks(comment)]
        lines += config_lines(entry, package or "")
    return "\n".join(lines).rstrip() + "\n"


#: The generated pages: file name under docs/reference -> its Markdown. Adding a page is one
#: entry here (import a heavy module inside its function: the light-cli contract).
def mlflow_page() -> str:
    """What a run logs to MLflow: tracking/schema.py's metrics, tags and artifacts."""
    from her2exp.tracking.schema import reference_markdown

    return reference_markdown()


PAGES: dict[str, Callable[[], str]] = {
    "commands.md": commands_page,
    "groups.md": groups_page,
    "mlflow.md": mlflow_page,
}


def write_pages(out: Path = DEFAULT_OUT) -> list[Path]:
    """Every page of PAGES written (atomically) under `out`; the paths written."""
    return [atomic_write_text(Path(out) / name, render()) for name, render in sorted(PAGES.items())]


def main(argv: list[str] | None = None) -> int:
    """`python -m her2exp.cli.reference [OUT_DIR]`: write the pages, name each."""
    args = sys.argv[1:] if argv is None else argv
    for path in write_pages(Path(args[0]) if args else DEFAULT_OUT):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
