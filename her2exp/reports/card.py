"""A model card per run: `reports/model_card.md`, what a reader needs before using the model.

Written by final_evaluation (rank 0) just after `report_cohorts`, from what the run already holds:
`best.json` (metrics with CIs at the frozen thresholds, per level and per site, calibration, the
checklist, git), the resolved config (the recipe) and the data bundle (counts per site and
split). Nothing is recomputed. The facts are kept beside the card as `model_card.json`, so
`her2exp-eval` of the run re-renders the card into its own report folder with the external
cohort's results added (`write_eval_card`) and logs it to its eval run; the training run's own
card is never rewritten. Known limits are derived from the run's own numbers (positives on
validation against what the promised sensitivity needs, one site, test sensitivity below the
target, failed checklist items, a dirty checkout, synthetic data).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from her2exp.core.errors import ConfigError
from her2exp.core.fileio import atomic_write_text
from her2exp.metrics import positives_needed
from her2exp.reports.best import RunSummary
from her2exp.runtime.rundir import ARTIFACTS, BEST_JSON, RunDir, artifact

log = logging.getLogger("her2exp")

CARD = "model_card.md"
FACTS = "model_card.json"
LEVELS = ("tile", "slide", "patient")

INTENDED_USE = (
    "Research use only: a patch classifier of HER2 status (HER2+ vs HER2-) on IHC or H&E "
    "patches prepared as this run's data were, for studies of computational pathology methods."
)
NOT_FOR = (
    "Not a medical device and not for diagnosis or treatment decisions: its calls are not a "
    "substitute for HER2 scoring by a pathologist (ASCO/CAP) or for ISH. Not validated on "
    "cohorts, scanners, stains or sites other than those listed under Data."
)


# -- facts ---------------------------------------------------------------------------------------
def data_counts(manifest: Any) -> list[dict[str, Any]]:
    """One row per (split, site): patients, slides, patches and how many of each are HER2+."""
    m = manifest.assign(site=manifest["site"] if "site" in manifest else "(none)")
    if "patient_id" not in m:  # each patch its own patient (a folder without patient_regex)
        m = m.assign(patient_id=range(len(m)))
    rows = []
    for (split, site), part in m.groupby(["split", "site"], sort=True):
        pos = part[part["label"] == 1]
        row = {"split": str(split), "site": str(site)}
        row |= {"patients": int(part["patient_id"].nunique())}
        row |= {"her2_pos_patients": int(pos["patient_id"].nunique())}
        if "slide_id" in part:
            row |= {"slides": int(part["slide_id"].nunique())}
        row |= {"patches": len(part), "her2_pos_patches": len(pos)}
        rows.append(row)
    return rows


def _trim(split: dict[str, Any]) -> dict[str, Any]:
    """A best.json split without its curves: n, AUC, the reports at each frozen threshold, per
    level and per site, and the calibration's Brier and ECE."""
    out = {k: split.get(k) for k in ("n", "n_pos", "auc", "reports")}
    cal = split.get("calibration") or {}
    out["calibration"] = {k: cal.get(k) for k in ("brier", "ece")}
    for level in ("slide", "patient"):
        lv = split.get(level)
        out[level] = (
            None if lv is None else {k: lv.get(k) for k in ("how", "n", "n_pos", "auc", "reports")}
        )
    out["sites"] = {
        name: {k: s.get(k) for k in ("note", "n", "n_pos", "auc", "reports", "slide", "patient")}
        for name, s in (split.get("sites") or {}).items()
    }
    return out


