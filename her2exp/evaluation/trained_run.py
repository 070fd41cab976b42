"""A trained run as evaluation, predict, export and serving load it: best.pt from a path or an
MLflow run, its frozen thresholds by level, its own evaluation settings (merged with a
command's), the checks that keep a command from scoring at thresholds that mean something
else, and its model and fitted stain pipeline."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from her2exp import metrics
from her2exp.config import ConfigError, EvaluationConfig, validate_evaluation
from her2exp.config.commands import check_one_source
from her2exp.core import checkpoint
from her2exp.data.bags import attach_head, mil_name
from her2exp.runtime.rundir import ARTIFACTS, artifact
from her2exp.stain import pipeline as stain_pipeline
from her2exp.tracking.registry import resolve_model_uri
from her2exp.tracking.store import download_from_run

CHECKPOINT_KEYS = ("model", "config")  # what every her2exp best.pt holds


def one_line(message: str, shown: int = 5) -> str:
    """A multi-line message (data validation lists every bad file) as one line: the first
    `shown` items and how many more there are."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    items = lines[1 : shown + 1]
    more = len(lines) - 1 - len(items)
    return f"{lines[0]}: {'; '.join(items)}" + (f"; ... {more} more" if more > 0 else "")


def describe_source(source: Any) -> str:
    """How the command line named the trained run, for messages."""
    if source.get("sweep_run_id"):
        return f"sweep_run_id={source.sweep_run_id!r}"
    return f"checkpoint={source.checkpoint}" if source.checkpoint else f"run_id={source.run_id!r}"


def load_checkpoint(path: str | Path, shown_as: str | None = None) -> dict[str, Any]:
    """checkpoint.load, with a missing, truncated, damaged or foreign file as a ConfigError
    naming it (`shown_as`: the name a downloaded temporary file goes by)."""
    try:
        state = checkpoint.load(path)
    except (OSError, RuntimeError) as exc:  # CheckpointCorruptError is a RuntimeError
        message = str(exc) if shown_as is None else str(exc).replace(str(path), shown_as)
        raise ConfigError(message) from exc
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(
            f"checkpoint {shown_as or path} is a PyTorch file but not a her2exp checkpoint "
            f"(no {', '.join(missing)})"
        )
    return state


def _download_best(run_id: str, uri: str) -> dict[str, Any]:
    """best.pt of MLflow run `run_id`; a store that is not there is refused, never created."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line on stderr
    with tempfile.TemporaryDirectory(prefix="her2exp-best-") as tmp:
        _, local = download_from_run(
            uri,
            run_id,
            artifact(ARTIFACTS.best),
            tmp,
            "not a training run, or trained with tracking.log_checkpoint=false: give "
            "checkpoint=<best.pt>",
        )
        return load_checkpoint(local, f"runs:/{run_id}/{artifact(ARTIFACTS.best)}")


def by_model_uri(opts: Any) -> Any:
    """`opts` with `model_uri` (an alias, a version, runs:/ID/model) replaced by the run id it
    names (eval, predict, export: the same keys name a trained model in every command); `opts`
    itself when it names the run otherwise."""
    if not opts.get("model_uri"):
        return opts
    run_id = resolve_model_uri(opts.model_uri, opts.tracking.uri)
    return OmegaConf.merge(opts, {"run_id": run_id, "model_uri": None})


def load_source(source: Any) -> tuple[dict[str, Any], str | None]:
    """best.pt of a run (`run_id` in `tracking.uri`) or a `checkpoint` path: (state, run id)."""
    check_one_source(source)
    if source.checkpoint:
        if not Path(source.checkpoint).is_file():
            raise ConfigError(f"checkpoint={source.checkpoint}: no such file")
        return load_checkpoint(source.checkpoint), None
    return _download_best(source.run_id, source.tracking.uri), source.run_id


def resolve_evaluation(run_evaluation: Any, overrides: Any) -> DictConfig:
    """The run's own evaluation settings (schema defaults for keys an old run lacks), then the
    non-null values the eval command line gave; validated."""
    merged = OmegaConf.merge(OmegaConf.structured(EvaluationConfig), run_evaluation or {})
    given = {k: v for k, v in OmegaConf.to_container(overrides).items() if v is not None}
    merged = OmegaConf.merge(merged, given)
    validate_evaluation(merged)
    return merged


@dataclass
class TrainedRun:
    """A trained run as evaluation needs it: its weights, config and frozen thresholds."""

    state: dict[str, Any]
    source_run: str | None
    cfg: DictConfig  # the run's resolved training config (mean/std filled in)
    levels: dict[str, dict[str, float]]  # thresholds frozen on val, keyed by level
    source: str = "checkpoint"  # how the command named it (checkpoint=... or run_id=...)
    decision_level: str = "tile"  # the run's own; an eval command may choose another level

    @property
    def calibration(self) -> dict[str, Any]:
        """The calibration frozen on val (best.pt `state["calibration"]`); an old checkpoint
        without the key was never calibrated."""
        return dict(self.state.get("calibration") or {"method": "none"})

    @property
    def tta(self) -> str:
        """The run's own evaluation.tta (none for a run from before TTA)."""
        return str(OmegaConf.select(self.cfg, "evaluation.tta", default=None) or "none")

    @property
    def thresholds(self) -> dict[str, float]:
        """The decision level's frozen thresholds (what predict calls and eval headlines)."""
        return level_thresholds(self, self.decision_level)


