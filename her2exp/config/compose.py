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

from her2exp.config import store  # noqa: F401 - registers the schemas the entry configs list

#: conf/ of the repository: every command's entry config and its groups.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent.parent / "conf")
#: How an entry config names the run directory Hydra creates (conf/train.yaml, conf/eval.yaml).
_HYDRA_OUTPUT_DIR = "${hydra:runtime.output_dir}"


def compose(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config a command would run with, without Hydra's run (tests, notebooks): pass it to
    the command's `main(cfg)`. Interpolations of Hydra's runtime (`${hydra:...}`) stay unset."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra.compose(config_name=config_name, overrides=list(overrides))


def compose_run(
    config_name: str, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[DictConfig, Path, bool]:
    """The config a command line would run with, its run directory and whether it is a
    multirun, as Hydra's main would compose them, without creating or writing anything.

    `hydra.run.dir` is resolved here as Hydra resolves it (`${now:...}`: a timestamped
    directory composed again a second later is another new one) and `output_dir`'s
    `${hydra:runtime.output_dir}` becomes that absolute path, as in Hydra's run. The returned
    config has no `hydra` node, like the one a command's function receives."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra.compose(
            config_name=config_name, overrides=list(overrides), return_hydra_config=True
        )
    multirun = cfg.hydra.mode == RunMode.MULTIRUN
    run_dir = Path(os.path.abspath(str(cfg.hydra.run.dir)))
    with open_dict(cfg):
        del cfg["hydra"]
        raw = OmegaConf.to_container(cfg, resolve=False).get("output_dir")
        if isinstance(raw, str) and _HYDRA_OUTPUT_DIR in raw:
            cfg.output_dir = raw.replace(_HYDRA_OUTPUT_DIR, str(run_dir))
    return cfg, run_dir, multirun
