"""The config a command would run with, composed through Hydra's Compose API over conf/.

Lives with the schemas (not the command line) so that the checks, the library and tests can
compose a command's config without importing any command; her2exp.cli.common re-exports it.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra import initialize_config_dir
from omegaconf import DictConfig

from her2exp.config import store  # noqa: F401 - registers the schemas the entry configs list

#: conf/ of the repository: every command's entry config and its groups.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent.parent / "conf")


def compose(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config a command would run with, without Hydra's run (tests, notebooks): pass it to
    the command's `main(cfg)`. Interpolations of Hydra's runtime (`${hydra:...}`) stay unset."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra.compose(config_name=config_name, overrides=list(overrides))
