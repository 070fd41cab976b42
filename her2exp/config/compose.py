"""The config a command would run with, composed through Hydra's Compose API over conf/.

Lives with the schemas (not the command line) so that the checks, the library and tests can
compose a command's config without importing any command; her2exp.cli.common re-exports it.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from hydra import initialize_config_dir
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from her2exp.config import (
    renames,
    store,  # noqa: F401 - registers the schemas the entry configs list
)

#: conf/ of the repository: every command's entry config and its groups.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent.parent / "conf")
#: How an entry config names the run directory Hydra creates (conf/train.yaml, conf/eval.yaml).
_HYDRA_OUTPUT_DIR = "${hydra:runtime.output_dir}"


def compose(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config a command would run with, without Hydra's run (tests, notebooks): pass it to
    the command's `main(cfg)`. Interpolations of Hydra's runtime (`${hydra:...}`) stay unset."""
    overrides = renames.apply(config_name, overrides)  # old spellings, with a warning
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra.compose(config_name=config_name, overrides=list(overrides))


def compose_hydra(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config a command line would run with, Hydra's node included and nothing of it
    resolved: `hydra.run.dir` names resolvers that import torch (conf/hydra/default.yaml)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra.compose(
            config_name=config_name, overrides=list(overrides), return_hydra_config=True
        )


def is_multirun(cfg: DictConfig) -> bool:
    """`-m`, or hydra.mode=MULTIRUN, in a config of `compose_hydra`."""
    return bool(cfg.hydra.mode == RunMode.MULTIRUN)


def without_hydra(cfg: DictConfig) -> DictConfig:
    """A copy of a `compose_hydra` config as the command's function receives it (no `hydra`
    node), its `${hydra:...}` left unresolved: what the light checks read."""
    out = cfg.copy()
    with open_dict(out):
        del out["hydra"]
    return out


def compose_choices(
    config_name: str, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[DictConfig, dict[str, str | None]]:
    """The composed config (no `hydra` node) and the option chosen in each group (`--help`)."""
    cfg = compose_hydra(config_name, overrides)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices, resolve=False)
    return without_hydra(cfg), dict(choices)  # type: ignore[arg-type]


def run_config(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """A `compose_hydra` config as Hydra's run would set it up, without creating or writing
    anything: `hydra.run.dir` resolved as Hydra resolves it (`${now:...}`: a timestamped
    directory composed again a second later is another new one) and `output_dir`'s
    `${hydra:runtime.output_dir}` that absolute path; no `hydra` node, like the config a
    command's function receives."""
    run_dir = Path(os.path.abspath(str(cfg.hydra.run.dir)))
    out = without_hydra(cfg)
    raw = OmegaConf.to_container(out, resolve=False).get("output_dir")
    if isinstance(raw, str) and _HYDRA_OUTPUT_DIR in raw:
        out.output_dir = raw.replace(_HYDRA_OUTPUT_DIR, str(run_dir))
    return out, run_dir


def compose_run(
    config_name: str, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[DictConfig, Path, bool]:
    """The config a command line would run with, its run directory and whether it is a
    multirun, as Hydra's main would compose them, without creating or writing anything
    (`compose_hydra`, then `run_config`)."""
    cfg = compose_hydra(config_name, overrides)
    multirun = is_multirun(cfg)
    out, run_dir = run_config(cfg)
    return out, run_dir, multirun
