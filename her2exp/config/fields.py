"""Numeric options with bounds, and the one message shape of every refused value.

`ranged` declares a field's allowed range beside its default; `check_ranges` walks a schema and
refuses a value outside it; `refuse` is the `key=value is not allowed (...)` line every check
raises (a ConfigError, printed by the command line as one line, exit 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from her2exp.core.errors import ConfigError


def refuse(key: str, value: Any, allowed: str) -> None:
    """The one message shape of a refused value: the key, the value and what is allowed."""
    raise ConfigError(f"{key}={value!r} is not allowed ({allowed})")


@dataclass(frozen=True)
class Range:
    """The values a numeric option allows, declared beside it with `ranged` so that every number
    a user can set has bounds (tests walk the schemas and try a value outside each)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    allowed: str | None = None  # the message's wording; null: built from the bounds

    def contains(self, value: float) -> bool:
        """Finite and within every bound (NaN fails every comparison, so it is refused)."""
        v = float(value)
        return (
            math.isfinite(v)
            and (self.ge is None or v >= self.ge)
            and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le)
            and (self.lt is None or v < self.lt)
        )

    def describe(self, integer: bool, optional: bool) -> str:
        """'an integer >= 1', 'a value in (0, 1)', 'null or a value > 0'."""
        if self.allowed is not None:
            return self.allowed
        kind = "an integer" if integer else "a value"
        lo = (
            f"[{_num(self.ge)}"
            if self.ge is not None
            else f"({_num(self.gt)}"
            if self.gt is not None
            else None
        )
        hi = (
            f"{_num(self.le)}]"
            if self.le is not None
            else f"{_num(self.lt)})"
            if self.lt is not None
            else None
        )
        if lo and hi:
            text = f"{kind} in {lo}, {hi}"
        else:
            ops = [(">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)]
            text = " and ".join(f"{kind} {op} {_num(b)}" for op, b in ops if b is not None)
        return f"null or {text}" if optional else text

    def outside(self, integer: bool) -> list[float]:
        """Values just past each bound (and NaN for floats): what the schema walk tries."""
        step = 1 if integer else 0.5
        values = [b - step for b in (self.ge,) if b is not None]
        values += [b for b in (self.gt, self.lt) if b is not None]
        values += [b + step for b in (self.le,) if b is not None]
        return [int(v) if integer else float(v) for v in values] + ([] if integer else [math.nan])


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def ranged(default: Any, *, help: str, **bounds: Any) -> Any:
    """A dataclass field with its allowed range (`ge`, `gt`, `le`, `lt`, `allowed`) and its
    help: the one text `--help` and the generated reference (docs/reference/) read
    (config.keys.command_keys)."""
    return field(default=default, metadata={"range": Range(**bounds), "help": help})


_NO_DEFAULT: Any = dataclasses.MISSING


def option(
    default: Any = _NO_DEFAULT, *, factory: Callable[[], Any] | None = None, help: str
) -> Any:
    """A dataclass field that is not a number with bounds, with its help (as `ranged`);
    `factory` for a list or map default. The help sits in the field's metadata, not in a `#`
    comment, so that the command line can show it (`her2exp-<command> --help`)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def numeric_fields(schema: type, prefix: str = "") -> list[tuple[str, type, bool, Range | None]]:
    """(dotted key, int|float, optional, range) of every number in a schema, nested included."""
    hints = typing.get_type_hints(schema)
    found = []
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = (
            args[0]
            if typing.get_origin(hint) in (typing.Union, _UnionType) and len(args) == 1
            else hint
        )
        if dataclasses.is_dataclass(base):
            found += numeric_fields(base, f"{prefix}{f.name}.")
        elif base in (int, float):
            found.append((f"{prefix}{f.name}", base, base is not hint, f.metadata.get("range")))
    return found


_UnionType = type(int | None)


def check_ranges(node: Any, schema: type, prefix: str = "") -> None:
    """Every `ranged` number of `node` (a config of `schema`) within its bounds."""
    for key, kind, optional, bounds in numeric_fields(schema):
        value = OmegaConf.select(node, key) if isinstance(node, DictConfig) else _get(node, key)
        if bounds is None or value is None:
            continue
        if not bounds.contains(value):
            refuse(f"{prefix}{key}", value, bounds.describe(kind is int, optional))


def _get(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def close_matches(name: str, candidates: list[str], n: int = 5) -> list[str]:
    """Names a user probably meant; used for unknown model names."""
    return difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)


def closest(name: str, candidates: list[str], n: int = 3) -> list[str]:
    """The candidates a user probably meant by `name`: the same last part under another group
    (`epochs` -> trainer.epochs), else the nearest spellings of the last part under the same
    group (`trainer.epoch` -> trainer.epochs), else the nearest anywhere; only those about as
    near as the nearest (`trainer.amp` is no answer to `trainer.epoch`)."""
    last = name.rsplit(".", 1)[-1]
    same_last = {c: c for c in candidates if c.rsplit(".", 1)[-1] == last and c != name}
    parent = name.rsplit(".", 1)[0] + "." if "." in name else ""
    siblings = {c[len(parent) :]: c for c in candidates if parent and c.startswith(parent)}
    everywhere = {c: c for c in candidates}
    for word, pool, min_ratio in (
        (name, same_last, 0),
        (last, siblings, 0.6),
        (name, everywhere, 0.6),
    ):
        scored = sorted(
            ((difflib.SequenceMatcher(None, word, w).ratio(), c) for w, c in pool.items()),
            key=lambda sc: -sc[0],
        )
        if scored and scored[0][0] >= min_ratio:
            return [c for score, c in scored[:n] if score >= scored[0][0] - 0.1]
    return []
