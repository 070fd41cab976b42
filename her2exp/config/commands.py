"""Schemas of the commands besides `her2exp-train`: what each accepts, typed, with its checks.

Each dataclass is the structured base of one entry config, `conf/<command>.yaml`, so an unknown
key or a wrong type fails at compose time (one `her2exp: ...` line, her2exp/cli/common.py); the
`check_*` function beside it rejects values that would fail later, naming the key. Training's own
groups (data, stain, tracking, evaluation) are reused from her2exp/config/.

The schemas live in one module per concept (scoring: eval and predict; cohorts: manifest and
prepare; tile; export; tracking: compare, server, sync, rerun and promote; common: what they
share); this module gathers them under the names the command line, the library and the tests
import (`CHECKS`, `SCHEMAS`, `validate_only`, every `check_*`), and registers them with Hydra.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from her2exp.config.cohorts import (
    ManifestCommand,
    PrepareCommand,
    check_manifest,
    check_prepare,
    manifest_data_config,
    manifest_out,
)
from her2exp.config.common import DEFAULT_URI, SOURCES, UriConfig, check_one_source
from her2exp.config.compose import compose
from her2exp.config.export import FORMATS, ONNX_EXPORTERS, ExportCommand, check_export
from her2exp.config.scoring import (
    EVAL_SPLITS,
    EvalCommand,
    EvalTrainerOverrides,
    EvaluationOverrides,
    PredictCommand,
    check_eval,
    check_predict,
    heatmap_dir,
    predict_level_out,
    predict_on_slides,
    predict_out,
)
from her2exp.config.store import SCHEMAS, register
from her2exp.config.tile import (
    SETTINGS_FILE,
    TileCommand,
    TilesConfig,
    check_out,
    check_tile,
    settings,
    tile_data_config,
)
from her2exp.config.tracking import (
    CompareCommand,
    PromoteCommand,
    RerunCommand,
    ServerCommand,
    SyncCommand,
    check_compare,
    check_promote,
    check_rerun,
    check_server,
    check_sync,
)
from her2exp.config.train import validate


def check_train(cfg: Any) -> None:
    """What her2exp-train checks of a config before it imports torch: every value
    (config.validate). Whether timm knows `model.name` needs timm, so training checks that as
    the first step of building the run (training.builders.build_runtime: validate, then
    models.check_model_name, then the run directory's checks), before any work; her2exp-train
    asks all three before Hydra writes its run directory too (cli/train.py start_check)."""
    validate(cfg)


CHECKS: dict[str, Callable[[Any], Any]] = {
    "train": check_train,
    "eval": check_eval,
    "predict": check_predict,
    "compare": check_compare,
    "manifest": check_manifest,
    "prepare": check_prepare,
    "server": check_server,
    "sync": check_sync,
    "rerun": check_rerun,
    "tile": check_tile,
    "promote": check_promote,
    "export": check_export,
}


def validate_only(command: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The validate-only entry: compose conf/<command>.yaml with `overrides` and run the checks
    the command runs before any work; raises what the command would print as one line."""
    cfg = compose(command, overrides)
    CHECKS[command](cfg)
    return cfg


__all__ = [
    "CHECKS",
    "DEFAULT_URI",
    "EVAL_SPLITS",
    "FORMATS",
    "ONNX_EXPORTERS",
    "SCHEMAS",
    "SETTINGS_FILE",
    "SOURCES",
    "CompareCommand",
    "EvalCommand",
    "EvalTrainerOverrides",
    "EvaluationOverrides",
    "ExportCommand",
    "ManifestCommand",
    "PredictCommand",
    "PrepareCommand",
    "PromoteCommand",
    "RerunCommand",
    "ServerCommand",
    "SyncCommand",
    "TileCommand",
    "TilesConfig",
    "UriConfig",
    "check_compare",
    "check_eval",
    "check_export",
    "check_manifest",
    "check_one_source",
    "check_out",
    "check_predict",
    "check_prepare",
    "check_promote",
    "check_rerun",
    "check_server",
    "check_sync",
    "check_tile",
    "check_train",
    "compose",
    "heatmap_dir",
    "manifest_data_config",
    "manifest_out",
    "predict_level_out",
    "predict_on_slides",
    "predict_out",
    "register",
    "settings",
    "tile_data_config",
    "validate",
    "validate_only",
]
