"""The end of a run: best weights -> validation (operating points chosen, then frozen) -> test at
those thresholds -> reports, MLflow entries and the model file evaluations load.

It scores through the trainer's validator and reports through the one evaluation path
(`report_cohorts`), so the run's test table and a later `her2exp-eval` of the same checkpoint on
the same data cannot disagree (docs/architecture.md, "Evaluation").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from her2exp import metrics, tracking
from her2exp.core import checkpoint
from her2exp.data.bags import bag_rows
from her2exp.engine import Scores, explain
from her2exp.evaluation import ScoredSplit, calibrated, report_cohorts, thresholds_on_rows
from her2exp.evaluation import served as serving
from her2exp.evaluation.bags import gathered_attention, scored_bags, write_attention
from her2exp.reports import card as model_card
from her2exp.runtime import distributed
from her2exp.runtime.rundir import ARTIFACTS, HYDRA_ARTIFACT, RunDir, artifact
from her2exp.training.builders import DataParts
from her2exp.training.validator import Validator

log = logging.getLogger("her2exp")


def final_evaluation(
    cfg: DictConfig,
    parts: DataParts,
    validator: Validator,
    model: Any,
    threshold: float,
    tracker: tracking.Tracker,
    run_dir: Path,
    summary: dict[str, Any],
    is_main: bool,
    overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Score val and test with the best weights (already loaded), with the run's TTA views
    and calibration (fitted on val, then frozen like the thresholds, which are chosen on the
    calibrated val scores), and report them. `overrides`: the command line's (the model card's
    reproduce line), as the composition root read them from Hydra."""
    tta = cfg.evaluation.get("tta", "none")
    val = validator.score(parts.loaders["val"], tta, "final: val")
    test = validator.score(parts.loaders["test"], tta, "final: test")
    calibration = fit_calibration(cfg.evaluation, val, test)
    bundle = parts.bundle
    if parts.bags is None:
        thresholds = choose_thresholds(cfg.evaluation, bundle, val.labels, val.probs)
    else:  # bags: chosen on the val bags (their level is data.bag_by), then frozen
        bag_val = bag_rows(split_rows(bundle, "val"), parts.bags["val"])
        thresholds = thresholds_on_rows(cfg.evaluation, bag_val, val.labels, val.probs)
    same_scoring = tta == "none" and calibration["method"] == "none"
    drift = youden_drift(thresholds["tile"]["youden"], threshold, same_scoring)
    out: dict[str, Any] = {
        "thresholds": thresholds,
        "decision_level": cfg.evaluation.decision_level,
        "threshold_youden_val": thresholds["tile"]["youden"],
        "youden_threshold_drift": drift,
        "calibration": calibration,
    }
    weights = bag_attention(parts, model, validator)  # a collective: on every rank
    if not is_main:
        return out
    scored, extra = scored_splits(cfg, parts, (val, test), thresholds, weights, run_dir)
    git = tracking.git_info()
    header = {
        **summary,
        "seed": cfg.seed,
        "git_commit": git["git_commit"],
        "git_dirty": git["git_dirty"],
        "test_loss": test.loss,
    }
    if parts.bags is not None:
        header["mil"] = {"name": cfg.mil.name, "bag_by": cfg.data.bag_by}
    evs = report_cohorts(
        scored,
        thresholds,
        cfg.evaluation,
        RunDir(run_dir).reports,
        tracker,
        header,
        cfg.seed,
        calibration=calibration,
        extra_reports=extra,
        explainer=_explainer(cfg, parts, model),
    )
    model_card.write_model_card(cfg, RunDir(run_dir).reports, bundle.manifest, tracker, overrides)
    tracker.log_metrics(
        {
            "best_epoch": summary["best_epoch"],
            "best_val_auc": summary["best_val_auc"],
            "threshold_youden_val": thresholds["tile"]["youden"],
            "youden_threshold_drift": drift,
            "test_loss": test.loss,
        }
    )
    record_model(cfg, parts, model, tracker, run_dir, thresholds, calibration)
    out.update(
        {
            "val_evaluation": evs["val"],
            "test_evaluation": evs["test"],
            "test_auc": evs["test"].auc.auc,
        }
    )
    return out


