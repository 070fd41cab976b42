"""The one evaluation path, and `her2exp-eval` for external cohorts.

`report_cohorts` turns scored splits into metrics at frozen thresholds, reports and MLflow
entries. The end-of-training test evaluation and `her2exp-eval` both call it, so a run's test
table and a later re-evaluation of the same checkpoint on the same data can never disagree.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from her2exp import checkpoint, metrics, reports, tracking
from her2exp.config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class ScoredSplit:
    """One cohort's HER2+ probabilities with the manifest rows they belong to, in order."""

    name: str
    rows: pd.DataFrame  # manifest rows (label, patient_id, ...) in scoring order
    probs: np.ndarray
    images: np.ndarray | None = None  # uint8 (N, H, W, 3) for the error galleries

    @property
    def labels(self) -> np.ndarray:
        return self.rows["label"].to_numpy()


def report_cohorts(
    splits: list[ScoredSplit],
    thresholds: dict[str, float],
    ecfg: DictConfig,
    report_dir: Path,
    tracker: tracking.Tracker,
    header: dict[str, Any],
    seed: int,
    gallery_splits: tuple[str, ...] = ("test", "external"),
) -> dict[str, metrics.SplitEvaluation]:
    """Metrics at the frozen `thresholds` for every split -> reports -> MLflow (rank 0 only)."""
    evaluations = {
        s.name: metrics.evaluate_split(
            s.labels,
            s.probs,
            thresholds,
            patient_ids=s.rows["patient_id"].to_numpy(),
            n_boot=ecfg.n_boot,
            seed=seed,
            patient_how=ecfg.patient_aggregation,
        )
        for s in splits
    }
    galleries = {
        s.name: (s.images, s.labels, s.probs, thresholds[ecfg.operating_point])
        for s in splits
        if s.name in gallery_splits and s.images is not None
    }
    reports.write_clinical_report(
        report_dir,
        evaluations,
        galleries,
        {**header, "operating_point": ecfg.operating_point, "thresholds": thresholds},
        max_gallery=ecfg.gallery_max,
    )
    for s in splits:
        rows = s.rows.copy()
        rows["prob_her2_pos"] = s.probs
        for name, t in thresholds.items():
            rows[f"called_her2_pos_{name}"] = (s.probs >= t).astype(int)
        reports.atomic_write_text(
            report_dir / f"predictions_{s.name}.csv", rows.to_csv(index=False)
        )
    flat: dict[str, float] = {}
    for name, ev in evaluations.items():
        flat.update(ev.as_flat_dict(f"{'final_val' if name == 'val' else name}_"))
    flat.update({f"threshold_{k}_val": v for k, v in thresholds.items()})
    tracker.log_metrics(flat)
    tracker.log_artifact(report_dir, "reports")
    return evaluations


def format_table(ev: metrics.SplitEvaluation, title: str) -> str:
    """The console version of summary.md's table: each frozen operating point with its CIs."""

    def ci(v: float, lo: float, hi: float) -> str:
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"

    a = ev.auc
    lines = [
        f"{title}: n={ev.n} ({ev.n_pos} HER2+), AUC {ci(a.auc, a.low, a.high)} (DeLong 95% CI)"
    ]
    for name, r in ev.reports.items():
        lines.append(
            f"  {name:>7} t={r.threshold:.4f}  sensitivity {ci(r.sensitivity, r.sensitivity_low, r.sensitivity_high)}"
            f"  specificity {ci(r.specificity, r.specificity_low, r.specificity_high)}"
            f"  PPV {r.precision:.3f}  NPV {r.npv:.3f}  TP/FN/FP/TN {r.tp}/{r.fn}/{r.fp}/{r.tn}"
        )
    return "\n".join(lines)


# -- her2exp-eval --------------------------------------------------------------------------------
def load_source(ecfg: DictConfig) -> tuple[dict[str, Any], str | None]:
    """best.pt of a run (by MLflow run id) or a checkpoint path; returns (state, run id)."""
    if bool(ecfg.run_id) == bool(ecfg.checkpoint):
        raise ConfigError("give exactly one of run_id=<MLflow run id> or checkpoint=<best.pt path>")
    if ecfg.checkpoint:
        return checkpoint.load(ecfg.checkpoint), None
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking.resolve_uri(ecfg.tracking.uri))
    try:
        client.get_run(ecfg.run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"run_id={ecfg.run_id!r} not found in {ecfg.tracking.uri}") from exc
    local = client.download_artifacts(ecfg.run_id, "checkpoints/best.pt", tempfile.mkdtemp())
    return checkpoint.load(local), ecfg.run_id