def recipe(cfg: DictConfig) -> dict[str, Any]:
    """How the model was trained, from the resolved config."""
    m, t, lo, st, d = cfg.model, cfg.trainer, cfg.loss, cfg.stain, cfg.data
    weights = (
        m.get("weights")
        or m.get("hub_id")
        or ("timm pretrained" if m.pretrained else "random init")
    )
    mil = cfg.get("mil")
    bags = "none" if mil is None or mil.name == "none" else f"{mil.name} over {d.get('bag_by')}s"
    return {
        "model": m.name,
        "weights": str(weights),
        "head": m.get("head"),
        "MIL head (bags)": bags,
        "finetune": m.get("finetune"),
        "cached features": bool(m.get("cache_features", False)),
        "epochs": f"{int(t.epochs)} (early stop patience {t.get('early_stop_patience')})",
        "optimizer": f"AdamW, lr {float(t.lr):g}, weight decay {float(t.weight_decay):g}, "
        f"warmup {t.get('warmup_epochs')} epochs, cosine to {t.get('min_lr_ratio')} x lr",
        "processes": int(t.get("nproc_per_node", 1)),
        "batch size": int(d.batch_size),
        "loss": lo.name + ("" if lo.name != "focal" else f" (gamma {lo.gamma})"),
        "class weights": bool(lo.get("use_class_weights", False)),
        "stain": st.name,
        "augmentation": "D4 flips/rotations" if d.augment else "none",
        "image size": int(d.image_size),
        "mean / std": f"{list(d.mean)} / {list(d.std)}",
        "amp": t.get("amp"),
        "seed": int(cfg.seed),
        "split seed": int(_or(d.get("split_seed"), cfg.seed)),  # null: the run's seed
        "data seed": int(_or(d.get("data_seed"), cfg.seed)),
    }


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _decision_report(split: dict[str, Any] | None, level: str, op: str) -> dict[str, Any] | None:
    """A split's report at the decision level's operating point (None where it was not frozen)."""
    if split is None:
        return None
    at = split if level == "tile" else split.get(level)
    return None if at is None else (at.get("reports") or {}).get(op)


def known_limits(facts: dict[str, Any], cohorts: dict[str, Any] | None = None) -> list[str]:
    """What the card must warn about, each derived from the run's own numbers (and those of the
    external `cohorts` the card shows)."""
    e, limits = facts["evaluation"], []
    target, confidence = float(e["target_sensitivity"]), float(e["lcb_confidence"])
    needed = positives_needed(target, confidence)
    val, test = facts["results"].get("val"), facts["results"].get("test")
    val_pos = (val or {}).get("patient") or {}
    if val_pos.get("n_pos") is not None and val_pos["n_pos"] < needed:
        limits.append(
            f"Validation holds {val_pos['n_pos']} HER2+ patients; a {confidence:.0%} lower bound "
            f"of {target:g} on sensitivity needs at least {needed} HER2+ with none missed: "
            f"`sens{round(target * 100)}_lcb` is not a promise here (it falls back to catching "
            "every validation positive)."
        )
    sites = sorted({r["site"] for r in facts["data"]["counts"] if r["split"] == "train"})
    if len(sites) == 1:
        limits.append(
            f"Trained on one site ({sites[0]}): nothing shows it generalises to another "
            "laboratory's staining or scanner."
        )
    for name, s in ((test or {}).get("sites") or {}).items():
        if s.get("note"):
            limits.append(f"Test site {name}: {s['note']}.")
    for name, split in {"test": test, **(cohorts or {})}.items():
        limits += _sensitivity_limit(name, split, e)
    failed = [c["item"] for c in facts.get("checklist", []) if c.get("status") == "FAIL"]
    if cohorts:
        failed = [f for f in failed if not f.startswith("External cohort")]
    else:
        limits.append("No external cohort has been evaluated.")
    if failed:
        limits.append("Checklist items failed: " + "; ".join(failed) + ".")
    if str(facts["git"].get("dirty")).lower() == "true":
        limits.append(
            "Trained from a checkout with uncommitted changes: reproducing it needs the run's "
            "audit/git_diff.patch."
        )
    if facts["data"]["source"] == "synthetic":
        limits.append(
            "Trained and tested on her2exp's embedded synthetic patches: its numbers say "
            "nothing about real tissue."
        )
    return limits


def _sensitivity_limit(name: str, split: dict[str, Any] | None, e: dict[str, Any]) -> list[str]:
    """A split whose sensitivity at the frozen decision point, or its CI, is below the target."""
    target = float(e["target_sensitivity"])
    rep = _decision_report(split, e["decision_level"], e["operating_point"])
    if rep is None or rep.get("sensitivity") is None:
        return []
    at = f"{name} sensitivity at the frozen {e['operating_point']} ({e['decision_level']} level)"
    low = rep.get("sensitivity_low")
    if rep["sensitivity"] < target:
        return [f"The {at} is {rep['sensitivity']:.3f}, below the target {target:g}."]
    if low is not None and low < target:
        return [
            f"The {at} is {rep['sensitivity']:.3f}, but its 95% CI starts at {low:.3f}: "
            f"{name} cannot show sensitivity >= {target:g}."
        ]
    return []


