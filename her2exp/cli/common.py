"""One convention for every her2exp command: Hydra `key=value` overrides, one-line user errors.

Every entry point is a Hydra app composed from `conf/<command>.yaml` over a structured schema, and
a user's mistake ends it with exactly one line on stderr, `her2exp: ...`, and exit status 2:

- a key the command does not take (`trainer.epoch=3`) or a group option without its file
  (`model=resnet`), answered before Hydra with the closest valid ones (config.keys:
  `check_overrides`), never Hydra's `+key` hint or a schema's class name;
- a Hydra override error: a wrong type (`trainer.epochs=abc`, said with the key's range), a
  malformed override (`abc`, `a=[1`), also in a sweep (`-m trainer.epochs=1,abc`: each job's
  composition is checked before the launcher);
- an unknown command-line flag (`--epochs 3`: the key=value it stands for, `trainer.epochs=3`);
- a `ConfigError` raised by the command (bad values, missing files).

Each in one shape, `her2exp: <what is wrong> (<what is allowed>)`. `--help`/`-h` prints the
command's own page (cli/help.py: its docstring's purpose and examples, its groups and keys).

Internal bugs keep their traceback (exit 1); `HYDRA_FULL_ERROR=1` shows the full traceback of
user errors too. Use it instead of `@hydra.main`:

    from her2exp.cli.common import hydra_command

    @hydra_command("train")              # conf/train.yaml
    def main(cfg: DictConfig) -> float:  # called once per job, as with @hydra.main
        ...

`main()` is then the console script; `-m`, sweeps (`a=1,2`, `range()`, `hydra/sweeper=...`),
`--cfg job` and `torchrun -m her2exp.train` work as with `@hydra.main` (under torchrun only rank 0
prints the line; every rank exits 2). `main(cfg)` with a composed config calls the function
directly, as `@hydra.main`'s pass-through does. How it works: Hydra re-raises what it would
report when `HYDRA_FULL_ERROR=1` (documented behaviour); the wrapper sets it for the call,
catches what comes out and prints user errors as one line itself. Exceptions that escape the
command's own function are marked, so they are never mistaken for composition errors.

Before Hydra's main runs, `precheck` composes the same command line (run directory resolved,
nothing created) and runs the command's checks (config.commands.CHECKS, and her2exp-train's
`start_check`: the model name and the run directory's plan), so a refused command creates no
run directory and rewrites nothing of an existing run (`.hydra/`, the job log).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

# compose and CONFIG_DIR live with the schemas (her2exp.config.compose); re-exported here, where
# commands, tests and notebooks have always imported them.
from her2exp.config import renames
from her2exp.config.commands import CHECKS
from her2exp.config.compose import (
    CONFIG_DIR,
    compose,
    compose_hydra,
    is_multirun,
    run_config,
    without_hydra,
)
from her2exp.config.keys import check_overrides, command_keys, flag_hint
from her2exp.core.errors import ConfigError, UserError

EXIT_USER_ERROR = 2
_FROM_TASK = "_her2exp_raised_by_command"
R = TypeVar("R")


def is_main_rank() -> bool:
    """Under torchrun every rank runs the command; only rank 0 reports."""
    return os.environ.get("RANK", "0") == "0"


def fail(message: str) -> None:
    """Print the one line and exit 2 (the convention's only exit path for user errors)."""
    if is_main_rank():
        print(f"her2exp: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def one_line(exc: BaseException) -> str:
    """Hydra's multi-line messages (hint lines, option lists, search paths) as one line."""
    parts: list[str] = []
    for raw in str(exc).splitlines():
        line = raw.strip()
        if not line or line.startswith("See https://hydra.cc"):
            continue
        if line.startswith("Config search path"):
            break
        if raw.startswith("\t") and parts:  # an option under "Available options in 'x':"
            sep = " " if parts[-1].endswith(":") else ", "
            parts[-1] = f"{parts[-1]}{sep}{line}"
        else:
            parts.append(line.rstrip("."))
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause).strip():
        reason = str(cause).strip().splitlines()[0].rstrip(".")
        parts[:1] = [f"{parts[0]}: {reason}"] if parts else [reason]
    return "; ".join(parts) or type(exc).__name__


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, ConfigError):
        return True
    if getattr(exc, _FROM_TASK, False):
        return False  # escaped the command itself: a bug, even if it is an OmegaConf error
    if _run_dir_error(exc):
        return True
    if isinstance(exc, HydraException | OmegaConfBaseException):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    # Hydra's override handling (and its sweepers' search-space parsing) raise plain ValueErrors
    # too (`=3`: "Config group override must be a string or a list").
    prefixes = ("hydra.", "hydra_plugins.", "omegaconf.")
    return isinstance(exc, ValueError) and module.startswith(prefixes)


