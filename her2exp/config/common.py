"""What several commands' schemas share: the MLflow URI group, the one-source rule (run id,
checkpoint, sweep or registry model), the label rules of a data=folder/manifest config, and the
refusal of an output that would replace a user's earlier files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from her2exp.config.fields import option, refuse
from her2exp.config.train import TrainConfig, validate
from her2exp.core.errors import ConfigError, UserError
from her2exp.core.fileio import check_replaceable

DEFAULT_URI = "sqlite:///mlflow.db"


@dataclass
class UriConfig:
    """`tracking.uri` alone, for the commands that only read or replay MLflow runs."""

    uri: str | None = option(
        DEFAULT_URI,
        help="the MLflow tracking URI (her2exp-sync: null sends to the one the run used)",
    )


#: The keys that name what a command evaluates or predicts with: exactly one is given
#: (model_uri: eval, predict, export; resolved to a run id by registry.resolve_model_uri).
SOURCES = ("run_id", "checkpoint", "sweep_run_id", "model_uri")


def check_one_source(source: Any) -> None:
    """Exactly one of run_id / checkpoint / sweep_run_id / model_uri (a command without
    sweep_run_id or model_uri, or a member's own load, has that key absent)."""
    given = [k for k in SOURCES if source.get(k)]
    if len(given) != 1:
        got = f" (got {' and '.join(given)})" if given else ""
        uri = ", model_uri=<models:/NAME@ALIAS>" if "model_uri" in source else ""
        raise ConfigError(
            f"give exactly one of run_id=<MLflow run id>, checkpoint=<best.pt path>{uri} or "
            f"sweep_run_id=<MLflow run id of a sweep's parent>{got}"
        )


def one_source(cfg: Any) -> None:
    """Exactly one of run_id / checkpoint / sweep_run_id, and the checkpoint must exist."""
    check_one_source(cfg)
    if cfg.checkpoint and not Path(cfg.checkpoint).is_file():
        raise ConfigError(f"checkpoint={cfg.checkpoint}: no such file")


def label_rules(cfg: Any, data: dict[str, Any]) -> DictConfig:
    """`data` over training's defaults with the command's label_map/score_map, validated as
    training validates it (manifest and tile commands)."""
    full = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"data": data, "output_dir": "."})
    for key in ("label_map", "score_map"):
        if cfg[key] is not None:  # replaces the default map (a merge would keep its names)
            if not OmegaConf.is_dict(cfg[key]):
                refuse(
                    key, cfg[key], "a map of names to 0 (HER2-) or 1 (HER2+), e.g. {neg:0,pos:1}"
                )
            full.data[key] = {str(k): v for k, v in cfg[key].items()}
    validate(full)
    return full.data


def replaceable(out: Any, key: str, overwrite: bool, own_file: str) -> None:
    """An output folder that holds a user's earlier files is replaced only with overwrite=true
    (core.fileio.check_replaceable), refused as a UserError (one line, exit 2)."""
    try:
        check_replaceable(out, key, overwrite, own_file)
    except FileExistsError as exc:
        raise UserError(str(exc)) from None