def reproduce(run_id: str | None, uri: str | None, overrides: list[str]) -> dict[str, str]:
    """The commands that reproduce the run: from MLflow alone, and the original command line."""
    rerun = f"her2exp-rerun run_id={run_id}" + (f" tracking.uri={uri}" if uri else "")
    return {"rerun": rerun if run_id else "", "train": " ".join(["her2exp-train", *overrides])}


def card_facts(
    cfg: DictConfig,
    manifest: Any,
    best: RunSummary,
    run_id: str | None,
    uri: str | None,
    overrides: list[str],
) -> dict[str, Any]:
    """Everything the card says, JSON-ready: the run's config, its data's counts and best.json."""
    d = cfg.data
    where = d.get("root") or d.get("path")
    facts = {
        "run_id": run_id,
        "tracking_uri": uri,
        "model": cfg.model.name,
        "data": {
            "source": d.source,
            "location": None if where is None else str(where),
            "fingerprint": best.data_fingerprint,
            "counts": data_counts(manifest),
        },
        "recipe": recipe(cfg),
        "training": {k: getattr(best, k) for k in ("best_epoch", "last_epoch", "stopped_early")},
        "git": {"commit": best.git_commit, "dirty": best.git_dirty},
        "evaluation": {
            k: getattr(best, k)
            for k in ("decision_level", "operating_point", "target_sensitivity")
            + ("lcb_confidence", "aggregation", "thresholds", "tta", "calibration")
        },
        "results": {name: _trim(s) for name, s in (best.splits or {}).items()},
        "checklist": best.checklist or [],
        "reproduce": reproduce(run_id, uri, overrides),
    }
    return facts


# -- rendering -----------------------------------------------------------------------------------
def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(r: dict[str, Any], key: str) -> str:
    """`0.750 [0.468, 0.911]` as summary.md writes a value with its 95% CI."""
    if r.get(key) is None:
        return "n/a"
    return f"{_num(r[key])} [{_num(r.get(f'{key}_low'))}, {_num(r.get(f'{key}_high'))}]"


def _auc(a: dict[str, Any] | None) -> str:
    if not a or a.get("auc") is None:
        return "n/a"
    return f"{_num(a['auc'])} [{_num(a.get('low'))}, {_num(a.get('high'))}]"


def _data_section(data: dict[str, Any]) -> list[str]:
    where = f" at `{data['location']}`" if data.get("location") else ""
    lines = [
        "## Data",
        "",
        f"Source: `{data['source']}`{where}. Fingerprint `{data['fingerprint']}` (the tag "
        "`data_fingerprint` of the run; the same data gives the same fingerprint).",
        "",
        "| split | site | patients (HER2+) | slides | patches (HER2+) |",
        "|---|---|---|---|---|",
    ]
    for r in data["counts"]:
        lines.append(
            f"| {r['split']} | {r['site']} | {r['patients']} ({r['her2_pos_patients']}) | "
            f"{r.get('slides', 'n/a')} | {r['patches']} ({r['her2_pos_patches']}) |"
        )
    return [*lines, ""]


def _recipe_section(facts: dict[str, Any]) -> list[str]:
    git, tr = facts["git"], facts["training"]
    lines = ["## Training recipe", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts["recipe"].items()]
    lines += [
        f"| best epoch | {tr.get('best_epoch')} of {tr.get('last_epoch')} "
        f"(stopped early: {tr.get('stopped_early')}) |",
        f"| git commit | {git.get('commit')} (uncommitted changes: {git.get('dirty')}) |",
    ]
    return [*lines, ""]


def _decision_section(e: dict[str, Any]) -> list[str]:
    agg = e.get("aggregation") or {}
    lines = [
        "## Decision rule (frozen on validation)",
        "",
        f"HER2+ when P(HER2+) >= the threshold. The clinic decides at the **{e['decision_level']}"
        f" level** at `{e['operating_point']}`; target sensitivity {e['target_sensitivity']}. "
        f"Slide and patient scores: {agg.get('slide')} / {agg.get('patient')} of tile scores "
        f"(top-k {agg.get('topk')}); test-time views: {e.get('tta')}.",
        "",
    ]
    for level, values in (e.get("thresholds") or {}).items():
        pairs = ", ".join(f"`{k}` = {v:.4f}" for k, v in values.items())
        lines.append(f"- {level}: {pairs}")
    return [*lines, ""]