def _run_dir_error(exc: BaseException) -> bool:
    """Hydra could not create the run directory or write its config there (its own
    MissingConfigException is an IOError too: not this)."""
    return (
        isinstance(exc, OSError)
        and not isinstance(exc, HydraException)
        and exc.filename is not None
    )


def _message(exc: BaseException, command: str) -> str:
    """The one line of a user error that escaped composition or Hydra's run set-up, in the
    shape of every refusal: what is wrong, then what is allowed in parentheses."""
    from hydra.errors import OverrideParseException

    if isinstance(exc, ConfigError):
        return str(exc)
    if _run_dir_error(exc):
        return (
            f"cannot write the run directory ({exc.strerror}: {exc.filename}; set "
            "hydra.run.dir, hydra.sweep.dir with -m, to a folder you can write)"
        )
    if isinstance(exc, OverrideParseException):
        why = str(exc).splitlines()[1:2] or ["key=value"]
        return f"{exc.override!r} is not key=value ({why[0].strip()})"
    cause = exc.__cause__
    full_key = getattr(cause, "full_key", None) or ""
    keys = {k.name: k for k in command_keys(command)}
    if isinstance(cause, ValidationError) and full_key in keys:
        return f"{full_key}={cause.value!r} is not allowed ({keys[full_key].allowed()})"
    parent = keys.get(full_key.rpartition(".")[0])
    if parent is not None and parent.kind == "map" and "+" in str(exc):
        # a new entry of a map key (model.kwargs.img_size): Hydra's `+` is the way to add it
        return f"{full_key} is a new entry of the map {parent.name} (add it with +{full_key}=...)"
    return one_line(exc)


def check_flags(command: str, argv: list[str]) -> None:
    """Refuse an unknown `--flag` in one line naming the key=value it stands for (`--epochs 3`:
    write trainer.epochs=3), before argparse would print its usage block."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str) -> None:
        raise UserError(
            f"{message} (her2exp commands take key=value overrides, flags such as -m before or "
            "after them all; --help lists the keys)"
        )

    parser.error = error  # type: ignore[method-assign]
    _, unknown = parser.parse_known_args(argv)
    for token in unknown:
        if token.startswith("-") and token in argv:
            flag, _, value = token.partition("=")
            at = argv.index(token) + 1
            if not value and at < len(argv) and not argv[at].startswith("-"):
                value = argv[at] if "=" not in argv[at] else ""
            raise UserError(flag_hint(command, flag, value or None))
    parser.parse_args(argv)


def positional_to_override(argv: list[str], key: str | None) -> list[str]:
    """`her2exp-sync DIR` (the older syntax) -> `her2exp-sync input='DIR'`."""
    if key is None or not argv or "=" in argv[0] or argv[0].startswith("-"):
        return argv
    # Hydra's quoted strings: a quote is escaped, and so are the backslashes right before a
    # quote or at the end; every other backslash is literal.
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", argv[0])
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
    return [f"{key}='{value}'", *argv[1:]]


@contextmanager
def _hydra_reraises() -> Iterator[bool]:
    """HYDRA_FULL_ERROR=1 for the call, so Hydra raises instead of printing and exiting 1.

    Yields whether the user had asked for full tracebacks themselves."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield before == "1"
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


