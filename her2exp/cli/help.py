"""`her2exp-<command> --help`: the command's own page, generated from what it runs with.

Hydra's stock page names Hydra, lists every group of conf/ (training's nine for every command)
and no key. This page reads the command's module docstring (its purpose, the first paragraph,
and its example lines), the groups its entry config lists (config.keys.command_groups) with
the option chosen, and every key of its schema with type, default, range and help
(config.keys.command_keys: the field metadata of `ranged`/`option`). Defaults are those of the
composed config, so `her2exp-train experiment=smoke --help` shows the smoke values. Hydra's own
page stays at `--hydra-help`. docs/reference/commands.md (cli/reference.py) is built from the
same functions (`command_defaults`, `key_range`, `show_value`), so the page and `--help` agree.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

from omegaconf import OmegaConf

from her2exp.config.compose import compose_choices
from her2exp.config.keys import Key, command_groups, command_keys

_EXAMPLES = 3
_WIDTH = 100


def purpose_and_examples(doc: str | None) -> tuple[str, list[str]]:
    """The docstring's first paragraph and its first example lines (indented lines that start
    with `her2exp-`; a trailing backslash continues one on the next line)."""
    text = textwrap.dedent(doc or "").strip()
    first = text.split("\n\n")[0].splitlines() if text else []
    purpose = " ".join(line.strip() for line in first).replace("`", "")
    examples: list[str] = []
    pending = ""
    for raw in (doc or "").splitlines():
        line = raw.strip()
        if pending:
            pending = f"{pending} {line}"
        elif raw.startswith("    ") and line.startswith("her2exp-"):
            pending = line
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        examples.append(pending)
        pending = ""
    return purpose, examples[:_EXAMPLES]


#: A string inside a list or map with one of these is quoted, as an override must quote it.
_NEEDS_QUOTES = re.compile(r"[\s,:\[\]{}'\"=]|^$")


def show_value(value: Any, nested: bool = False) -> str:
    """A value as a command line writes it (`null`, `true`, `[a,b]`, `[a,'b c']`): --help's
    and the reference's one wording (her2exp/cli/reference.py)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(show_value(v, nested=True) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{show_value(k, True)}:{show_value(v, True)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if nested and isinstance(value, str) and _NEEDS_QUOTES.search(value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def key_range(key: Key) -> str:
    """The key's declared range in `refuse`'s words; empty for a key without bounds."""
    return key.bounds.describe(key.kind == "int", key.optional) if key.bounds else ""


def command_defaults(command: str, overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(every key's default as composed, the option chosen in each group): the defaults of the
    entry config and its groups, which may differ from the schema's (`model.name`)."""
    cfg, choices = compose_choices(command, overrides)
    values = OmegaConf.to_container(cfg, resolve=False)
    found = {key.name: lookup(values, key.name) for key in command_keys(command)}
    return found, choices


def _key_lines(key: Key, value: Any) -> list[str]:
    bounds = f" ({key_range(key)})" if key.bounds else ""
    head = f"  {key.name}: {key.type_name} = {show_value(value)}{bounds}"
    body = textwrap.wrap(key.help, _WIDTH - 6, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return [head, *body]


def help_page(command: str, doc: str | None, overrides: list[str]) -> str:
    """The page `her2exp-<command> --help` prints (composed with the other overrides given)."""
    values, choices = command_defaults(command, overrides)
    purpose, examples = purpose_and_examples(doc)
    groups = command_groups(command)
    usage = f"her2exp-{command} {'[group=option ...] ' if groups else ''}[key=value ...]"
    lines = [*textwrap.wrap(purpose, _WIDTH), "", f"Usage: {usage}"]
    lines += ["", "Examples:", *(f"  {e}" for e in examples)] if examples else []
    if groups:
        lines += ["", "Groups (group=option; [the one chosen]):"]
        width = max(len(g) for g in groups)
        for group, options in groups.items():
            chosen = choices.get(group)
            shown = ", ".join(f"[{o}]" if o == chosen else o for o in options)
            wrapped = textwrap.wrap(shown, _WIDTH - width - 4)
            lines.append(f"  {group.ljust(width)}  {wrapped[0] if wrapped else '-'}")
            lines += [f"  {' ' * width}  {w}" for w in wrapped[1:]]
    lines += ["", "Keys (key=value; type = default (range), then what it does):"]
    for key in command_keys(command):
        lines += _key_lines(key, values[key.name])
    lines += [
        "",
        "A sweep: -m key=a,b. Hydra's own flags: --hydra-help, --cfg job, --info, "
        "--shell-completion.",
    ]
    return "\n".join(lines)


def lookup(values: Any, dotted: str) -> Any:
    """The value at a dotted key of a plain container; None where it is missing."""
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values
