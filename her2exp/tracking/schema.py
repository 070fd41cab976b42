"""What a her2exp run shows in MLflow, declared once: the metrics kept, the tags, the artifacts.

Why one module: a reviewer compares runs in MLflow's model-training view, where every metric key
is a chart. A run used to log ~920 keys (every level x operating point x statistic x site), most
of them one bar each. The curation rule lives here (`headline`): per-epoch curves, and for each
split the tile AUC, the decision level's AUC and its frozen operating points with their CIs;
every number the run computes goes, under its old key, into the `reports/metrics.csv` table.
tests/tracking/test_schema.py checks that a real run logs nothing this schema does not describe,
that the keys her2exp's readers (promote, compare, the sweep callback) read are logged;
tests/docs/test_reference.py that docs/reference/mlflow.md is `reference_markdown()`. No MLflow
import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from her2exp.runtime.rundir import CONFIG_RESOLVED  # the run directory's names live there

#: The experiment tag MLflow's UI reads to pick its view; `custom_model_development` is the
#: model-training one (runs, curves), `genai_development` the GenAI one (traces, prompts).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

#: The full table of every evaluation's numbers, an artifact beside the run's other reports.
METRICS_TABLE = "metrics.csv"


@dataclass(frozen=True)
class Name:
    """A metric, tag or artifact name (with `{placeholders}`) and what it means to a reader."""

    pattern: str
    meaning: str

    def regex(self, fixed: Mapping[str, Iterable[str]] | None = None) -> re.Pattern[str]:
        """The names this pattern stands for: placeholders filled by `PLACEHOLDERS`' regexes, or
        by exactly the values `fixed` gives (a run's own splits and decision level)."""
        fixed = fixed or {}
        parts = re.split(r"\{(\w+)\}", self.pattern.rstrip("/"))
        body = "".join(
            (_alternatives(fixed[p]) if p in fixed else PLACEHOLDERS[p].regex)
            if i % 2
            else re.escape(p)
            for i, p in enumerate(parts)
        )
        return re.compile(body)

    def matches(self, name: str, fixed: Mapping[str, Iterable[str]] | None = None) -> bool:
        """Whether `name` is one this entry describes (a folder entry, `x/`: x and below it)."""
        if self.pattern.endswith("/"):  # folders have no placeholders
            return name == self.pattern[:-1] or name.startswith(self.pattern)
        return self.regex(fixed).fullmatch(name) is not None


def _alternatives(values: Iterable[str]) -> str:
    return "(?:" + "|".join(re.escape(v) for v in values) + ")"


@dataclass(frozen=True)
class Placeholder:
    """A `{name}` in a pattern: the regex it stands for and what it is."""

    regex: str
    meaning: str


PLACEHOLDERS: dict[str, Placeholder] = {
    "split": Placeholder(
        r"[A-Za-z0-9][A-Za-z0-9._-]*?",
        "`test`, `final_val` (validation scored at the frozen thresholds) or her2exp-eval's "
        "cohort name",
    ),
    "level": Placeholder(
        r"(?:slide_|patient_)?",
        "the run's `evaluation.decision_level` as a key part: empty for `tile`, else `slide_` "
        "or `patient_`",
    ),
    "op": Placeholder(
        r"(?:youden|p50|sens\d+(?:_lcb)?)",
        "an operating point frozen on validation: `youden`, `p50`, `sens{N}`, `sens{N}_lcb`",
    ),
    "part": Placeholder(r"(?:train|val|test)", "a split of the training data"),
    "format": Placeholder(r"(?:onnx|torchscript)", "her2exp-export's format"),
    "name": Placeholder(r"[A-Za-z0-9._-]+", "a name of that family (see its meaning)"),
}

#: Logged once per epoch (step = epoch): the curves a reviewer compares across runs.
EPOCH_METRICS = (
    Name("train_loss", "mean training loss of the epoch"),
    Name("val_loss", "validation loss, one view"),
    Name("val_auc", "validation tile AUC: the best epoch is chosen on it"),
    Name("val_sensitivity", "validation sensitivity at that epoch's Youden threshold"),
    Name("val_specificity", "validation specificity at that epoch's Youden threshold"),
    Name("val_precision", "validation precision at that epoch's Youden threshold"),
    Name("val_f1", "validation F1 at that epoch's Youden threshold"),
    Name("val_youden_threshold", "that epoch's Youden threshold on validation"),
    Name("lr", "the head's learning rate"),
    Name("epoch_seconds", "wall time of the training epoch"),
    Name("images_per_second", "training throughput"),
    Name("nonfinite_steps_skipped", "steps skipped for a non-finite loss so far (also final)"),
)

#: Per split, at the frozen thresholds (`headline` picks them out of the full evaluation).
SPLIT_METRICS = (
    Name("{split}_auc", "tile AUC (her2exp-compare's test_auc column)"),
    Name("{split}_auc_low", "its 95% DeLong CI, lower bound"),
    Name("{split}_auc_high", "its 95% DeLong CI, upper bound"),
    Name("{split}_{level}auc", "AUC at the decision level"),
    Name("{split}_{level}auc_low", "its 95% DeLong CI, lower bound"),
    Name("{split}_{level}auc_high", "its 95% DeLong CI, upper bound"),
    Name("{split}_{level}{op}_sensitivity", "sensitivity at the decision level and `op`"),
    Name("{split}_{level}{op}_sensitivity_low", "its 95% Wilson CI, lower bound"),
    Name("{split}_{level}{op}_sensitivity_high", "its 95% Wilson CI, upper bound"),
    Name("{split}_{level}{op}_specificity", "specificity at the decision level and `op`"),
    Name("{split}_{level}{op}_specificity_low", "its 95% Wilson CI, lower bound"),
    Name("{split}_{level}{op}_specificity_high", "its 95% Wilson CI, upper bound"),
    Name("{split}_brier", "tile Brier score of the (calibrated) probabilities"),
    Name("{split}_ece", "tile expected calibration error"),
)

#: Once per run: what the run chose and froze, and how it went.
RUN_METRICS = (
    Name("best_epoch", "the epoch whose weights are best.pt"),
    Name("best_val_auc", "its validation AUC (compare's val_auc, the sweep's best child)"),
    Name("test_loss", "test loss of the best weights"),
    Name("threshold_youden_val", "the tile Youden threshold chosen on validation"),
    Name("threshold_{level}{op}_val", "each frozen threshold of the decision level"),
    Name("youden_threshold_drift", "final Youden threshold minus the best epoch's one-view one"),
    Name("calibration_temperature", "the frozen temperature (`evaluation.calibration`)"),
    Name("features_computed", "embeddings computed (model.cache_features)"),
    Name("features_reused", "embeddings read from the feature cache"),
    Name("feature_seconds", "time spent embedding"),
    Name("stain_skipped_{part}", "patches stain normalisation left unchanged"),
    Name("{split}_member_sd_mean", "an ensemble's mean per-patch sd across its members"),
    Name("export_{format}_max_abs_diff", "her2exp-export's largest difference to the Scorer"),
)

#: A multirun's parent run (`evaluation.sweep_callback`).
SWEEP_METRICS = (
    Name("n_jobs", "jobs in the sweep"),
    Name("n_finished", "jobs that finished"),
    Name("cv_{name}", "a CV sweep's pooled out-of-fold results (cv/cv_summary.md)"),
    Name("repeat_{name}", "a repeat sweep's mean and sd across seeds (cv/repeat_summary.md)"),
    Name("leaderboard_{name}", "a probe leaderboard's rows (cv/)"),
)

RUN_TAGS = (
    Name("git_commit", "the commit the run's code came from"),
    Name("git_branch", "its branch"),
    Name("git_dirty", "uncommitted changes (their diff: audit/git_diff.patch)"),
    Name("{name}_version", "python, torch, timm, hydra, mlflow, cuda, cudnn versions"),
    Name("hostname", "the machine"),
    Name("platform", "its operating system"),
    Name("device", "the torch device"),
    Name("device_name", "the accelerator's name"),
    Name("cpu_count", "CPU cores seen"),
    Name("cuda_device_count", "GPUs seen"),
    Name("cudnn_deterministic", "cuDNN's deterministic flag"),
    Name("torch_deterministic_algorithms", "torch's deterministic-algorithms flag"),
    Name("torch_threads", "torch's intra-op threads"),
    Name("seed", "the run's seed"),
    Name("data_seed", "the data generation seed"),
    Name("split_seed", "the split seed"),
    Name("overrides", "the command line's Hydra overrides"),
    Name("command", "the whole command line"),
    Name("world_size", "processes of the run"),
    Name("backend", "the process group's backend"),
    Name("deterministic", "trainer.deterministic"),
    Name("data_fingerprint", "the data's fingerprint (same data, same value)"),
    Name("data.{part}", "HER2+ / HER2- counts of a split"),
    Name("model_name", "the backbone"),
    Name("task_name", "train, eval, ..."),
    Name("run_dir", "the run directory"),
    Name("weights.{name}", "where the backbone's weights came from"),
    Name("user.{name}", "the user's `tags.<name>=` (rerun_of: her2exp-rerun's source)"),
    Name("attempts", "starts of a continued run"),
    Name("resumed_from", "the checkpoint a resume started from"),
    Name("resume_forced_changes", "what differed under trainer.resume_force"),
    Name("torchelastic_restart_count", "torchrun's restarts"),
    Name("interrupted_after_epoch", "a stopped run's last epoch"),
    Name("resume_with", "its last.pt"),
    Name("resume_command", "the command that resumes it"),
    Name("stop_signal", "the signal that stopped it"),
    Name("error", "the exception that failed it"),
    Name("tracking_errors", "tracking calls that failed"),
    Name("tracking_replayed_calls", "tracking calls replayed after the server came back"),
    Name("tracking_fallback_from", "the server a local store stood in for"),
    Name("features.{name}", "the feature cache's key and folder"),
    Name("stain.reference.{name}", "the fitted stain reference"),
    Name("cv.{name}", "a CV child's fold, folds and grouping"),
    Name("sweep.{name}", "a sweep job's number, overrides, folder; the parent's kind, warnings"),
    Name("repeat.split_seed_varies", "a repeat sweep whose split seed varied"),
    Name("leaderboard.best", "a probe leaderboard's best row"),
    Name("best_child_run_id", "a sweep parent's best child"),
    Name("export.{format}.{name}", "her2exp-export's contract of the exported file"),
    Name("source_run_id", "an eval's training run"),
    Name("source_checkpoint", "an eval's checkpoint"),
    Name("source_sweep_run_id", "an ensemble eval's sweep parent"),
    Name("ensemble_{name}", "an ensemble's members, kind and thresholds"),
    Name("cohort", "an eval's cohort name"),
    Name("eval_split", "an eval's split of the training data"),
    Name("amp", "an eval's autocast dtype"),
    Name("tta", "an eval's test-time augmentation"),
    Name("mlflow.{name}", "MLflow's own (run name, parent run, source commit, user, ...)"),
)

EXPERIMENT_TAGS = (Name(EXPERIMENT_KIND_TAG, f"`{EXPERIMENT_KIND}`: the model-training view"),)

#: The run's top-level artifacts (the logged model is MLflow's logged model, not one of these).
ARTIFACTS = (
    Name("reports/", "the clinical report: summary.md, best.json, figures, predictions"),
    Name(
        f"reports/{METRICS_TABLE}",
        "every number of the evaluation, one row each: metric (its former MLflow key), split, "
        "level, site, operating_point, statistic, value",
    ),
    Name("reports/model_card.md", "the model card (model_card.json: its facts)"),
    Name("checkpoints/", "best.pt: weights, frozen thresholds and calibration"),
    Name(CONFIG_RESOLVED, "the resolved config the run trained with"),
    Name("hydra/", "Hydra's config, overrides and runtime config"),
    Name("audit/", "pip freeze and, on a dirty tree, the git diff"),
    Name("data/", "files left out by data.on_bad_file=skip"),
    Name("stain/", "the fitted stain reference"),
    Name("export/", "her2exp-export's model.onnx or model.ts"),
    Name("cv/", "a sweep parent's summaries and pooled predictions"),
)

SECTIONS = (
    ("Per-epoch metrics", "Logged once per epoch (the step is the epoch).", EPOCH_METRICS),
    (
        "Headline metrics of a split",
        "Logged per split at the frozen thresholds; the other levels, operating points, "
        "statistics and sites are rows of `reports/metrics.csv`.",
        SPLIT_METRICS,
    ),
    ("Run metrics", "Logged once per run.", RUN_METRICS),
    ("Sweep parent metrics", "Logged on a multirun's parent run.", SWEEP_METRICS),
    ("Run tags", "Set on every run (some only when they apply).", RUN_TAGS),
    ("Experiment tags", "Set on the experiment when her2exp creates or opens it.", EXPERIMENT_TAGS),
    ("Artifacts", "The run's artifacts, by top-level folder or file.", ARTIFACTS),
)

METRICS = EPOCH_METRICS + SPLIT_METRICS + RUN_METRICS + SWEEP_METRICS


def level_infix(level: str) -> str:
    """A level as a key part: '' for tile (the keys of old), else 'slide_' / 'patient_'."""
    return "" if level == "tile" else f"{level}_"


def headline(
    flat: Mapping[str, float], prefixes: Iterable[str], level: str, ops: Iterable[str]
) -> dict[str, float]:
    """The metrics of an evaluation that MLflow gets: `SPLIT_METRICS` for each split prefix
    (`test_`, `final_val_`, a cohort's) at `level` and its frozen `ops`, and the frozen
    thresholds of that level; the rest of `flat` goes to the table only."""
    infix, ops = level_infix(level), list(ops)
    keys = {f"threshold_{infix}{op}_val" for op in ops} | {"calibration_temperature"}
    for prefix in prefixes:
        split = prefix[:-1]
        for entry in SPLIT_METRICS:  # no frozen point at the level (an old run): its AUC
            if "{op}" not in entry.pattern:
                keys.add(entry.pattern.format(split=split, level=infix))
            keys |= {entry.pattern.format(split=split, level=infix, op=op) for op in ops}
    return {k: v for k, v in flat.items() if k in keys}


def undescribed(names: Iterable[str], entries: Iterable[Name], **fixed: Iterable[str]) -> list[str]:
    """The names no entry describes: what a run logged that this schema does not say. `fixed`:
    a placeholder's only values (`split=("test", "final_val"), level=("",)` for a run whose
    decision level is the tile: a slide-level or per-site key is then undescribed)."""
    entries = list(entries)
    return sorted(n for n in names if not any(e.matches(n, fixed) for e in entries))


def _table(entries: Iterable[Name]) -> list[str]:
    lines = ["| name | meaning |", "|---|---|"]
    lines += [f"| `{e.pattern}` | {e.meaning} |" for e in entries]
    return lines


def reference_markdown() -> str:
    """This schema as the page docs/reference/mlflow.md (Markdown for MyST)."""
    lines = [
        "# What a run logs to MLflow",
        "",
        "Generated from `her2exp/tracking/schema.py` by `make reference`; do not edit by hand.",
        "",
        f"Experiments carry `{EXPERIMENT_KIND_TAG}={EXPERIMENT_KIND}`, so MLflow's UI opens",
        "them in its model-training view. A run's metrics are curated to what a reviewer",
        "compares across runs: the per-epoch curves and, for each split, the tile AUC and the",
        "decision level's AUC and frozen operating points with their confidence intervals.",
        "Every other number (each level, operating point, statistic and site) is a row of the",
        f"artifact `reports/{METRICS_TABLE}`, under the metric key it had before.",
        "",
        "## Placeholders",
        "",
        "| placeholder | stands for |",
        "|---|---|",
    ]
    lines += [f"| `{{{k}}}` | {p.meaning} |" for k, p in PLACEHOLDERS.items()]
    for title, intro, entries in SECTIONS:
        lines += ["", f"## {title}", "", intro, "", *_table(entries)]
    return "\n".join(lines) + "\n"