def check_sweep(config_name: str, argv: list[str]) -> None:
    """`-m`: compose once per value of every choice/range sweep (the other keys at their first
    value) before Hydra starts the sweep, whose callback already opens an MLflow parent run; a
    bad value then fails like a bad override, leaving nothing behind. Interval sweeps (Optuna)
    are left to the sweeper."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = get_args_parser().parse_args(argv)
    if not args.multirun:
        return
    overrides = [a for a in args.overrides if not a.startswith("hydra")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    values: list[list[str]] = []
    for o in parsed:
        if o.is_sweep_override():
            try:
                choices = list(o.sweep_string_iterator())
            except Exception:  # noqa: BLE001 - interval sweeps cannot be enumerated
                continue
            values.append([f"{o.get_key_element()}={v}" for v in choices] or [o.input_line])
        else:
            values.append([o.input_line])
    if not any(len(v) > 1 for v in values):
        return
    first = [v[0] for v in values]
    for i, options in enumerate(values):
        for option in options[1:]:
            job = [option if j == i else f for j, f in enumerate(first)]
            compose(config_name, job)
    compose(config_name, first)


#: Hydra's flags that show something instead of running the command, run a multirun (each
#: value composed by check_sweep), or compose another config than conf/<command>.yaml: the
#: pre-check leaves these to Hydra.
_PASS_THROUGH = (
    "help",
    "hydra_help",
    "cfg",
    "info",
    "shell_completion",
    "multirun",
    "config_path",
    "config_name",
    "config_dir",
    "experimental_rerun",
)


def precheck(
    config_name: str, argv: list[str], start_check: Callable[[DictConfig], object] | None = None
) -> None:
    """Compose the command line as Hydra's main is about to (config.compose.compose_run: the
    run directory resolved, nothing created) and run the command's checks (CHECKS, then
    `start_check`) before Hydra creates the run directory and writes `.hydra/` and the job log
    there: a refused command leaves no directory behind and changes nothing of an existing run
    (its `.hydra/` records the command that made it). The checks raise as in the command: one
    line, exit 2; a bug in them keeps its traceback."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if any(getattr(args, flag, None) for flag in _PASS_THROUGH):
        return
    full = compose_hydra(config_name, args.overrides)
    if is_multirun(full):  # hydra.mode=MULTIRUN: as -m
        return
    # The values first, the run directory not yet resolved: under torchrun its resolver
    # imports torch (conf/hydra/default.yaml), and a refused value needs none of it.
    _as_command(CHECKS[config_name], without_hydra(full))
    if start_check is not None:
        _as_command(start_check, run_config(full)[0])


def _as_command(fn: Callable[[DictConfig], R], cfg: DictConfig) -> R:
    """`fn(cfg)` as the command runs it: its user errors one line and exit 2, any other
    exception marked as raised by the command (a bug: never mistaken for a composition error)."""
    try:
        return fn(cfg)
    except UserError as exc:
        fail(str(exc))
    except ConfigError as exc:
        fail(str(exc))
    except BaseException as exc:
        with contextlib.suppress(AttributeError, TypeError):  # a few builtins refuse
            setattr(exc, _FROM_TASK, True)  # noqa: B010 - a marker, not an attribute API
        raise
    raise AssertionError("unreachable")


_HELP_FLAGS = ("--help", "-h")