def evaluate_cohort(ecfg: DictConfig) -> dict[str, Any]:
    """Score a trained model on a cohort at the run's frozen thresholds; one linked MLflow run."""
    from her2exp import data, models
    from her2exp.engine import Preprocess, score

    state, source_run = load_source(ecfg)
    if "thresholds" not in state:
        raise ConfigError(
            "the checkpoint holds no frozen thresholds (train it with her2exp >= 0.1)"
        )
    train_cfg = OmegaConf.create(state["config"])
    data_cfg = ecfg.data
    with_model_contract = OmegaConf.merge(
        data_cfg,
        {k: train_cfg.data[k] for k in ("image_size", "mean", "std")},  # the model's input contract
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = models.build(train_cfg.model, device, load_weights=False)  # best.pt holds them
    model.load_state_dict(state["model"])
    bundle = data.build_cohort(with_model_contract, ecfg.seed)
    dataset = data.make_dataset(bundle, None, with_model_contract, ecfg.seed)
    loader = data.eval_loader(dataset, with_model_contract, device)
    from her2exp.stain import pipeline as stain_pipeline

    stain = stain_pipeline.from_state(train_cfg.stain, state.get("stain"), ecfg.seed)
    preprocess = Preprocess(
        device,
        tuple(train_cfg.data.mean),
        tuple(train_cfg.data.std),
        stain=None if stain is None else stain.to(device),  # the run's own fitted reference
    )
    scores = score(model, loader, preprocess)
    thresholds = {k: float(v) for k, v in state["thresholds"].items()}
    ecfg_eval = OmegaConf.merge(train_cfg.get("evaluation", {}), ecfg.evaluation)

    tracker = tracking.build(ecfg.tracking, True)
    status = "FAILED"
    try:
        tags = {
            "task_name": "eval",
            "source_run_id": source_run or "none",
            "source_checkpoint": str(ecfg.checkpoint or f"runs:/{source_run}/checkpoints/best.pt"),
            "cohort": ecfg.cohort_name,
            "data_fingerprint": bundle.fingerprint,
            **tracking.git_info(),
            **tracking.environment_tags(device),
        }
        tracker.start(ecfg, tags)
        out_dir = Path(ecfg.output_dir)
        split = ScoredSplit(ecfg.cohort_name, bundle.manifest.reset_index(drop=True), scores.probs,
                            bundle.images)  # fmt: skip
        header = {
            "model": train_cfg.model.name,
            "source_run_id": source_run,
            "seed": train_cfg.seed,
            "git_commit": tags["git_commit"],
            "data_fingerprint": bundle.fingerprint,
            "best_epoch": state.get("epoch"),
        }
        evs = report_cohorts([split], thresholds, ecfg_eval, out_dir / "reports", tracker,
                             header, ecfg.seed, gallery_splits=(ecfg.cohort_name,))  # fmt: skip
        status = "FINISHED"
        return {"evaluation": evs[ecfg.cohort_name], "mlflow_run_id": tracker.run_id,
                "tracking_uri": tracker.uri, "report_dir": str(out_dir / "reports")}  # fmt: skip
    finally:
        tracker.end(status)


def _register() -> str:
    from her2exp.config import register_configs
    from her2exp.distributed import register_resolvers

    register_configs()
    register_resolvers()
    return str(Path(__file__).resolve().parent.parent / "conf")


CONFIG_DIR = _register()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> float:
    try:
        out = evaluate_cohort(cfg)
    except ConfigError as exc:
        print(f"her2exp: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    ev = out["evaluation"]
    print(format_table(ev, f"{cfg.cohort_name} (frozen thresholds from the training run)"))
    if out["mlflow_run_id"]:
        print(f"her2exp: MLflow run {out['mlflow_run_id']} in {out['tracking_uri']}")
    print(f"her2exp: report in {out['report_dir']}")
    return float(ev.auc.auc)


if __name__ == "__main__":
    main()
