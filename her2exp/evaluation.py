"""The one evaluation path: scores -> metrics at frozen thresholds -> reports -> tracker.

`report_cohorts` turns scored splits into metrics at the thresholds frozen on validation,
reports and MLflow entries. The end-of-training test evaluation and `her2exp-eval` both call it,
so a run's test table and a later re-evaluation of the same checkpoint on the same data can never
disagree. `evaluate_cohort` is her2exp-eval's library part: it loads a trained run, scores a new
cohort or the run's own val/test split with the run's own settings (evaluation, AMP, stain
reference, TTA views) unless the eval command overrides them, with the temperature frozen in
best.pt always applied (`score`), and reports through `report_cohorts`.
(engine.score is the scoring pass alone; metrics.evaluate_split the metrics of one split.)
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from her2exp import checkpoint, metrics, reports, tracking
from her2exp.config import ConfigError
from her2exp.fileio import safe_name
from her2exp.mil.bags import attach_head, mil_name

if TYPE_CHECKING:
    from her2exp.data import RowView

log = logging.getLogger(__name__)


@dataclass
class ScoredSplit:
    """One cohort's HER2+ probabilities with the manifest rows they belong to, in order."""

    name: str
    rows: pd.DataFrame  # manifest rows (label, patient_id, ...) in scoring order
    probs: np.ndarray
    # uint8 (N, H, W, 3) for the error galleries: a RowView reads only the patches shown
    images: np.ndarray | RowView | None = None
    # The model's own probabilities where `probs` are temperature-scaled (the before/after
    # calibration report); None: `probs` are the model's own.
    uncalibrated: np.ndarray | None = None
    member_sd: np.ndarray | None = None  # an ensemble's per-patch sd across its members

    @property
    def labels(self) -> np.ndarray:
        return self.rows["label"].to_numpy()


def _ids(rows: pd.DataFrame, column: str) -> np.ndarray | None:
    return rows[column].astype(str).to_numpy() if column in rows else None


def thresholds_on_rows(
    ecfg: DictConfig, rows: pd.DataFrame, labels: np.ndarray, probs: np.ndarray
) -> dict[str, dict[str, float]]:
    """Operating points chosen at the tile, slide and patient level on scored `rows` (their
    slide and patient ids group the tiles, aggregated as `ecfg` says): a run's validation split
    (final.choose_thresholds) or an ensemble's pooled tables (ensemble.ensemble_thresholds)."""
    return metrics.operating_points_by_level(
        labels,
        probs,
        _ids(rows, "slide_id"),
        _ids(rows, "patient_id"),
        ecfg.target_sensitivity,
        ecfg.slide_aggregation,
        ecfg.patient_aggregation,
        ecfg.topk,
        ecfg.get("lcb_confidence", 0.95),
    )


def evaluate_scored(
    s: ScoredSplit, levels: dict[str, dict[str, float]], ecfg: DictConfig, seed: int
) -> metrics.SplitEvaluation:
    """metrics.evaluate_split of one scored split, each level at its own frozen thresholds."""
    return metrics.evaluate_split(
        s.labels,
        s.probs,
        levels["tile"],
        patient_ids=_ids(s.rows, "patient_id"),
        n_boot=ecfg.n_boot,
        seed=seed,
        patient_how=ecfg.patient_aggregation,
        slide_ids=_ids(s.rows, "slide_id"),
        slide_how=ecfg.slide_aggregation,
        topk=ecfg.topk,
        level_thresholds=levels,
        site_ids=_ids(s.rows, "site"),
    )