def _print_help(config_name: str, task: Callable[..., object], positional: str | None) -> None:
    """`--help`: the command's own page (cli/help.py: purpose and examples from the command
    module's docstring, its groups and keys), composed with the other overrides given; a
    mistake among those is answered as without --help."""
    from her2exp.cli.help import help_page

    doc = sys.modules[task.__module__].__doc__
    argv = positional_to_override([a for a in sys.argv[1:] if a not in _HELP_FLAGS], positional)
    argv = renames.apply(config_name, argv)
    with _hydra_reraises() as full_error:
        try:
            overrides = _overrides(argv)
            check_overrides(config_name, overrides)
            page = help_page(config_name, doc, overrides)
        except Exception as exc:
            if full_error or not _is_user_error(exc):
                raise
            fail(_message(exc, config_name))
    try:
        print(page, flush=True)
    except BrokenPipeError:  # `--help | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _asks_help(argv: list[str]) -> bool:
    """`--help`/`-h` anywhere: the command's own page (cli/help.py), not Hydra's."""
    return any(a in _HELP_FLAGS for a in argv)


#: Flags whose "overrides" are not the command's keys: shell completion's install=/query=, or
#: another config than conf/<command>.yaml (its schema is not the command's).
_OWN_ARGUMENTS = (
    "shell_completion",
    "config_path",
    "config_name",
    "config_dir",
    "experimental_rerun",
)


def _overrides(argv: list[str]) -> list[str]:
    """The key=value overrides of a command line that name the command's keys and groups."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if any(getattr(args, flag, None) for flag in _OWN_ARGUMENTS):
        return []
    return list(args.overrides)


#: conf/hydra/default.yaml's resolvers (her2exp-train, her2exp-eval) -> the function of
#: her2exp.runtime.distributed behind each (its register_resolvers registers the same three).
RUN_DIR_RESOLVERS = {
    "her2exp_run_dir": "shared_run_dir",
    "her2exp_log_name": "rank_log_name",
    "her2exp_main_subdir": "main_rank_subdir",
}


def register_run_dir_resolvers() -> None:
    """Register conf/hydra/default.yaml's resolvers before Hydra composes a command's config.

    Each imports her2exp.runtime.distributed (and so torch) when Hydra first resolves it, not
    when the command's module is imported: a command module stays light to import (the
    `light-cli` contract; tests/cli/test_light_imports.py)."""
    for name, target in RUN_DIR_RESOLVERS.items():
        OmegaConf.register_new_resolver(name, _deferred(target), replace=True)


def _deferred(target: str) -> Callable[[str], object]:
    def resolve(arg: str) -> object:
        from her2exp.runtime import distributed  # start-up time: torch, once Hydra resolves

        return getattr(distributed, target)(arg)

    return resolve


def hydra_command(
    config_name: str,
    positional: str | None = None,
    start_check: Callable[[DictConfig], object] | None = None,
) -> Callable[[Callable[[DictConfig], R]], Callable[..., R | None]]:
    """`@hydra.main` over conf/<config_name>.yaml with the one-line user-error convention.

    `positional`: the key a single leading bare argument stands for (`her2exp-sync DIR`).
    `start_check`: what the command refuses beyond its values (config.commands.CHECKS), asked
    before Hydra writes anything too (`precheck`); it may import the heavy stack.
    """

    def decorate(task: Callable[[DictConfig], R]) -> Callable[..., R | None]:
        @functools.wraps(task)
        def job(cfg: DictConfig) -> R:
            return _as_command(task, cfg)

        app = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(job)

        @functools.wraps(task)
        def main(cfg: DictConfig | None = None) -> R | None:
            if cfg is not None:  # called with a composed config (tests, other code)
                return job(cfg)
            if _asks_help(sys.argv[1:]):
                return _print_help(config_name, task, positional)
            with _hydra_reraises() as full_error:
                try:
                    sys.argv[1:] = positional_to_override(sys.argv[1:], positional)
                    sys.argv[1:] = renames.apply(config_name, sys.argv[1:])
                    check_flags(config_name, sys.argv[1:])
                    check_overrides(config_name, _overrides(sys.argv[1:]))
                    check_sweep(config_name, sys.argv[1:])
                    precheck(config_name, sys.argv[1:], start_check)
                    return app()
                except Exception as exc:
                    if full_error or not _is_user_error(exc):
                        raise
                    fail(_message(exc, config_name))
            return None

        return main

    return decorate