def record_model(
    cfg: DictConfig,
    parts: DataParts,
    model: Any,
    tracker: tracking.Tracker,
    run_dir: Path,
    thresholds: dict[str, dict[str, float]],
    calibration: dict[str, Any],
) -> None:
    """What later commands load: the thresholds and calibration frozen into best.pt, the run's
    files and (patch models) the MLflow model."""
    best_ckpt = freeze_into_checkpoint(
        run_dir, thresholds, parts.stain, cfg.evaluation.decision_level, calibration
    )
    log_run_files(cfg, run_dir, tracker, best_ckpt)
    if cfg.tracking.get("log_model", True) and parts.bags is None:
        log_model(cfg, model, tracker, thresholds, run_dir, calibration)
    elif cfg.tracking.get("log_model", True):  # its signature is one image batch, not bags
        log.info("mil=%s: no MLflow model logged (best.pt is the model)", cfg.mil.name)


def _explainer(cfg: DictConfig, parts: DataParts, model: Any) -> Any:
    """evaluation.explain's maps of the run's model (None when off or not possible)."""
    if not cfg.evaluation.get("explain", False):
        return None
    on_device = parts.preprocess.stain is not None
    stain = None if on_device else parts.stain
    return explain.build(model, parts.preprocess, bool(cfg.model.cache_features), stain)


def scored_splits(
    cfg: DictConfig,
    parts: DataParts,
    scores: tuple[Scores, Scores],
    thresholds: dict[str, dict[str, float]],
    weights: dict[str, np.ndarray],
    run_dir: Path,
) -> tuple[list[ScoredSplit], list[Path]]:
    """val and test as report_cohorts takes them: tile rows with their patches, or one row per
    bag with the bags' attention files written beside (returned as extra reports)."""
    bundle = parts.bundle
    scored, extra = [], []
    for name, s in zip(("val", "test"), scores, strict=True):
        rows = split_rows(bundle, name)
        if parts.bags is None:
            split = ScoredSplit(name, rows, s.probs, bundle.view(name), s.uncalibrated)
        else:
            split = ScoredSplit(
                name, bag_rows(rows, parts.bags[name]), s.probs, None, s.uncalibrated
            )
            op = thresholds["tile"][cfg.evaluation.operating_point]
            extra += write_attention(
                RunDir(run_dir).reports,
                name,
                rows,
                parts.bags[name],
                weights[name],
                scored_bags(split.rows, s.probs, op),
                bundle.view(),  # [i]: manifest row i, as the attention table's `row`
                bundle.manifest if cfg.data.source == "slides" else None,
                cfg.evaluation.get("figures", True),
            )
        if not np.array_equal(split.labels, s.labels):
            raise RuntimeError("gathered scores are not in dataset order")
        scored.append(split)
    return scored, extra


def split_rows(bundle: Any, name: str) -> pd.DataFrame:
    """The manifest rows of one split in dataset order, with their manifest row as `row`."""
    return bundle.manifest.iloc[bundle.indices(name)].reset_index(names="row")


def bag_attention(parts: DataParts, model: Any, validator: Validator) -> dict[str, np.ndarray]:
    """mil: every val and test bag's attention (each bag once, gathered); else nothing."""
    if parts.bags is None:
        return {}
    distributed.broadcast_module_state(model.head)
    return {
        s: gathered_attention(model.head, parts.loaders[s], validator.dctx) for s in ("val", "test")
    }


def fit_calibration(ecfg: DictConfig, val: Scores, test: Scores) -> dict[str, Any]:
    """`evaluation.calibration=temperature`: one T fitted on the val probabilities (the TTA
    mean with TTA) by NLL and applied to val and test in place, keeping the model's own in
    `.uncalibrated` for the before/after report. Every rank fits the same T on the same
    gathered scores. Returns what best.pt stores as `state["calibration"]`."""
    if ecfg.get("calibration", "none") == "none":
        return {"method": "none"}
    t = metrics.fit_temperature(val.labels, val.probs)
    frozen = {"method": "temperature", "temperature": t}
    for s in (val, test):
        calibrated(s, frozen)  # as every later command applies it (evaluation.scorer)
    log.info("temperature scaling: T = %.4f fitted on validation by NLL", t)
    return frozen


def choose_thresholds(
    ecfg: DictConfig, bundle: Any, labels: np.ndarray, probs: np.ndarray
) -> dict[str, dict[str, float]]:
    """Operating points chosen on validation at the tile, slide and patient level (each level's
    aggregates as `ecfg` aggregates them), to be frozen. Every rank computes the same values."""
    rows = bundle.manifest.iloc[bundle.indices("val")]
    if not np.array_equal(rows["label"].to_numpy(), labels):
        raise RuntimeError("gathered val scores are not in dataset order")

    return thresholds_on_rows(ecfg, rows, labels, probs)


