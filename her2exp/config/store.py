"""Hydra's ConfigStore entries: `train_schema` and `<command>_cli_schema` for every command, the
structured bases the entry configs conf/<command>.yaml list first in their defaults.

Registered when this module is imported (config.commands and config.compose import it), so a
composition always finds them.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from her2exp.config.cohorts import ManifestCommand, PrepareCommand
from her2exp.config.export import ExportCommand
from her2exp.config.scoring import EvalCommand, PredictCommand
from her2exp.config.tile import TileCommand
from her2exp.config.tracking import (
    CompareCommand,
    PromoteCommand,
    RerunCommand,
    ServerCommand,
    SyncCommand,
)
from her2exp.config.train import register_configs

SCHEMAS: dict[str, type] = {
    "eval": EvalCommand,
    "predict": PredictCommand,
    "compare": CompareCommand,
    "manifest": ManifestCommand,
    "prepare": PrepareCommand,
    "server": ServerCommand,
    "sync": SyncCommand,
    "rerun": RerunCommand,
    "tile": TileCommand,
    "promote": PromoteCommand,
    "export": ExportCommand,
}


def register() -> None:
    """Store every command schema as `<command>_cli_schema` (entry configs list it first)."""
    register_configs()  # the training groups the entry configs compose (data, stain, ...)
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=f"{name}_cli_schema", node=node)


register()
