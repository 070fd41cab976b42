"""A sweep's member models as one: `her2exp-eval sweep_run_id=` and `her2exp-predict sweep_run_id=`.

The members are the sweep parent's FINISHED child runs (`tracking.sweep.finished_children`), of a
sweep the sweep model classifies as cv or repeat (`tracking.sweep_model`: a grid or a
leaderboard is refused before any checkpoint is downloaded), each loaded through
`evaluation.load_run` (its best.pt) and scored by its own `evaluation.Scorer` (`build_scorer`:
eval through `score`, predict through `Scorer.probabilities`), so a member is scored exactly as
its own `her2exp-eval run_id=` would score it. The ensemble's probability is the mean of the members';
the per-patch sd across members is its uncertainty. The ensemble's own operating points are
chosen per level, as a run's are, on scores no member trained on: for a cross-validation sweep
the pooled out-of-fold predictions (each child's `reports/predictions_test.csv`: every patient
scored by the one member that never saw it), for a repeat sweep (all members on one split) the
mean of the members' validation probabilities (docs/architecture.md, "Evaluation").
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from her2exp import reports
from her2exp.config import ConfigError
from her2exp.config.scoring import evaluation_overrides
from her2exp.core import progress
from her2exp.core.fileio import safe_name
from her2exp.data.bags import mil_name
from her2exp.evaluation.cohort import load_cohort, score_cohort
from her2exp.evaluation.record import EvalRecord, record_eval
from her2exp.evaluation.scored import ScoredSplit, thresholds_on_rows
from her2exp.evaluation.scorer import build_scorer
from her2exp.evaluation.trained_run import (
    TrainedRun,
    check_frozen_scoring,
    load_run,
    resolve_evaluation,
)
from her2exp.runtime.hydra_run import HydraRun
from her2exp.runtime.rundir import ARTIFACTS, artifact
from her2exp.tracking.factory import build as build_tracker
from her2exp.tracking.store import require_store
from her2exp.tracking.sweep import client_for, download_artifact, finished_children
from her2exp.tracking.sweep_model import CV, REPEAT, SweepChild, not_an_ensemble, sweep_kind

#: What each kind of sweep chooses the ensemble's thresholds on (summary.md, MLflow).
CHOSEN_ON = {
    CV: "thresholds chosen on the pooled out-of-fold predictions of {k} members",
    REPEAT: "thresholds chosen on the mean validation probabilities of {k} members",
}
#: The child artifact each kind chooses on.
TABLE = {
    CV: artifact(ARTIFACTS.report("predictions_test.csv")),
    REPEAT: artifact(ARTIFACTS.report("predictions_val.csv")),
}


@dataclass
class Ensemble:
    """The sweep's members and the ensemble's thresholds; `run` stands for the whole ensemble
    where a single TrainedRun is expected (its config is the first member's, its levels the
    ensemble's thresholds)."""

    parent_run_id: str
    members: list[TrainedRun]
    kind: str  # cv | repeat
    chosen_on: str  # CHOSEN_ON[kind] with the member count
    run: TrainedRun

    @property
    def member_ids(self) -> list[str]:
        return [str(m.source_run) for m in self.members]


def ensemble_thresholds(
    kind: str, tables: list[pd.DataFrame], ecfg: Any
) -> dict[str, dict[str, float]]:
    """Operating points per level (metrics.operating_points_by_level, as a run chooses them) on
    the pooled out-of-fold tables (cv: their concatenation) or on the mean of the members'
    validation probabilities (repeat: rows aligned by `row`; val rows that differ are refused)."""
    if kind == CV:
        pooled = pd.concat(tables, ignore_index=True)
        labels, probs = pooled["label"].to_numpy(), pooled["prob_her2_pos"].to_numpy()
        ids = pooled
    elif kind == REPEAT:
        aligned = [t.sort_values("row", kind="stable").reset_index(drop=True) for t in tables]
        first = aligned[0]
        for i, t in enumerate(aligned[1:], start=1):
            same = np.array_equal(t["row"].to_numpy(), first["row"].to_numpy())
            if not same or not np.array_equal(t["label"].to_numpy(), first["label"].to_numpy()):
                raise ConfigError(
                    f"member {i} validated on other rows than member 0 ({len(t)} vs "
                    f"{len(first)} val rows, or other labels): a repeat ensemble needs one split "
                    "(train the sweep with data.split_seed and data.data_seed fixed)"
                )
        labels = first["label"].to_numpy()
        probs = np.mean([t["prob_her2_pos"].to_numpy() for t in aligned], axis=0)
        ids = first
    else:
        raise ValueError(f"kind={kind!r}: cv or repeat")

    return thresholds_on_rows(ecfg, ids, labels, probs)


def _children(parent_run_id: str, uri: str) -> tuple[Any, list[SweepChild], str]:
    """(an MLflow client, the parent's FINISHED children in job order, the ensemble's kind):
    `tracking.sweep.finished_children`, classified by the sweep model's one `sweep_kind`. A
    sweep whose children differ in more than seeds or folds (a grid, a leaderboard) is refused
    here, before any member's checkpoint is downloaded: its mean is no model anyone trained."""
    client = client_for(uri)
    children = finished_children(client, parent_run_id, uri)
    why = not_an_ensemble(children)
    if why is not None:
        raise ConfigError(f"sweep_run_id={parent_run_id!r}: {why}; evaluate one child with run_id=")
    kind = sweep_kind(children)
    return client, children, kind if kind in (CV, REPEAT) else REPEAT  # one child: a repeat


def _member(child_id: str, parent_run_id: str, uri: str) -> TrainedRun:
    """One member through load_run (its best.pt), a failure naming the member."""
    source = OmegaConf.create({"run_id": child_id, "checkpoint": None, "tracking": {"uri": uri}})
    try:
        run = load_run(source)
    except ConfigError as exc:
        raise ConfigError(f"sweep_run_id={parent_run_id!r}: member {exc}") from exc
    run.source = f"member run_id={child_id!r} of sweep_run_id={parent_run_id!r}"
    return run


def _table(client: Any, child_id: str, artifact: str, parent_run_id: str) -> pd.DataFrame:
    """A child's predictions table (the artifact `artifact`), a missing one naming the member."""
    with tempfile.TemporaryDirectory(prefix="her2exp-ensemble-") as tmp:
        local = download_artifact(client, child_id, artifact, tmp)
        if local is None:
            raise ConfigError(
                f"sweep_run_id={parent_run_id!r}: member run_id={child_id!r} has no {artifact} "
                "artifact (trained before runs logged their predictions)"
            )
        return pd.read_csv(local)


def check_members(members: list[TrainedRun]) -> DictConfig:
    """Members must read patches alike (image size, mean, std) and evaluate alike (the resolved
    evaluation settings); the first one that differs from member 0 is refused, named. Returns
    the shared evaluation settings."""
    first = members[0]
    if any(mil_name(m.cfg) != "none" for m in members):
        raise ConfigError("sweep_run_id=: an ensemble of mil runs is not supported; give run_id=")
    own = resolve_evaluation(first.cfg.get("evaluation"), OmegaConf.create({}))
    contract = {k: OmegaConf.to_container(first.cfg.data)[k] for k in ("image_size", "mean", "std")}
    for m in members[1:]:
        data = OmegaConf.to_container(m.cfg.data)
        for key, value in contract.items():
            if data[key] != value:
                raise ConfigError(
                    f"{m.source}: data.{key}={data[key]} differs from member "
                    f"{first.source_run}'s {value}: members must read patches alike"
                )
        theirs = resolve_evaluation(m.cfg.get("evaluation"), OmegaConf.create({}))
        diff = [k for k in own if own[k] != theirs[k]]
        if diff:
            k = diff[0]
            raise ConfigError(
                f"{m.source}: evaluation.{k}={theirs[k]} differs from member "
                f"{first.source_run}'s {own[k]}: members must evaluate alike"
            )
    return own


def load_ensemble(parent_run_id: str, uri: str, overrides: Any = None) -> Ensemble:
    """The sweep's members (checked alike) and the ensemble's thresholds, chosen per level on
    the pooled out-of-fold predictions (cv) or the mean validation probabilities (repeat)."""
    client, children, kind = _children(parent_run_id, uri)
    ids = [c.run_id for c in children]
    loading = progress.bar(ids, desc="ensemble: loading members", unit="run")
    members = [_member(c, parent_run_id, uri) for c in loading]  # each best.pt downloaded
    own = check_members(members)
    evaluation = resolve_evaluation(own, overrides or OmegaConf.create({}))
    tables = [_table(client, c, TABLE[kind], parent_run_id) for c in ids]
    levels = ensemble_thresholds(kind, tables, evaluation)
    first = members[0]
    run = TrainedRun(
        {"epoch": None},
        None,
        first.cfg,
        levels,
        f"sweep_run_id={parent_run_id!r}",
        evaluation.decision_level,
    )
    chosen_on = CHOSEN_ON[kind].format(k=len(members))
    return Ensemble(parent_run_id, members, kind, chosen_on, run)


def member_stats(probs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, sd) across members per patch: the sd of these K members (ddof 0), 0 for one."""
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probs])
    return stacked.mean(axis=0), stacked.std(axis=0)


def plot_most_uncertain(report_dir: Path, split: ScoredSplit, max_images: int) -> Path:
    """most_uncertain_<cohort>.png: the patches with the highest member sd, highest first."""
    order = np.argsort(-np.asarray(split.member_sd), kind="stable")
    return reports.plot_error_gallery(
        report_dir / f"most_uncertain_{safe_name(split.name)}.png",
        split.images,
        np.asarray(split.probs, dtype=np.float64),
        order,
        f"{split.name}: highest sd across ensemble members first (p = ensemble mean)",
        max_images,
    )


def _calibration(run: TrainedRun) -> str:
    """A member's frozen calibration, for the report (each member applies its own)."""
    c = run.calibration
    t = f" T={c['temperature']:.4f}" if "temperature" in c else ""
    return f"{run.source_run}: {c['method']}{t}"


def evaluate_sweep(ecfg: DictConfig, hydra: HydraRun | None = None) -> dict[str, Any]:
    """her2exp-eval sweep_run_id=: the members' mean probability on a cohort, at the ensemble's
    thresholds, reported through report_cohorts into one MLflow eval run."""
    if ecfg.split:
        raise ConfigError(
            f"split={ecfg.split}: with sweep_run_id each member has its own split; give a "
            "cohort (data.*), or evaluate one member with run_id="
        )
    if ecfg.tracking.backend == "mlflow":
        require_store(ecfg.tracking.uri, lookup=True)
    ens = load_ensemble(ecfg.sweep_run_id, ecfg.tracking.uri, evaluation_overrides(ecfg))
    evaluation = resolve_evaluation(ens.run.cfg.get("evaluation"), evaluation_overrides(ecfg))
    if evaluation.operating_point not in ens.run.thresholds:
        raise ConfigError(
            f"evaluation.operating_point={evaluation.operating_point!r}: the ensemble chose "
            f"{', '.join(ens.run.thresholds)}"
        )
    for member in ens.members:  # each member's own frozen temperature; another TTA warned
        check_frozen_scoring(member, evaluation)
    cohort = load_cohort(ecfg, ens.members[0])  # the contract all members share
    scored = [
        score_cohort(build_scorer(m, ecfg.trainer.amp, ecfg.seed, evaluation.tta), cohort)
        for m in progress.bar(ens.members, desc="ensemble: members", unit="run")
    ]
    mean, sd = member_stats([s.probs for s in scored])
    split = ScoredSplit(scored[0].name, scored[0].rows, mean, scored[0].images, member_sd=sd)
    return _report_sweep(ecfg, ens, evaluation, cohort, split, hydra)


def _report_sweep(
    ecfg: DictConfig,
    ens: Ensemble,
    evaluation: DictConfig,
    cohort: Any,
    split: ScoredSplit,
    hydra: HydraRun | None = None,
) -> dict[str, Any]:
    """One MLflow eval run (tags source_sweep_run_id, ensemble_members) through the eval's own
    `record_eval`, with the uncertainty gallery and the mean member sd."""
    tracker = build_tracker(ecfg.tracking, True)
    tags = {
        "task_name": "eval",
        "source_sweep_run_id": ens.parent_run_id,
        "ensemble_members": ",".join(ens.member_ids),
        "ensemble_kind": ens.kind,
        "ensemble_thresholds": ens.chosen_on,
        "cohort": split.name,
        "eval_split": "none",
        "tta": evaluation.tta,
        "data_fingerprint": cohort.bundle.fingerprint,
    }
    logged = ecfg.copy()
    with open_dict(logged):  # MLflow params: ensemble.n_members, ensemble.thresholds
        logged.ensemble = {"n_members": len(ens.members), "thresholds": ens.chosen_on}
    header = {
        "model": ens.run.cfg.model.name,
        "source_sweep_run_id": ens.parent_run_id,
        "ensemble_members": ", ".join(ens.member_ids),
        "ensemble_thresholds": ens.chosen_on,
        "member_calibration": "; ".join(_calibration(m) for m in ens.members),
        "tta": evaluation.tta,
        "data_fingerprint": cohort.bundle.fingerprint,
    }

    def gallery(report_dir: Path) -> list[Path]:
        tracker.log_metrics({f"{split.name}_member_sd_mean": float(np.mean(split.member_sd))})
        return [plot_most_uncertain(report_dir, split, evaluation.gallery_max)]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = EvalRecord(logged, tags, header, device, gallery, hydra=hydra)
    out = record_eval(tracker, record, split, ens.run.levels, evaluation, cohort.seed)
    return {**out, "ensemble": ens}
