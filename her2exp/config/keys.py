"""Every key and group a command takes, read from its schema and entry config, and the answer to
a command line that names something else: the closest valid keys, never a class name.

The schemas (her2exp/config/) hold each field's type, default, range and help (`ranged`,
`option`); `command_keys` flattens them into dotted keys, the one list that `--help` prints
(her2exp/cli/help.py) and that `check_overrides` and `flag_hint` match a mistake against. All of
it before Hydra composes anything and before torch, timm or mlflow are imported: a typo is
answered in well under a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from her2exp.config.compose import CONFIG_DIR
from her2exp.config.fields import Range, closest
from her2exp.config.store import SCHEMAS
from her2exp.config.train import TrainConfig
from her2exp.core.errors import UserError

_UNION = type(int | None)
#: A command line longer than this is not listed in a message: `--help` lists it.
_LISTED = 12


@dataclass(frozen=True)
class Key:
    """One `key=value` a command takes: what `--help` shows and a mistake is matched against."""

    name: str  # dotted, as on the command line
    kind: str  # int, float, bool, str, list, map or any
    optional: bool  # null allowed
    default: Any
    bounds: Range | None
    help: str

    @property
    def type_name(self) -> str:
        """`int`, `float | null`, `map`: the type as `--help` prints it."""
        return f"{self.kind} | null" if self.optional else self.kind

    def allowed(self) -> str:
        """What a value of this key may be, in the words of `refuse`'s messages."""
        if self.bounds is not None:
            return self.bounds.describe(self.kind == "int", self.optional)
        words = {
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "str": "a string",
            "list": "a list, e.g. [a,b]",
            "map": "a map, e.g. {a:1}",
            "any": "a value",
        }[self.kind]
        return f"null or {words}" if self.optional else words


def schema_of(command: str) -> type:
    """The structured schema of conf/<command>.yaml."""
    return TrainConfig if command == "train" else SCHEMAS[command]


def _kind(hint: Any) -> tuple[str, bool, Any]:
    """(kind, optional, the type itself) of a field's annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) in (typing.Union, _UNION) and len(args) < len(
        typing.get_args(hint)
    )
    base = args[0] if optional and len(args) == 1 else hint
    origin = typing.get_origin(base) or base
    names = {int: "int", float: "float", bool: "bool", str: "str", list: "list", dict: "map"}
    return names.get(origin, "any"), optional, base


def flat_keys(schema: type, prefix: str = "") -> list[Key]:
    """Every leaf of `schema` as a dotted `Key` (nested schemas flattened, in field order)."""
    hints = typing.get_type_hints(schema)
    found: list[Key] = []
    for f in dataclasses.fields(schema):
        kind, optional, base = _kind(hints[f.name])
        if dataclasses.is_dataclass(base):
            found += flat_keys(base, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        found.append(
            Key(
                f"{prefix}{f.name}",
                kind,
                optional,
                default,
                f.metadata.get("range"),
                f.metadata.get("help", ""),
            )
        )
    return found


@cache
def command_keys(command: str) -> tuple[Key, ...]:
    """The keys of her2exp-<command>, in schema order."""
    return tuple(flat_keys(schema_of(command)))


@cache
def command_groups(command: str) -> dict[str, tuple[str, ...]]:
    """The groups conf/<command>.yaml lists in its defaults (not Hydra's own), each with its
    options (conf/<group>/*.yaml): only these take `group=option` on this command line."""
    entry = yaml.safe_load((Path(CONFIG_DIR) / f"{command}.yaml").read_text()) or {}
    groups: dict[str, tuple[str, ...]] = {}
    for item in entry.get("defaults", []):
        if not isinstance(item, dict):
            continue
        for group in item:
            if group.startswith(("hydra", "override")):
                continue
            options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
            groups[group] = tuple(options)
    return groups


def _known(command: str, key: str) -> bool:
    """A key of the command, a node above keys (`data.split`), or inside a map or list key
    (`model.kwargs.init_values`, `tags.study`: the schema does not name those)."""
    for k in command_keys(command):
        if key == k.name or k.name.startswith(key + "."):
            return True
        if k.kind in ("map", "list", "any") and key.startswith(k.name + "."):
            return True
    return False


def unknown_key(command: str, key: str) -> str:
    """The one line for a key the command does not take."""
    names = [k.name for k in command_keys(command)] + list(command_groups(command))
    near = closest(key, names)
    if near:
        hint = f"did you mean {' or '.join(near)}?"
    elif len(names) <= _LISTED:
        hint = f"its keys: {', '.join(names)}"
    else:
        hint = f"her2exp-{command} --help lists its keys"
    return f"{key} is not a key of her2exp-{command} ({hint})"


def unknown_option(command: str, group: str, option: str) -> str:
    """The one line for a group option that has no conf/<group>/<option>.yaml."""
    options = list(command_groups(command)[group])
    near = difflib.get_close_matches(option, options, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(near)}?" if near else f"options: {', '.join(options)}"
    return f"{group}={option} is not an option of {group} ({hint})"


def check_overrides(command: str, overrides: list[str]) -> None:
    """Refuse (UserError, one line) a key or group option her2exp-<command> does not take,
    with the closest valid ones: before Hydra, whose answer names the schema's class and
    suggests `+key=value`, a key the command would then ignore. Hydra's own keys pass."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = command_groups(command)
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra" or o.package is not None:
            continue
        if key in groups:
            if not o.is_delete():
                for value in _values(o):
                    if value not in groups[key]:
                        raise UserError(unknown_option(command, key, value))
            continue
        if not _known(command, key):
            raise UserError(unknown_key(command, key))
        if isinstance(o.value(), str) and not any(k.name == key for k in command_keys(command)):
            under = [k.name for k in command_keys(command) if k.name.startswith(key + ".")]
            shown = ", ".join(under[:_LISTED]) + (", ..." if len(under) > _LISTED else "")
            raise UserError(f"{key} is not a group of her2exp-{command} (set its keys: {shown})")


def _values(o: Any) -> list[str]:
    """The option names of a group override (a sweep's each), None and non-strings left out."""
    if o.is_sweep_override():
        try:
            values = list(o.sweep_string_iterator())
        except Exception:  # noqa: BLE001 - an interval sweep has no options to check
            return []
    else:
        values = [o.value()]
    return [v for v in values if isinstance(v, str) and v != "null"]


def flag_hint(command: str, flag: str, value: str | None) -> str:
    """The one line for `--name value`: the key=value it most likely stands for."""
    name = flag.lstrip("-").replace("-", "_")
    keys = [k.name for k in command_keys(command)]
    matches = [k for k in keys if k == name or k.rsplit(".", 1)[-1] == name]
    shown = value if value is not None else "<value>"
    if matches:
        written = " or ".join(f"{k}={shown}" for k in matches[:3])
        return f"{flag} is not an option (write {written}: her2exp commands take key=value)"
    return (
        f"{flag} is not an option (her2exp commands take key=value; "
        f"her2exp-{command} --help lists its keys)"
    )