def level_table(
    level: str,
    agg: metrics.GroupScores,
    thresholds: dict[str, float],
    rows: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per slide or patient: its aggregate score and calls at that level's thresholds
    (a slide row also names its patient, from the tile `rows`)."""
    key = f"{level}_id"
    table = pd.DataFrame(
        {key: agg.ids, "label": agg.labels, "n_tiles": agg.n_tiles, "prob_her2_pos": agg.scores}
    )
    if level == "slide" and rows is not None and "patient_id" in rows:
        owner = rows.assign(slide_id=rows["slide_id"].astype(str))
        owner = owner.drop_duplicates("slide_id").set_index("slide_id")["patient_id"]
        table.insert(1, "patient_id", table[key].map(owner).to_numpy())
    for name, t in thresholds.items():
        table[f"called_her2_pos_{name}"] = (agg.scores >= t).astype(int)
    return table


def _write_predictions(
    report_dir: Path, s: ScoredSplit, ev: metrics.SplitEvaluation, tile: dict[str, float]
) -> list[Path]:
    """predictions_<split>.csv (tiles) and predictions_{slides,patients}_<split>.csv."""
    rows = s.rows.copy()
    rows["prob_her2_pos"] = s.probs
    if s.member_sd is not None:
        rows["member_sd"] = s.member_sd
    for name, t in tile.items():
        rows[f"called_her2_pos_{name}"] = (s.probs >= t).astype(int)
    name = safe_name(s.name)
    written = [
        reports.atomic_write_text(report_dir / f"predictions_{name}.csv", rows.to_csv(index=False))
    ]
    for level in ev.levels().values():
        table = level_table(level.level, level.scores, level.thresholds, s.rows)
        path = report_dir / f"predictions_{level.level}s_{name}.csv"
        written.append(reports.atomic_write_text(path, table.to_csv(index=False)))
    return written


def report_cohorts(
    splits: list[ScoredSplit],
    thresholds: dict[str, Any],
    ecfg: DictConfig,
    report_dir: Path,
    tracker: tracking.Tracker,
    header: dict[str, Any],
    seed: int,
    gallery_splits: tuple[str, ...] = ("test", "external"),
    calibration: dict[str, Any] | None = None,
    extra_reports: list[Path] | None = None,
    explainer: Any = None,
) -> dict[str, metrics.SplitEvaluation]:
    """Metrics at the frozen `thresholds` (keyed by level; a flat dict is the tile level) for
    every split -> reports -> MLflow (rank 0 only). `ecfg.decision_level` is the headline.
    `calibration`: the run's frozen one; its Brier and ECE before (`*_uncalibrated`) and after
    are reported for every split that kept its `uncalibrated` scores. `extra_reports`: files
    the caller wrote into `report_dir` (kept, uploaded with the rest). `explainer`
    (`explain.build`): the galleries drawn again under its maps when `ecfg.explain`."""
    levels = metrics.as_level_thresholds(thresholds)
    tile = levels["tile"]
    evaluations = {s.name: evaluate_scored(s, levels, ecfg, seed) for s in splits}
    before = {
        s.name: metrics.calibration(s.labels, s.uncalibrated)
        for s in splits
        if s.uncalibrated is not None
    }
    galleries = {
        s.name: (s.images, s.labels, s.probs, tile[ecfg.operating_point])
        for s in splits
        if s.name in gallery_splits and s.images is not None
    }
    header = {
        **header,
        "decision_level": ecfg.decision_level,
        "operating_point": ecfg.operating_point,
        "target_sensitivity": float(ecfg.target_sensitivity),
        "lcb_confidence": float(ecfg.get("lcb_confidence", 0.95)),
        "aggregation": {
            "slide": ecfg.slide_aggregation,
            "patient": ecfg.patient_aggregation,
            "topk": int(ecfg.topk),
        },
        "thresholds": levels,
        "tta": ecfg.get("tta", "none"),
        "calibration": {
            **(calibration or {"method": "none"}),
            "uncalibrated": {k: {"brier": c.brier, "ece": c.ece} for k, c in before.items()},
        },
    }
    explainer = explainer if ecfg.get("explain", False) else None
    written = reports.write_clinical_report(
        report_dir,
        evaluations,
        galleries,
        header,
        max_gallery=ecfg.gallery_max,
        before=before,
        figures=ecfg.get("figures", True),
        explainer=explainer,
    )
    for s in splits:
        written += _write_predictions(report_dir, s, evaluations[s.name], tile)
    written += list(extra_reports or [])
    remove_stale_reports(report_dir, written)
    flat: dict[str, float] = {}
    for name, ev in evaluations.items():
        prefix = f"{'final_val' if name == 'val' else name}_"
        flat.update(ev.as_flat_dict(prefix))
        if name in before:
            flat[f"{prefix}brier_uncalibrated"] = before[name].brier
            flat[f"{prefix}ece_uncalibrated"] = before[name].ece
    if (calibration or {}).get("method") == "temperature":
        flat["calibration_temperature"] = float(calibration["temperature"])
    for level, values in levels.items():
        infix = "" if level == "tile" else f"{level}_"
        flat.update({f"threshold_{infix}{k}_val": v for k, v in values.items()})
    tracker.log_metrics(flat)
    tracker.log_artifact(report_dir, "reports")
    return evaluations


#: Report files named after a split or cohort: an earlier evaluation into the same folder (another
#: cohort_name or split) leaves its own, which this one must not show or upload as its own.
PER_SPLIT_REPORTS = (
    "predictions_*.csv",
    "confusion_*.png",
    "roc_*.png",
    "false_negatives_*.png",
    "false_positives_*.png",
    "most_uncertain_*.png",
    "attention_*.csv",
)


def remove_stale_reports(report_dir: Path, written: list[Path]) -> list[Path]:
    """Remove the per-split report files in `report_dir` that this evaluation did not write."""
    keep = {Path(p).resolve() for p in written}
    stale = [
        p
        for pattern in PER_SPLIT_REPORTS
        for p in sorted(Path(report_dir).glob(pattern))
        if p.resolve() not in keep
    ]
    for path in stale:
        path.unlink(missing_ok=True)
        log.info("removed %s: an earlier evaluation's, not this one's", path)
    return stale


def format_table(ev: metrics.SplitEvaluation, title: str, decision_level: str = "tile") -> str:
    """The console version of summary.md's tables: each level, each frozen operating point with
    its CIs; the decision level is marked."""

    def ci(v: float, lo: float, hi: float) -> str:
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = [f"{title}:"]
    units = {"tile": "tiles", "slide": "slides", "patient": "patients"}
    entries = [("tile", ev.n, ev.n_pos, ev.auc, ev.reports)]
    entries += [(lv.level, lv.n, lv.n_pos, lv.auc, lv.reports) for lv in ev.levels().values()]
    for level, n, n_pos, a, reports_ in entries:
        mark = " (decision level)" if level == decision_level else ""
        lines.append(
            f" {level} level{mark}: n={n} {units[level]} ({n_pos} HER2+), "
            f"AUC {ci(a.auc, a.low, a.high)} (DeLong 95% CI)"
        )
        lines += _table_rows(reports_, ci)
    for site in ev.sites.values():
        s = site.evaluation
        cells = [
            f"{name} sens {r.sensitivity:.3f} spec {r.specificity:.3f}"
            for name, r in s.level_reports(decision_level).items()
        ]
        at_level = s.levels().get(decision_level)
        area = s.auc if at_level is None else at_level.auc
        lines.append(
            f" site {site.site} ({decision_level} level): AUC {ci(area.auc, area.low, area.high)}"
            f"  {'  '.join(cells)}" + (f"  ({site.note})" if site.note else "")
        )
    return "\n".join(lines)


def _table_rows(reports_: dict[str, metrics.BinaryReport], ci: Any) -> list[str]:
    lines = []
    for name, r in reports_.items():
        sens = ci(r.sensitivity, r.sensitivity_low, r.sensitivity_high)
        spec = ci(r.specificity, r.specificity_low, r.specificity_high)
        lines.append(
            f"  {name:>7} t={r.threshold:.4f}  sensitivity {sens}  specificity {spec}"
            f"  PPV {r.precision:.3f}  NPV {r.npv:.3f}  TP/FN/FP/TN {r.tp}/{r.fn}/{r.fp}/{r.tn}"
        )
    return lines


# -- loading a trained run -----------------------------------------------------------------------
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
        _, local = tracking.download_from_run(
            uri,
            run_id,
            "checkpoints/best.pt",
            tmp,
            "not a training run, or trained with tracking.log_checkpoint=false: give "
            "checkpoint=<best.pt>",
        )
        return load_checkpoint(local, f"runs:/{run_id}/checkpoints/best.pt")


def load_source(source: Any) -> tuple[dict[str, Any], str | None]:
    """best.pt of a run (`run_id` in `tracking.uri`) or a `checkpoint` path: (state, run id)."""
    from her2exp.cli.schemas import check_one_source

    check_one_source(source)
    if source.checkpoint:
        if not Path(source.checkpoint).is_file():
            raise ConfigError(f"checkpoint={source.checkpoint}: no such file")
        return load_checkpoint(source.checkpoint), None
    return _download_best(source.run_id, source.tracking.uri), source.run_id


def resolve_evaluation(run_evaluation: Any, overrides: Any) -> DictConfig:
    """The run's own evaluation settings (schema defaults for keys an old run lacks), then the
    non-null values the eval command line gave; validated."""
    from her2exp.config import EvaluationConfig, validate_evaluation

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
    eval override that differs from it is refused; another TTA setting than the run's is
    allowed but warned about (its thresholds were chosen on the run's own views)."""
    frozen = run.calibration["method"]
    if evaluation.calibration != frozen:
        raise ConfigError(
            f"evaluation.calibration={evaluation.calibration}: {run.source} froze its "
            f"thresholds on {frozen} calibrated scores (a temperature is fitted on validation "
            f"in training only); leave it unset (or give {frozen})"
        )
    if evaluation.tta != run.tta:
        log.warning(
            "evaluation.tta=%s: %s chose its thresholds on tta=%s scores; they are applied to "
            "tta=%s scores here",
            evaluation.tta,
            run.source,
            run.tta,
            evaluation.tta,
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
    from her2exp import models

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
    from her2exp.stain import pipeline as stain_pipeline

    stain_cfg = run.cfg.get("stain")
    if stain_cfg is None:
        return None  # trained before stain handling existed
    try:
        return stain_pipeline.from_state(stain_cfg, run.state.get("stain"), seed)
    except ValueError as exc:
        raise ConfigError(f"{run.source}: {exc}") from exc


@dataclass
class Scorer:
    """The run's model with the run's input pipeline, AMP and stain reference."""

    model: torch.nn.Module
    device: torch.device
    preprocess: Any  # engine.Preprocess: the one input path
    autocast_dtype: torch.dtype | None
    stain: Any  # stain pipeline run in the loader workers, or None
    amp: str  # the trainer.amp setting used
    tta: str = "none"  # the views scored (engine.tta_views)
    calibration: dict[str, Any] | None = None  # frozen on val: applied to every score


def build_scorer(run: TrainedRun, amp: str | None, seed: int, tta: str | None = None) -> Scorer:
    """Model + engine.Preprocess as training scored: `amp` null means the run's own trainer.amp, which
    resolves as in training (fp32 on the CPU, bf16/fp16 autocast on CUDA); `tta` null the
    run's own evaluation.tta; the run's frozen calibration always."""
    from her2exp.engine import Preprocess
    from her2exp.trainer import resolve_amp

    cfg = run.cfg
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stain = run_stain(run, seed)
    model = load_model(run, device)
    amp = amp or cfg.trainer.get("amp", "off")
    dtype, _ = resolve_amp(amp, device)
    on_device = stain is not None and bool(cfg.stain.get("on_device", False))
    preprocess = Preprocess(
        device,
        tuple(cfg.data.mean),
        tuple(cfg.data.std),
        channels_last=bool(cfg.model.get("channels_last", False)),
        stain=stain.to(device) if on_device else None,  # the run's own fitted reference
    )
    stain = None if on_device else stain
    return Scorer(model, device, preprocess, dtype, stain, amp, tta or run.tta, run.calibration)


def score(scorer: Scorer, bundle: Any, split: str | None, data_cfg: DictConfig, seed: int) -> Any:
    """engine.score over one split of `bundle` (None: all of it), stain placed as in training,
    the scorer's TTA views averaged and its frozen calibration applied (`.uncalibrated` keeps
    the model's own probabilities)."""
    from her2exp import data
    from her2exp.engine import score as score_pass
    from her2exp.stain.pipeline import StainCollate

    dataset = data.make_dataset(bundle, split, data_cfg, seed)
    collate = None if scorer.stain is None else StainCollate(scorer.stain, False, dataset)
    loader = data.eval_loader(dataset, data_cfg, scorer.device, collate_fn=collate)
    scores = score_pass(
        scorer.model, loader, scorer.preprocess, scorer.autocast_dtype, tta=scorer.tta
    )
    if (scorer.calibration or {}).get("method", "none") != "none":
        scores.uncalibrated = scores.probs
        scores.probs = metrics.apply_calibration(scores.probs, scorer.calibration)
    return scores


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
    from her2exp import data

    try:
        return data.build(run.cfg.data, run.cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"{why}: {one_line(exc)}") from exc


def load_cohort(ecfg: DictConfig, run: TrainedRun) -> Cohort:
    """A new cohort described by the eval config's `data`, with the model's input contract; or
    (`split=val|test`) the run's own split, rebuilt from its stored config and seed exactly as
    training built it and scored with the training seed, so its test table is reproduced.
    Built before the model, so a bad data folder is refused before any work."""
    from her2exp import data

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
    scores = score(scorer, bundle, cohort.split, cohort.data_cfg, cohort.seed)
    if cohort.split is None:
        idx = np.arange(len(bundle.manifest))
        rows = bundle.manifest.reset_index(drop=True)
    else:
        idx = bundle.indices(cohort.split)
        rows = bundle.manifest.iloc[idx].reset_index(names="row")
    from her2exp.data import RowView

    view = RowView(bundle.patches, idx)
    return ScoredSplit(cohort.name, rows, scores.probs, view, scores.uncalibrated)


def prepare_evaluation(ecfg: DictConfig) -> tuple[TrainedRun, DictConfig, Cohort]:
    """Everything her2exp-eval can refuse, before it builds a model or scores a patch: the
    command's values, the tracking store (a look-up never creates one), the checkpoint, the
    evaluation settings (the run's, merged with the command's) and the cohort's data."""
    from her2exp.cli.schemas import check_eval

    check_eval(ecfg)
    if ecfg.tracking.backend == "mlflow":
        tracking.require_store(ecfg.tracking.uri, lookup=bool(ecfg.run_id))
    run = load_run(ecfg)
    evaluation = resolve_evaluation(run.cfg.get("evaluation"), ecfg.evaluation)
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


def evaluate_cohort(ecfg: DictConfig) -> dict[str, Any]:
    """Score a trained run at its frozen thresholds (a new cohort, or its own split with
    `split=val|test`); one MLflow run linked to the source run by `source_run_id`, connected
    before scoring and opened only once the scores exist. `sweep_run_id`: the sweep's members
    as one ensemble (her2exp/ensemble.py)."""
    if ecfg.get("sweep_run_id"):
        from her2exp.cli.schemas import check_eval
        from her2exp.ensemble import evaluate_sweep

        check_eval(ecfg)
        return evaluate_sweep(ecfg)
    run, evaluation, cohort = prepare_evaluation(ecfg)
    scorer = build_scorer(run, ecfg.trainer.amp, ecfg.seed, evaluation.tta)
    tracker = tracking.build(ecfg.tracking, True)
    extra = None
    if mil_name(run.cfg) != "none":  # bags: one row per bag, attention files beside
        from her2exp.mil.report import score_cohort_bags

        split, extra = score_cohort_bags(
            scorer, cohort, run, evaluation.operating_point, evaluation.get("figures", True)
        )
    else:
        split = score_cohort(scorer, cohort)
    bundle = cohort.bundle
    source = ecfg.checkpoint or f"runs:/{run.source_run}/checkpoints/best.pt"
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
    from her2exp import model_card

    card = model_card.eval_card(run, ecfg)  # the run's card with this cohort added
    record = EvalRecord(ecfg, tags, header, scorer.device, extra, after_reports=card)
    if evaluation.get("explain", False) and extra is None:  # bags have no patch galleries
        from her2exp import explain

        # Eval scores pixels through the whole model, a cached-feature run's too.
        record.explainer = explain.build(scorer.model, scorer.preprocess, False, scorer.stain)
    return record_eval(tracker, record, split, run.levels, evaluation, cohort.seed, run.calibration)


@dataclass
class EvalRecord:
    """What an eval's MLflow run is opened with: the config logged as params, its tags and the
    summary.md header (git and environment tags are added by `record_eval`)."""

    logged: DictConfig
    tags: dict[str, Any]
    header: dict[str, Any]
    device: torch.device
    #: Report files drawn into the report folder before report_cohorts (kept, uploaded).
    extra_reports: Callable[[Path], list[Path]] | None = None
    #: Files drawn after it from what it wrote (the model card), uploaded under reports/.
    after_reports: Callable[[Path], list[Path]] | None = None
    explainer: Any = None  # explain.Explainer of the scored model (evaluation.explain)


def record_eval(
    tracker: tracking.Tracker,
    record: EvalRecord,
    split: ScoredSplit,
    levels: dict[str, dict[str, float]],
    evaluation: DictConfig,
    seed: int,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One eval MLflow run, opened only once the scores exist: the audit tags, report_cohorts
    at the frozen `levels`, FINISHED or FAILED. Shared by a run's eval and an ensemble's."""
    status = "FAILED"
    try:
        git = tracking.git_info()
        tracker.start(
            record.logged, {**record.tags, **git, **tracking.environment_tags(record.device)}
        )
        report_dir = Path(record.logged.output_dir) / "reports"
        report_dir.mkdir(parents=True, exist_ok=True)
        extra = record.extra_reports(report_dir) if record.extra_reports else []
        header = {**record.header, "git_commit": git["git_commit"]}
        evs = report_cohorts(
            [split],
            levels,
            evaluation,
            report_dir,
            tracker,
            header,
            seed,
            gallery_splits=(split.name,),
            calibration=calibration,
            extra_reports=extra,
            explainer=record.explainer,
        )
        for path in record.after_reports(report_dir) if record.after_reports else []:
            tracker.log_artifact(path, "reports")
        status = "FINISHED"
        return {
            "evaluation": evs[split.name],
            "cohort": split.name,
            "settings": evaluation,
            "mlflow_run_id": tracker.run_id,
            "tracking_uri": tracker.uri,
            "report_dir": str(report_dir),
        }
    finally:
        tracker.end(status)