def level_thresholds(run: TrainedRun, level: str) -> dict[str, float]:
    """The thresholds `run` froze at `level`; a level it never froze (a checkpoint from before
    levels holds the tile level only) is refused in one line."""
    if level not in run.levels:
        raise ConfigError(
            f"evaluation.decision_level={level}: {run.source} froze thresholds at the "
            f"{', '.join(run.levels)} level only (trained before slide and patient levels): "
            "choose one of those, or train the run again"
        )
    return run.levels[level]


def load_run(ecfg: Any) -> TrainedRun:
    """The run `ecfg` names; refused (one line) unless it holds the thresholds frozen on val:
    prediction and evaluation never fall back to a threshold of their own."""
    state, source_run = load_source(ecfg)
    what = describe_source(ecfg)
    if "thresholds" not in state:
        raise ConfigError(
            f"{what}: the checkpoint holds no frozen thresholds (trained before her2exp 0.1): "
            "train the run again"
        )
    levels = metrics.as_level_thresholds(state["thresholds"])
    cfg = OmegaConf.create(state["config"])
    run_level = state.get("decision_level") or OmegaConf.select(
        cfg, "evaluation.decision_level", default="tile"
    )
    return TrainedRun(state, source_run, cfg, levels, what, str(run_level))


def check_frozen_scoring(run: TrainedRun, evaluation: DictConfig) -> None:
    """The calibration is frozen with the thresholds (they apply to calibrated scores), so an
    eval override that differs from it is refused. Another TTA setting than the run's is
    allowed; the Scorer warns about it (scorer.resolved_tta)."""
    frozen = run.calibration["method"]
    if evaluation.calibration != frozen:
        raise ConfigError(
            f"evaluation.calibration={evaluation.calibration}: {run.source} froze its "
            f"thresholds on {frozen} calibrated scores (a temperature is fitted on validation "
            f"in training only); leave it unset (or give {frozen})"
        )


def check_frozen_aggregation(run: TrainedRun, evaluation: DictConfig) -> None:
    """A level's thresholds were chosen on its aggregates: scoring that level with another
    aggregation (or another k) would call cases at thresholds that mean something else, so an
    eval override that changes it for a level with frozen thresholds is refused."""
    own = resolve_evaluation(run.cfg.get("evaluation"), OmegaConf.create({}))
    for level in ("slide", "patient"):
        if level not in run.levels:
            continue  # nothing frozen there: any aggregation is only reported
        key = f"{level}_aggregation"
        if evaluation[key] != own[key]:
            raise ConfigError(
                f"evaluation.{key}={evaluation[key]}: {run.source} froze its {level}-level "
                f"thresholds on {own[key]} aggregates; leave it unset (or give {own[key]})"
            )
        if own[key] == "topk_mean" and evaluation.topk != own.topk:
            raise ConfigError(
                f"evaluation.topk={evaluation.topk}: {run.source} froze its {level}-level "
                f"thresholds on the top {own.topk}; leave it unset (or give {own.topk})"
            )


def load_model(run: TrainedRun, device: torch.device) -> torch.nn.Module:
    """The run's architecture with its trained weights; weights that do not fit are refused."""
    from her2exp import models  # timm: paid by the commands that build a model, not on import

    model = models.build(run.cfg.model, device, load_weights=False)  # best.pt holds them
    if mil_name(run.cfg) != "none":
        attach_head(model, run.cfg.mil)
    try:
        model.load_state_dict(run.state["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{run.source}: its weights do not fit model {run.cfg.model.name} ({one_line(exc)})"
        ) from exc
    return model


def run_stain(run: TrainedRun, seed: int) -> Any:
    """The run's fitted stain pipeline (None without normalisation); a run trained with Macenko
    whose checkpoint lost the fitted reference is refused, never scored unnormalised."""
    stain_cfg = run.cfg.get("stain")
    if stain_cfg is None:
        return None  # trained before stain handling existed
    try:
        return stain_pipeline.from_state(stain_cfg, run.state.get("stain"), seed)
    except ValueError as exc:
        raise ConfigError(f"{run.source}: {exc}") from exc