#: Rescoring the same weights on the same val split moves scores only by rounding: cuDNN and
#: bf16 kernel choices, or a resume at another world size, reach the 7th digit at most.
YOUDEN_DRIFT_WARNING = 1e-9


def youden_drift(recomputed: float, during_training: float, same_scoring: bool = True) -> float:
    """How far the Youden threshold of the final rescoring lies from the one the best epoch
    chose. The rescored value is the one frozen (it matches the scores reported); a drift is a
    warning and a metric for the audit, never a finished run thrown away. With TTA or a
    calibration (`same_scoring` false) the final scores differ from the epoch's one view by
    design: the difference is recorded, not warned about."""
    drift = abs(recomputed - during_training)
    if drift > YOUDEN_DRIFT_WARNING and not same_scoring:
        log.info(
            "the Youden threshold of the final scoring (evaluation.tta, evaluation.calibration) "
            "is %.10g, the best epoch's one-view threshold %.10g; %.10g is frozen",
            recomputed,
            during_training,
            recomputed,
        )
    elif drift > YOUDEN_DRIFT_WARNING:
        log.warning(
            "the Youden threshold of the final rescoring, %.10g, differs from the best "
            "epoch's, %.10g, by %.3g (numerical drift of the kernels); %.10g is frozen",
            recomputed,
            during_training,
            drift,
            recomputed,
        )
    return drift


def freeze_into_checkpoint(
    run_dir: Path,
    thresholds: dict[str, dict[str, float]],
    stain: Any,
    decision_level: str = "tile",
    calibration: dict[str, Any] | None = None,
) -> Path:
    """The operating points keyed by level, the decision level, the calibration (and the
    stain reference) go into best.pt, which evaluations load."""
    best_ckpt = RunDir(run_dir).best
    if best_ckpt.is_file():
        state = checkpoint.load(best_ckpt)
        state["thresholds"] = thresholds
        state["decision_level"] = decision_level
        state["calibration"] = dict(calibration or {"method": "none"})
        state["stain"] = None if stain is None else stain.state_dict()
        checkpoint.save(state, best_ckpt)
    return best_ckpt


def log_run_files(cfg: DictConfig, run_dir: Path, tracker: tracking.Tracker, best: Path) -> None:
    """The resolved config, Hydra's record of the command and (optionally) best.pt."""
    run = RunDir(run_dir)
    path = checkpoint.atomic_write_text(run.config_resolved, OmegaConf.to_yaml(cfg, resolve=True))
    tracker.log_artifact(path)
    tracker.log_artifact(run.hydra, HYDRA_ARTIFACT)
    if cfg.tracking.get("log_checkpoint", True) and best.is_file():
        tracker.log_artifact(best, artifact(ARTIFACTS.checkpoints))


def log_model(
    cfg: DictConfig,
    model: Any,
    tracker: tracking.Tracker,
    thresholds: dict[str, dict[str, float]],
    run_dir: Path,
    calibration: dict[str, Any] | None = None,
) -> None:
    """The MLflow model (her2exp/evaluation/served.py): RGB patches in, `prob_her2_pos` and
    `called_her2_pos` at the frozen tile-level `operating_point` out, with the run's resize,
    stain reference, mean/std, TTA and temperature applied inside (from best.pt, its artifact).
    The metadata keeps the contract of every level: `thresholds` are the decision level's (a
    client aggregating tile scores into slides or patients calls with those, aggregated as
    `aggregation` says); `thresholds_by_level` holds every level's."""
    size = cfg.data.image_size
    e = cfg.evaluation
    metadata = {
        "thresholds": thresholds[e.decision_level],
        "thresholds_by_level": thresholds,
        "decision_level": e.decision_level,
        "operating_point": e.operating_point,
        "aggregation": {
            "slide": e.slide_aggregation,
            "patient": e.patient_aggregation,
            "topk": int(e.topk),
        },
        "calibration": dict(calibration or {"method": "none"}),
        "tta": e.get("tta", "none"),
        "class_names": ["HER2-", "HER2+"],
        "input": "column image: base64 PNG/JPEG or (H, W, 3) uint8 RGB lists, any size",
        "output": "prob_her2_pos (calibrated P(HER2+)), called_her2_pos at the tile-level "
        "operating_point (params.operating_point), threshold, operating_point",
        "image_size": size,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "backbone_weights": dict(getattr(model, "weights_info", {})),
    }
    if not RunDir(run_dir).best.is_file():
        log.warning("no %s: the MLflow model is not logged", RunDir(run_dir).best)
        return
    tracker.log_model(serving.model_spec(run_dir, size, e.operating_point, metadata))