def _levels(split: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("tile", split)] + [(lv, split[lv]) for lv in ("slide", "patient") if split.get(lv)]


def _results_section(name: str, split: dict[str, Any], e: dict[str, Any]) -> list[str]:
    """Every level at every frozen threshold with its CIs, then each site at the decision one."""
    lines = [
        f"### {name}",
        "",
        "| level | n (HER2+) | AUC | operating point | threshold | sensitivity | specificity "
        "| PPV | NPV |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level, at in _levels(split):
        mark = " (decision)" if level == e["decision_level"] else ""
        first = f"{level}{mark} | {at['n']} ({at['n_pos']}) | {_auc(at.get('auc'))}"
        for op, r in (at.get("reports") or {}).items():
            lines.append(
                f"| {first} | {op} | {r['threshold']:.4f} | {_ci(r, 'sensitivity')} | "
                f"{_ci(r, 'specificity')} | {_ci(r, 'precision')} | {_ci(r, 'npv')} |"
            )
            first = " | | "  # the level's n and AUC once
    sites = split.get("sites") or {}
    if sites:
        op, level = e["operating_point"], e["decision_level"]
        lines += [
            "",
            f"Per site, at each level's pooled frozen `{op}` (never re-tuned per site):",
            "",
            "| site | level | n (HER2+) | AUC | sensitivity | specificity | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for site, s in sites.items():
            for lv, at in _levels(s):
                r = (at.get("reports") or {}).get(op) or {}
                mark = " (decision)" if lv == level else ""
                lines.append(
                    f"| {site} | {lv}{mark} | {at.get('n')} ({at.get('n_pos')}) | "
                    f"{_auc(at.get('auc'))} | {_ci(r, 'sensitivity')} | {_ci(r, 'specificity')} "
                    f"| {s.get('note') or ''} |"
                )
    return [*lines, ""]


def _calibration_section(facts: dict[str, Any], cohorts: dict[str, Any]) -> list[str]:
    """Brier and ECE per split of the scores the thresholds apply to; with temperature scaling,
    T and the model's own scores' values before it."""
    cal = facts["evaluation"].get("calibration") or {}
    scaled = cal.get("temperature") is not None
    how = f"temperature scaling, T = {cal['temperature']:.4f}" if scaled else "none"
    lines = [
        "## Calibration",
        "",
        f"Recalibration: {how} (fitted on validation, frozen with the thresholds). Brier score "
        "and ECE (10 equal-width bins) of the scores the thresholds apply to"
        + (", and before scaling" if scaled else "")
        + ":",
        "",
        "| split | Brier | ECE |" + (" Brier before | ECE before |" if scaled else ""),
        "|---|---|---|" + ("---|---|" if scaled else ""),
    ]
    before = cal.get("uncalibrated") or {}
    for name, split in {**facts["results"], **cohorts}.items():
        after, b = split.get("calibration") or {}, before.get(name) or {}
        row = f"| {name} | {_num(after.get('brier'), 4)} | {_num(after.get('ece'), 4)} |"
        if scaled:
            row += f" {_num(b.get('brier'), 4)} | {_num(b.get('ece'), 4)} |"
        lines.append(row)
    return [*lines, ""]


def render(facts: dict[str, Any], cohorts: dict[str, Any] | None = None) -> str:
    """The card's markdown; `cohorts`: external cohorts' results (trimmed best.json splits)."""
    cohorts = cohorts or {}
    e = facts["evaluation"]
    lines = [
        f"# Model card: {facts['model']} (MLflow run {facts['run_id']})",
        "",
        *(
            [
                f"This copy adds the external cohort(s) {', '.join(cohorts)} scored by "
                "her2exp-eval at the run's frozen thresholds; the run's own card is its "
                "`reports/model_card.md`.",
                "",
            ]
            if cohorts
            else []
        ),
        "## Intended use",
        "",
        INTENDED_USE,
        "",
        f"**Not for use:** {NOT_FOR}",
        "",
        *_data_section(facts["data"]),
        *_recipe_section(facts),
        *_decision_section(e),
        "## Results at the frozen thresholds",
        "",
        "95% intervals: DeLong for AUC, Wilson for the rates.",
        "",
    ]
    for name, split in facts["results"].items():
        lines += _results_section(name, split, e)
    lines += ["## External cohorts", ""]
    if cohorts:
        for name, split in cohorts.items():
            lines += _results_section(f"{name} (external)", split, e)
    else:
        lines += ["None evaluated yet: `her2exp-eval run_id=...` adds its cohort to a card.", ""]
    lines += _calibration_section(facts, cohorts)
    lines += ["## Known limits", "", *(f"- {x}" for x in known_limits(facts, cohorts)), ""]
    return "\n".join(lines + _reproduce_section(facts["reproduce"]))


def _reproduce_section(commands: dict[str, str]) -> list[str]:
    lines = ["## Reproduce", ""]
    if commands["rerun"]:
        lines += ["From the MLflow record alone:", "", "```", commands["rerun"], "```", ""]
    else:
        lines += ["No MLflow record (tracking was off): train again from the command line.", ""]
    return [*lines, "The original command line:", "", "```", commands["train"], "```", ""]


# -- files ---------------------------------------------------------------------------------------
def write_card(report_dir: Path, facts: dict[str, Any], cohorts: dict | None = None) -> Path:
    """model_card.md (atomic) in `report_dir`."""
    return atomic_write_text(Path(report_dir) / CARD, render(facts, cohorts))


def write_model_card(
    cfg: DictConfig, report_dir: Path, manifest: Any, tracker: Any, overrides: Sequence[str] = ()
) -> Path:
    """The run's card and its facts (read from best.json, which report_cohorts just wrote),
    logged under `reports/`; final_evaluation calls it on rank 0 with the command's overrides."""
    best = RunSummary.read(Path(report_dir) / BEST_JSON)
    facts = card_facts(cfg, manifest, best, tracker.run_id, tracker.uri, list(overrides))
    text = json.dumps(facts, indent=2, allow_nan=False) + "\n"
    paths = [atomic_write_text(Path(report_dir) / FACTS, text), write_card(report_dir, facts)]
    for path in paths:
        tracker.log_artifact(path, "reports")
    return paths[1]


#: How a card reaches a run's artifact: `tracking.download_from_run(uri, run_id, artifact,
#: folder, missing) -> (run, local path)`, passed in by the caller (reports sits below tracking).
Download = Callable[[str, str, str, str, str], tuple[Any, str]]


def source_facts(run: Any, ecfg: DictConfig, download: Download) -> dict[str, Any] | None:
    """The card facts of the run her2exp-eval scores: its `reports/model_card.json` artifact
    (run_id=, fetched with `download`), or the file beside its checkpoint (checkpoint=); None for
    a run trained before model cards."""
    if run.source_run:
        with tempfile.TemporaryDirectory(prefix="her2exp-card-") as tmp:
            try:
                _, local = download(
                    ecfg.tracking.uri,
                    run.source_run,
                    artifact(ARTIFACTS.report(FACTS)),
                    tmp,
                    "no model card",
                )
            except ConfigError:
                local = None
            return None if local is None else json.loads(Path(local).read_text())
    beside = RunDir.of_checkpoint(str(ecfg.checkpoint)).report(FACTS)
    return json.loads(beside.read_text()) if beside.is_file() else None


def eval_card(
    run: Any, ecfg: DictConfig, download: Download
) -> Callable[[Path], list[Path]] | None:
    """What her2exp-eval draws after its report: the run's card with the new cohort's results
    (read from the eval's best.json), into the eval's report folder. None (no card) for the
    run's own split (`split=`: its card has it) or a run without card facts. `download`:
    `tracking.download_from_run` (see `source_facts`)."""
    if ecfg.get("split"):
        return None
    facts = source_facts(run, ecfg, download)
    if facts is None:
        log.info("%s has no %s (trained before model cards): no card", run.source, FACTS)
        return None

    def draw(report_dir: Path) -> list[Path]:
        best = RunSummary.read(Path(report_dir) / BEST_JSON)
        cohorts = {name: _trim(s) for name, s in (best.splits or {}).items()}
        return [write_card(report_dir, facts, cohorts)]

    return draw
