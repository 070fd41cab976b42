"""What her2exp-eval scores and everything it can refuse first: a `Cohort` (a new data set
with the model's input contract, or the run's own split rebuilt as training built it), its
scoring into a `ScoredSplit`, and `prepare_evaluation` (command, store, checkpoint, settings,
data, all checked before a model is built or a patch scored)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from her2exp import data
from her2exp.config import ConfigError
from her2exp.config.commands import check_eval
from her2exp.config.scoring import evaluation_overrides
from her2exp.data import RowView
from her2exp.evaluation.scored import ScoredSplit
from her2exp.evaluation.scorer import Scorer, score
from her2exp.evaluation.trained_run import (
    TrainedRun,
    by_model_uri,
    check_frozen_aggregation,
    check_frozen_scoring,
    load_run,
    one_line,
    resolve_evaluation,
    run_stain,
)
from her2exp.tracking.store import require_store


@dataclass
class Cohort:
    """What her2exp-eval scores: a bundle (split None: all of it) with its data config and seed."""

    name: str
    bundle: Any  # data.DataBundle
    split: str | None  # None: a new cohort; val | test: the run's own split
    data_cfg: DictConfig
    seed: int


def rebuild_run_data(run: TrainedRun, why: str) -> Any:
    """The run's own data bundle, rebuilt from its stored config and seed as training built it
    (eval split=, the export check); a data set that is gone is one line starting with `why`."""
    try:
        return data.build(run.cfg.data, run.cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"{why}: {one_line(exc)}") from exc


def load_cohort(ecfg: DictConfig, run: TrainedRun) -> Cohort:
    """A new cohort described by the eval config's `data`, with the model's input contract; or
    (`split=val|test`) the run's own split, rebuilt from its stored config and seed exactly as
    training built it and scored with the training seed, so its test table is reproduced.
    Built before the model, so a bad data folder is refused before any work."""
    if ecfg.split:
        cfg = run.cfg
        bundle = rebuild_run_data(run, f"split={ecfg.split}: the run's data cannot be rebuilt")
        return Cohort(ecfg.cohort_name or ecfg.split, bundle, ecfg.split, cfg.data, int(cfg.seed))
    contract = {k: run.cfg.data[k] for k in ("image_size", "mean", "std")}
    data_cfg = OmegaConf.merge(ecfg.data, contract)
    try:
        bundle = data.build_cohort(data_cfg, ecfg.seed)
    except ValueError as exc:
        message = one_line(exc)
        raise ConfigError(message if message.startswith("data.") else f"data: {message}") from exc
    return Cohort(ecfg.cohort_name or "external", bundle, None, data_cfg, int(ecfg.seed))


def score_cohort(scorer: Scorer, cohort: Cohort) -> ScoredSplit:
    """The cohort's probabilities with its manifest rows and images (for the galleries)."""
    bundle = cohort.bundle
    desc = f"scoring {cohort.name}"
    scores = score(scorer, bundle, cohort.split, cohort.data_cfg, cohort.seed, desc)
    if cohort.split is None:
        idx = np.arange(len(bundle.manifest))
        rows = bundle.manifest.reset_index(drop=True)
    else:
        idx = bundle.indices(cohort.split)
        rows = bundle.manifest.iloc[idx].reset_index(names="row")
    view = RowView(bundle.patches, idx)
    return ScoredSplit(cohort.name, rows, scores.probs, view, scores.uncalibrated)


def prepare_evaluation(ecfg: DictConfig) -> tuple[TrainedRun, DictConfig, Cohort]:
    """Everything her2exp-eval can refuse, before it builds a model or scores a patch: the
    command's values, the tracking store (a look-up never creates one), the checkpoint, the
    evaluation settings (the run's, merged with the command's) and the cohort's data."""
    check_eval(ecfg)
    if ecfg.tracking.backend == "mlflow":
        require_store(ecfg.tracking.uri, lookup=bool(ecfg.run_id or ecfg.model_uri))
    run = load_run(by_model_uri(ecfg))
    evaluation = resolve_evaluation(run.cfg.get("evaluation"), evaluation_overrides(ecfg))
    check_frozen_aggregation(run, evaluation)
    check_frozen_scoring(run, evaluation)
    run.decision_level = evaluation.decision_level
    if evaluation.operating_point not in run.thresholds:
        raise ConfigError(
            f"evaluation.operating_point={evaluation.operating_point!r}: the run froze "
            f"{', '.join(run.thresholds)}"
        )
    run_stain(run, ecfg.seed)  # refused here rather than after the data is built
    return run, evaluation, load_cohort(ecfg, run)
