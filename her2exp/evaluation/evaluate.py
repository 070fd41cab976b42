"""`evaluate_cohort`, her2exp-eval's library part: a trained run (or a sweep's members as one
ensemble) scored on a cohort at its frozen thresholds, reported in one MLflow eval run.

It loads the run, scores a new cohort or the run's own val/test split with the run's own
settings (evaluation, AMP, stain reference, TTA views) unless the eval command overrides them,
with the temperature frozen in best.pt always applied, and reports through `report_cohorts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from her2exp.config.commands import check_eval
from her2exp.data.bags import mil_name
from her2exp.engine import explain
from her2exp.evaluation.bags import score_cohort_bags
from her2exp.evaluation.cohort import prepare_evaluation, score_cohort
from her2exp.evaluation.ensemble import evaluate_sweep
from her2exp.evaluation.record import EvalRecord, record_eval
from her2exp.evaluation.scorer import build_scorer
from her2exp.reports import card as model_card
from her2exp.runtime.hydra_run import HydraRun
from her2exp.runtime.rundir import ARTIFACTS, artifact, refuse_a_training_run
from her2exp.tracking.factory import build as build_tracker
from her2exp.tracking.store import download_from_run


def evaluate_cohort(ecfg: DictConfig, hydra: HydraRun | None = None) -> dict[str, Any]:
    """Score a trained run at its frozen thresholds (a new cohort, or its own split with
    `split=val|test`); one MLflow run linked to the source run by `source_run_id`, connected
    before scoring and opened only once the scores exist. `sweep_run_id`: the sweep's members
    as one ensemble (her2exp/evaluation/ensemble.py). `hydra`: the command's Hydra facts, read
    at its entry (cli.eval.main), for the MLflow run's sweep and job."""
    out = OmegaConf.select(ecfg, "output_dir", default=None, throw_on_resolution_failure=False)
    if out is not None:  # None: composed without Hydra's run (reports go nowhere yet)
        refuse_a_training_run(Path(out), "her2exp-eval")
    if ecfg.get("sweep_run_id"):
        check_eval(ecfg)
        return evaluate_sweep(ecfg, hydra)
    run, evaluation, cohort = prepare_evaluation(ecfg)
    scorer = build_scorer(run, ecfg.trainer.amp, ecfg.seed, evaluation.tta)
    tracker = build_tracker(ecfg.tracking, True)
    extra = None
    if mil_name(run.cfg) != "none":  # bags: one row per bag, attention files beside
        split, extra = score_cohort_bags(
            scorer, cohort, run, evaluation.operating_point, evaluation.get("figures", True)
        )
    else:
        split = score_cohort(scorer, cohort)
    bundle = cohort.bundle
    source = ecfg.checkpoint or f"runs:/{run.source_run}/{artifact(ARTIFACTS.best)}"
    tags = {
        "task_name": "eval",
        "source_run_id": run.source_run or "none",
        "source_checkpoint": str(source),
        "cohort": split.name,
        "eval_split": ecfg.split or "none",
        "amp": scorer.amp,
        "tta": scorer.tta,
        "data_fingerprint": bundle.fingerprint,
    }
    header = {
        "model": run.cfg.model.name,
        "source_run_id": run.source_run,
        "seed": run.cfg.seed,
        "data_fingerprint": bundle.fingerprint,
        "best_epoch": run.state.get("epoch"),
    }
    if extra is not None:
        header["mil"] = {"name": run.cfg.mil.name, "bag_by": run.cfg.data.bag_by}
    card = model_card.eval_card(run, ecfg, download_from_run)  # the run's card + this cohort
    record = EvalRecord(ecfg, tags, header, scorer.device, extra, after_reports=card, hydra=hydra)
    if evaluation.get("explain", False) and extra is None:  # bags have no patch galleries
        # Eval scores pixels through the whole model, a cached-feature run's too.
        record.explainer = explain.build(scorer.model, scorer.preprocess, False, scorer.stain)
    return record_eval(tracker, record, split, run.levels, evaluation, cohort.seed, run.calibration)
