"""Files a reviewer opens: best.json, summary.md and the clinical figures (ROC with CI band,
precision-recall, confusion matrices, reliability, decision curves, false-negative and
false-positive galleries). Plotting and formatting only: every number comes from
``her2exp.metrics``. Each file is written atomically (temp file + os.replace), rank 0 only.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from her2exp.fileio import atomic_write, atomic_write_text, safe_name
from her2exp.metrics import (
    LEVELS,
    Calibration,
    SplitEvaluation,
    as_level_thresholds,
    choose_threshold,
    level_groups,
    misclassified,
    promise,
    to_jsonable,
)


def write_best_json(path: Path, summary: dict[str, Any]) -> Path:
    return atomic_write_text(
        path, json.dumps(to_jsonable(summary), indent=2, sort_keys=False, allow_nan=False) + "\n"
    )


SPLIT_TITLES = {
    "val": "validation (thresholds chosen here)",
    "test": "test (frozen thresholds)",
    "external": "external cohort (frozen thresholds)",
}


def _split_title(name: str) -> str:
    return SPLIT_TITLES.get(name, f"{name} (frozen thresholds)")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Save a figure atomically and close it."""
    plt = _pyplot()
    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    finally:
        plt.close(fig)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _ci(v: float, low: float, high: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.3f} [{_fmt(low)}, {_fmt(high)}]"


def plot_roc_ci(path: Path, evaluations: dict[str, Any], level: str = "tile") -> Path:
    """ROC per split, DeLong CI in the legend, a pointwise Wilson band on sensitivity at each
    FPR (see ``metrics.RocCurve``) and each frozen operating point marked. ``evaluations`` are
    split evaluations (tile level) or one level of each (``SplitEvaluation.levels()``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=120)
    markers = "osD^vP*X"
    for name, ev in evaluations.items():
        if ev.roc is None:
            ax.plot([], [], " ", label=f"{name}: one class, ROC undefined")
            continue
        a = ev.auc
        (line,) = ax.plot(
            ev.roc.fpr,
            ev.roc.tpr,
            lw=1.5,
            label=f"{name} AUC {a.auc:.3f} (95% CI {_fmt(a.low)}-{_fmt(a.high)}, DeLong)",
        )
        ax.fill_between(
            ev.roc.band_fpr,
            ev.roc.band_low,
            ev.roc.band_high,
            step="post",
            color=line.get_color(),
            alpha=0.15,
            lw=0,
        )
        for j, (op, rep) in enumerate(ev.reports.items()):
            ax.plot(
                [1 - rep.specificity],
                [rep.sensitivity],
                markers[j % len(markers)],
                color=line.get_color(),
                mec="black",
                ms=6,
                label=f"{name} @ {op} ({rep.threshold:.3f})",
            )
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity (HER2- called HER2+)")
    ax.set_ylabel("sensitivity (HER2+ recall)")
    ax.set_title(f"{level}-level ROC; band: pointwise 95% Wilson CI of sensitivity", fontsize=9)
    ax.legend(loc="lower right", fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def plot_roc_folds(path: Path, curves: dict[str, tuple[Any, Any]]) -> Path:
    """A cross-validation's ROC curves in one figure: each fold's (thin) and the pooled
    out-of-fold one (the last entry, thick). `curves` maps a legend label to (fpr, tpr)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=120)
    for i, (label, (fpr, tpr)) in enumerate(curves.items()):
        last = i == len(curves) - 1
        ax.plot(fpr, tpr, lw=2.5 if last else 1.0, alpha=1.0 if last else 0.7, label=label,
                color="black" if last else None)  # fmt: skip
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity (HER2- called HER2+)")
    ax.set_ylabel("sensitivity (HER2+ recall)")
    ax.set_title("tile-level ROC of each fold's test split and the pooled out-of-fold", fontsize=9)
    ax.legend(loc="lower right", fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def plot_precision_recall(path: Path, evaluations: dict[str, SplitEvaluation]) -> Path:
    """Precision-recall per split with its average precision and the prevalence baseline."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=120)
    for name, ev in evaluations.items():
        if ev.pr is None:
            ax.plot([], [], " ", label=f"{name}: one class, PR undefined")
            continue
        (line,) = ax.plot(
            ev.pr.recall,
            ev.pr.precision,
            drawstyle="steps-post",
            label=f"{name} AP {ev.pr.average_precision:.3f}",
        )
        ax.axhline(ev.pr.prevalence, ls=":", lw=1, color=line.get_color())
        for op, rep in ev.reports.items():
            if math.isfinite(rep.precision):
                ax.plot([rep.sensitivity], [rep.precision], "o", color=line.get_color(), mec="k")
                ax.annotate(op, (rep.sensitivity, rep.precision), fontsize=6)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("recall (HER2+ sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_title("Precision-recall (dotted: prevalence)", fontsize=9)
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrices(path: Path, evaluation: SplitEvaluation, title: str) -> Path:
    """One confusion-matrix panel per operating point (rows: truth, columns: prediction)."""
    plt = _pyplot()
    k = len(evaluation.reports)
    fig, axes = plt.subplots(1, k, figsize=(3.2 * k, 3.4), dpi=120, squeeze=False)
    for ax, (op, rep) in zip(axes[0], evaluation.reports.items(), strict=True):
        cm = np.array([[rep.tn, rep.fp], [rep.fn, rep.tp]])
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
        for (r, c), v in np.ndenumerate(cm):
            colour = "white" if v > cm.max() / 2 else "black"
            ax.text(c, r, str(v), ha="center", va="center", color=colour, fontsize=11)
        ax.set_xticks([0, 1], ["HER2-", "HER2+"])
        ax.set_yticks([0, 1], ["HER2-", "HER2+"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(
            f"{op} t={rep.threshold:.3f}\nsens {_fmt(rep.sensitivity)} spec "
            f"{_fmt(rep.specificity)}",
            fontsize=8,
        )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(
    path: Path,
    evaluations: dict[str, SplitEvaluation],
    before: dict[str, Calibration] | None = None,
) -> Path:
    """Reliability diagram: observed HER2+ fraction vs mean predicted probability per bin;
    with a recalibrated run, each split's curve before (`before`, dashed) and after."""
    plt = _pyplot()
    before = before or {}
    fig, ax = plt.subplots(figsize=(5.0, 5.0), dpi=120)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfect calibration")
    for i, (name, ev) in enumerate(evaluations.items()):
        colour = f"C{i}"
        if name in before:
            b = before[name]
            ax.plot(
                b.prob_pred,
                b.prob_true,
                "x--",
                ms=4,
                color=colour,
                alpha=0.6,
                label=f"{name} uncalibrated Brier {b.brier:.3f}, ECE {b.ece:.3f}",
            )
        c = ev.calibration
        after = " calibrated" if name in before else ""
        ax.plot(
            c.prob_pred,
            c.prob_true,
            "o-",
            ms=4,
            color=colour,
            label=f"{name}{after} Brier {c.brier:.3f}, ECE {c.ece:.3f} ({c.n_bins} bins)",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted P(HER2+) in bin")
    ax.set_ylabel("observed HER2+ fraction in bin")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_decision_curves(path: Path, evaluations: dict[str, SplitEvaluation]) -> Path:
    """Net benefit of the model vs treat-all vs treat-none, one panel per split."""
    plt = _pyplot()
    k = len(evaluations)
    fig, axes = plt.subplots(1, k, figsize=(4.5 * k, 4.0), dpi=120, squeeze=False)
    for ax, (name, ev) in zip(axes[0], evaluations.items(), strict=True):
        d = ev.decision_curve
        ax.plot(d.thresholds, d.net_benefit, lw=1.5, label="model")
        ax.plot(d.thresholds, d.treat_all, "--", lw=1, label="treat all as HER2+")
        ax.plot(d.thresholds, d.treat_none, ":", color="k", lw=1, label="treat none")
        ax.set_ylim(min(-0.05, -0.25 * d.prevalence), max(d.prevalence * 1.1, 0.05))
        ax.set_xlabel("threshold probability p_t")
        ax.set_ylabel("net benefit")
        ax.set_title(_split_title(name), fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_error_gallery(
    path: Path,
    images: np.ndarray,
    scores: np.ndarray,
    indices: np.ndarray,
    title: str,
    max_images: int = 32,
    columns: int = 8,
) -> Path:
    """Patches at ``indices`` (already ordered worst first) with their HER2+ scores."""
    plt = _pyplot()
    shown = np.asarray(indices)[:max_images]
    rows = max(1, math.ceil(shown.size / columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(1.6 * columns, 1.8 * rows + 0.5), dpi=100, squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), shown, strict=False):
        ax.imshow(images[i])
        ax.set_title(f"#{int(i)} p={scores[i]:.3f}", fontsize=7)
    if shown.size == 0:
        axes[0, 0].text(0, 0.5, "none", fontsize=12, transform=axes[0, 0].transAxes)
    fig.suptitle(f"{title} ({len(indices)} total, {shown.size} shown)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _val_level_scores(val: SplitEvaluation, level: str) -> tuple[Any, Any] | None:
    if level == "tile":
        return None if val.labels is None else (val.labels, val.scores)
    ev = val.levels().get(level)
    return None if ev is None else (ev.scores.labels, ev.scores.scores)


def _val_level_groups(val: SplitEvaluation, level: str) -> Any:
    """The patient of each unit of `level` on val (what the promised point's bound counts)."""
    return level_groups(level, val.slide_ids, val.patient_ids)


def _thresholds_from_validation(
    evaluations: dict[str, SplitEvaluation], header: dict[str, Any]
) -> tuple[bool | None, str]:
    """Were the thresholds applied to every split, at every level, the ones validation chooses?

    With a val split, each level's operating points are re-derived from val's own labels and
    scores at that level (``metrics.choose_threshold`` on tiles, slide or patient aggregates)
    and compared with the threshold each split's reports were actually computed at, so
    thresholds tuned anywhere else fail even when every split was scored at the same (wrong)
    values. Without one (``her2exp-eval`` on a cohort), the reference is
    ``header["thresholds"]``, the values frozen into the training run's checkpoint.
    """
    val = evaluations.get("val")
    chosen: dict[str, dict[str, float]] = {}
    if val is not None:
        if val.labels is None or val.scores is None:
            return None, "val split without its scores: its thresholds cannot be re-derived"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # one class: choose_threshold falls back to 0.5
                confidence = float(header.get("lcb_confidence") or 0.95)
                for level in LEVELS:
                    pair = _val_level_scores(val, level)
                    names = val.level_reports(level)
                    groups = _val_level_groups(val, level)
                    if pair is not None and names:
                        chosen[level] = {
                            n: choose_threshold(n, *pair, groups, confidence) for n in names
                        }
        except ValueError as exc:
            return None, f"cannot re-derive the val thresholds: {exc}"
        source = "chosen on val"
    elif header.get("thresholds"):
        chosen = as_level_thresholds(header["thresholds"])
        source = "frozen from the training run's validation split"
    else:
        return False, "no validation split and no frozen thresholds given"
    mismatches = []
    for split, ev in evaluations.items():
        for level in LEVELS:
            want_level, reports_ = chosen.get(level, {}), ev.level_reports(level)
            if level != "tile" and not want_level and not reports_:
                continue  # neither frozen nor reported at this level
            for name in dict.fromkeys([*want_level, *reports_]):
                want, rep = want_level.get(name), reports_.get(name)
                used = None if rep is None else rep.threshold
                if want is None or used is None or not math.isclose(used, want, abs_tol=1e-12):
                    where = split if level == "tile" else f"{split} {level}"
                    mismatches.append(f"{where} {name} {_fmt(used, 4)} vs {_fmt(want, 4)}")
    if mismatches:
        return False, f"thresholds used differ from those {source}: " + "; ".join(mismatches[:4])
    levels = ", ".join(chosen) or "tile"
    return True, f"thresholds {source} ({levels} level), used unchanged on every split"


def checklist_item(name: str, passed: bool | None, evidence: str) -> dict[str, str]:
    """One checklist row: PASS, FAIL or n/a (None: not applicable) with its evidence."""
    status = "n/a" if passed is None else ("PASS" if passed else "FAIL")
    return {"item": name, "status": status, "evidence": evidence}


def checklist_table(checklist: list[dict[str, str]]) -> list[str]:
    """The checklist as markdown table lines (summary.md, the sweep parent's summaries)."""
    lines = ["| item | status | evidence |", "|---|---|---|"]
    return lines + [f"| {c['item']} | {c['status']} | {c['evidence']} |" for c in checklist]


def _checklist(
    evaluations: dict[str, SplitEvaluation],
    header: dict[str, Any],
    galleries_written: bool,
    decision_curve_written: bool,
) -> list[dict[str, str]]:
    """The seed's Clinical Evaluation Checklist, each item judged from the numbers."""
    val, test = evaluations.get("val"), evaluations.get("test")
    op = header.get("operating_point") or (
        "youden" if val is None or "youden" in val.thresholds else next(iter(val.thresholds))
    )

    item = checklist_item
    off = "" if header.get("figures", True) else "figures off (evaluation.figures=false)"
    level = header.get("decision_level") or "tile"

    def at_op(ev: SplitEvaluation | None, field: str) -> float:
        rep = None if ev is None else ev.level_reports(level).get(op)
        return math.nan if rep is None else float(getattr(rep, field))

    # An external-only evaluation has no val/test split: those items are not applicable there.
    def judged(ok: bool, ev: SplitEvaluation | None) -> bool | None:
        return None if ev is None else ok

    val_auc = math.nan if val is None else val.auc.auc
    sens, spec = at_op(test, "sensitivity"), at_op(test, "specificity")
    external = [k for k in evaluations if k not in ("val", "test")]
    commit = str(header.get("git_commit") or "")
    return [
        item("AUC >= 0.95 on validation", judged(val_auc >= 0.95, val), f"val AUC {_fmt(val_auc)}"),
        item(
            "HER2+ recall >= 0.90 (test, val-chosen operating point)",
            judged(sens >= 0.90, test),
            f"test sensitivity {_fmt(sens)} at {op}, {level} level (the decision level)",
        ),
        item(
            "Specificity >= 0.85 (test, val-chosen operating point)",
            judged(spec >= 0.85, test),
            f"test specificity {_fmt(spec)} at {op}, {level} level (the decision level)",
        ),
        item(
            "False-negative analysis present",
            galleries_written,
            "false-negative gallery written" if galleries_written else off or "no gallery given",
        ),
        item(
            "Threshold tuned on validation and documented",
            *_thresholds_from_validation(evaluations, header),
        ),
        item(
            "Decision curve analysis present",
            decision_curve_written,
            "decision_curve.png" if decision_curve_written else off or "missing",
        ),
        item(
            "External cohort evaluated",
            bool(external),
            ", ".join(external) if external else "no external cohort given",
        ),
        item(
            "Seed and git commit recorded",
            header.get("seed") is not None and commit not in ("", "unknown", "None"),
            f"seed {header.get('seed')}, commit {commit or 'missing'}",
        ),
    ]


def _split_section(
    name: str, ev: SplitEvaluation, decision_level: str = "tile", bags: str | None = None
) -> list[str]:
    """`bags`: a MIL run's bag_by (its first level is the bag, not the tile)."""
    a = ev.auc
    mark = " **(decision level)**" if decision_level == "tile" else ""
    unit = f"Bag level (one bag per {bags}){mark}: n = {ev.n} bags" if bags else ""
    lines = [
        f"## {_split_title(name)}",
        "",
        (unit or f"Tile level{mark}: n = {ev.n} patches") + f", HER2+ = {ev.n_pos}. "
        f"AUC {_ci(a.auc, a.low, a.high)} (95% CI, DeLong)"
        + (
            f"; bootstrap {_fmt(ev.auc_bootstrap.low)}-{_fmt(ev.auc_bootstrap.high)}"
            if ev.auc_bootstrap is not None
            else ""
        )
        + ".",
        "",
    ]
    lines += _report_table(ev.reports)
    c = ev.calibration
    lines += [
        "",
        f"Calibration: Brier {_fmt(c.brier, 4)}, ECE {_fmt(c.ece, 4)} "
        f"({c.n_bins} equal-width bins)."
        + (f" Average precision {_fmt(ev.pr.average_precision)}." if ev.pr is not None else ""),
        "",
    ]
    for p in ev.levels().values():
        mark = " **(decision level)**" if decision_level == p.level else ""
        lines += [
            f"### {name}: {p.level} level ({p.how} of tile scores){mark}",
            "",
            f"n = {p.n} {p.level}s, HER2+ = {p.n_pos}. "
            f"AUC {_ci(p.auc.auc, p.auc.low, p.auc.high)} (95% CI, DeLong).",
            "",
        ]
        if p.reports:
            lines += [*_report_table(p.reports), ""]
        else:
            lines += [f"No thresholds were frozen at the {p.level} level (an older run).", ""]
    return lines + _site_section(name, ev)


def _site_section(name: str, ev: SplitEvaluation) -> list[str]:
    """Per site, at the pooled frozen thresholds: AUC (DeLong) and sensitivity / specificity
    (Wilson) at each level and operating point. Empty with one site."""
    if not ev.sites:
        return []
    ops = list(ev.reports)
    lines = [
        f"### {name}: per site (the pooled frozen thresholds)",
        "",
        "| site | level | n (HER2+) | AUC | "
        + " | ".join(f"{op} sensitivity / specificity" for op in ops)
        + " | note |",
        "|---|---|---|---|" + "---|" * len(ops) + "---|",
    ]
    for site in ev.sites.values():
        s = site.evaluation
        entries = [("tile", s.n, s.n_pos, s.auc, s.reports)]
        entries += [(lv.level, lv.n, lv.n_pos, lv.auc, lv.reports) for lv in s.levels().values()]
        for level, n, n_pos, a, reports_ in entries:
            cells = []
            for op in ops:
                r = reports_.get(op)
                cells.append(
                    "n/a"
                    if r is None
                    else f"{_ci(r.sensitivity, r.sensitivity_low, r.sensitivity_high)} / "
                    f"{_ci(r.specificity, r.specificity_low, r.specificity_high)}"
                )
            lines.append(
                f"| {site.site} | {level} | {n} ({n_pos}) | {_ci(a.auc, a.low, a.high)} | "
                + " | ".join(cells)
                + f" | {site.note} |"
            )
    return [*lines, ""]


def _promise_section(val: SplitEvaluation | None, header: dict[str, Any]) -> list[str]:
    """What validation can promise at each level: its positives (the effective number at the
    tile and slide levels, patients counted once), the number the promise needs, and whether
    the promised point's bound reaches the target at all."""
    target, confidence = header.get("target_sensitivity"), header.get("lcb_confidence")
    if val is None or val.labels is None or target is None or confidence is None:
        return []
    name = f"sens{int(round(float(target) * 100))}_lcb"
    if name not in val.reports:
        return []
    lines = [
        f"## Promised sensitivity (`{name}`)",
        "",
        f"`{name}` is the highest threshold whose one-sided {float(confidence):.0%} lower bound "
        f"on validation sensitivity (Clopper-Pearson) reaches {float(target):.2f}. Tiles and "
        "slides of one patient are correlated: their bound uses the effective number of "
        "positives, (sum n_i)^2 / sum n_i^2 over the positive patients' counts n_i. When the "
        "bound cannot reach the target, the threshold catching every validation positive is "
        "frozen instead (and the promise is not made).",
        "",
        "| level | validation HER2+ | effective n | needed (no miss) | best bound | promise |",
        "|---|---|---|---|---|---|",
    ]
    for level in LEVELS:
        pair = _val_level_scores(val, level)
        if pair is None or name not in val.level_reports(level):
            continue
        p = promise(pair[0], float(target), float(confidence), _val_level_groups(val, level))
        verdict = "can be made" if p.feasible else "cannot be made: too few positives"
        lines.append(
            f"| {level} | {p.n_pos} | {p.n_eff:.1f} | {p.needed} | {_fmt(p.best_bound)} | "
            f"{verdict} |"
        )
    return [*lines, ""]


def _report_table(reports: dict[str, Any]) -> list[str]:
    lines = [
        "| operating point | threshold | sensitivity | specificity | PPV | NPV | F1 | "
        "accuracy | TP/FN/FP/TN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for op, r in reports.items():
        lines.append(
            f"| {op} | {r.threshold:.4f} | "
            f"{_ci(r.sensitivity, r.sensitivity_low, r.sensitivity_high)} | "
            f"{_ci(r.specificity, r.specificity_low, r.specificity_high)} | "
            f"{_ci(r.precision, r.precision_low, r.precision_high)} | "
            f"{_ci(r.npv, r.npv_low, r.npv_high)} | {_fmt(r.f1)} | "
            f"{_ci(r.accuracy, r.accuracy_low, r.accuracy_high)} | "
            f"{r.tp}/{r.fn}/{r.fp}/{r.tn} |"
        )
    return lines


def _clinical_markdown(
    evaluations: dict[str, SplitEvaluation],
    header: dict[str, Any],
    checklist: list[dict[str, str]],
    figures: list[Path],
) -> str:
    lines = [f"# her2exp clinical evaluation ({header.get('model', 'model')})", ""]
    lines += ["| run | value |", "|---|---|"]
    lines += [
        f"| {k} | {_fmt(v, 4) if isinstance(v, float) else v} |"
        for k, v in header.items()
        if not isinstance(v, dict)
    ]
    lines.append("")
    decision = header.get("decision_level") or "tile"
    lines += [
        f"The clinic decides at the **{decision} level**: its thresholds are the headline "
        "(the checklist judges them).",
        "",
    ]
    frozen = as_level_thresholds(header.get("thresholds") or {})
    val = evaluations.get("val")
    if val is not None and not frozen:
        frozen = {"tile": val.thresholds}
    if frozen:
        lines += [
            "Operating points were chosen on **validation**, at each level on that level's "
            "scores, and frozen; every other split is scored at exactly these thresholds "
            "(HER2+ when P(HER2+) >= threshold):",
            "",
        ]
        for level, values in frozen.items():
            mark = " (decision level)" if level == decision else ""
            pairs = ", ".join(f"`{k}` = {v:.4f}" for k, v in values.items())
            lines.append(f"- {level}{mark}: {pairs}")
        lines.append("")
    lines += _scoring_paragraph(header, evaluations)
    lines += _bag_paragraph(header)
    lines += [
        "Intervals are 95%: DeLong for AUC, Wilson for sensitivity, specificity, PPV, NPV and "
        "accuracy.",
        "",
    ]
    bags = (header.get("mil") or {}).get("bag_by")
    for name, ev in evaluations.items():
        lines += _split_section(name, ev, decision, bags)
    lines += _promise_section(val, header)
    lines += ["## Clinical Evaluation Checklist", "", *checklist_table(checklist)]
    lines += ["", "## Figures", ""]
    lines += [f"- `{p.name}`" for p in figures]
    lines.append("")
    return "\n".join(lines)


def _bag_paragraph(header: dict[str, Any]) -> list[str]:
    """A MIL run's unit: the "tile level" of its tables is the bag (one per patient or slide)."""
    mil = header.get("mil")
    if not mil:
        return []
    return [
        f"Attention MIL (`mil={mil['name']}`): each unit scored is a **bag** of tile "
        f'embeddings, one per {mil["bag_by"]}. The tables\' first level ("tile level", n = '
        f"bags) is that {mil['bag_by']} level; per-tile attention is in `attention_<split>.csv`.",
        "",
    ]


def _scoring_paragraph(
    header: dict[str, Any], evaluations: dict[str, SplitEvaluation]
) -> list[str]:
    """What the scores are: TTA views and the recalibration, with Brier/ECE before and after."""
    lines = []
    if header.get("tta") == "d4":
        lines += [
            "Test-time augmentation: each patch's P(HER2+) is the mean over its 8 rotations and "
            "flips (D4), in this evaluation and on validation where the thresholds were chosen "
            "(per-epoch validation during training scored one view).",
            "",
        ]
    cal = header.get("calibration") or {}
    if cal.get("method") != "temperature":
        return lines
    lines += [
        f"Recalibration: temperature scaling, T = {cal['temperature']:.4f}, fitted on "
        "validation by NLL and frozen with the thresholds (which were chosen on the calibrated "
        "validation scores). Patch AUC is unchanged by it (a monotone map); slide and patient "
        "scores are means of calibrated tile probabilities, so those levels may move.",
        "",
    ]
    shown = cal.get("uncalibrated") or {}
    if shown:
        lines += ["| split | Brier before | Brier after | ECE before | ECE after |"]
        lines += ["|---|---|---|---|---|"]
        for name, b in shown.items():
            a = evaluations[name].calibration
            lines.append(
                f"| {name} | {_fmt(b['brier'], 4)} | {_fmt(a.brier, 4)} | "
                f"{_fmt(b['ece'], 4)} | {_fmt(a.ece, 4)} |"
            )
        lines.append("")
    return lines


def _plot_galleries(
    report_dir: Path,
    galleries: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]],
    max_gallery: int,
) -> list[Path]:
    """False-negative (lowest score first) and false-positive (highest first) galleries; file
    names carry the split's name through `safe_name` (a cohort_name is the user's text)."""
    figures = []
    for name, (images, labels, scores, threshold) in galleries.items():
        images = images if hasattr(images, "shape") else np.asarray(images)  # a RowView stays lazy
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] != len(scores):
            raise ValueError(
                f"gallery {name!r}: images must be (N, H, W, 3) with N = {len(scores)}; "
                f"got {images.shape}"
            )
        fn, fp = misclassified(labels, scores, threshold)
        s = np.asarray(scores, dtype=np.float64)
        t = f"t={threshold:.3f}"
        figures += [
            plot_error_gallery(
                report_dir / f"false_negatives_{safe_name(name)}.png",
                images,
                s,
                fn,
                f"{name}: HER2+ called HER2- at {t}, lowest score first",
                max_gallery,
            ),
            plot_error_gallery(
                report_dir / f"false_positives_{safe_name(name)}.png",
                images,
                s,
                fp,
                f"{name}: HER2- called HER2+ at {t}, highest score first",
                max_gallery,
            ),
        ]
    return figures


def plot_explained_galleries(
    report_dir: Path,
    galleries: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]],
    max_gallery: int,
    explainer: Any,
) -> list[Path]:
    """The false-negative and false-positive galleries again, each patch under the map of where
    the model saw HER2+ (`explain.Explainer`: Grad-CAM for CNNs, a token map for ViTs), as
    `false_{negatives,positives}_<method>_<split>.png`; only the patches shown are explained."""
    from her2exp.explain import overlay

    figures = []
    for name, (images, labels, scores, threshold) in galleries.items():
        fn, fp = misclassified(labels, scores, threshold)
        s = np.asarray(scores, dtype=np.float64)
        for kind, idx, order in (("negatives", fn, "lowest"), ("positives", fp, "highest")):
            shown = np.asarray(idx)[:max_gallery]
            overlays: dict[int, np.ndarray] = {}
            if shown.size:
                patches = np.stack([images[int(i)] for i in shown])
                heat = explainer(patches)
                overlays = {
                    int(i): overlay(p, m) for i, p, m in zip(shown, patches, heat, strict=True)
                }
            called = "HER2+ called HER2-" if kind == "negatives" else "HER2- called HER2+"
            figures.append(
                plot_error_gallery(
                    report_dir / f"false_{kind}_{explainer.method}_{safe_name(name)}.png",
                    overlays,
                    s,
                    idx,
                    f"{name}: {called} at t={threshold:.3f}, {order} score first; "
                    + explainer.describe(),
                    max_gallery,
                )
            )
    return figures


def _plot_level_rocs(report_dir: Path, evaluations: dict[str, SplitEvaluation]) -> list[Path]:
    """roc_slide.png and roc_patient.png: each split's ROC at that level."""
    figures = []
    for level in LEVELS[1:]:
        at_level = {n: ev.levels()[level] for n, ev in evaluations.items() if level in ev.levels()}
        if at_level:
            figures.append(plot_roc_ci(report_dir / f"roc_{level}.png", at_level, level))
    return figures


def write_clinical_report(
    report_dir: Path,
    evaluations: dict[str, SplitEvaluation],
    galleries: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]] | None = None,
    header: dict[str, Any] | None = None,
    max_gallery: int = 32,
    before: dict[str, Calibration] | None = None,
    figures: bool = True,
    explainer: Any = None,
) -> list[Path]:
    """Write every figure, summary.md and best.json for one run; returns the paths written.

    ``evaluations`` come from ``metrics.evaluate_split`` ("val", "test", optionally "external"
    or other cohorts), all at the thresholds chosen on val. ``galleries[split]`` is (uint8
    images (N, H, W, 3), labels, scores, threshold): its false negatives (lowest score first)
    and false positives (highest score first) are drawn. ``header`` is recorded verbatim (model,
    best_epoch, seed, git_commit, data_fingerprint, operating_point: the threshold name the
    checklist judges, default "youden"; decision_level: the level it judges, default "tile";
    thresholds: those frozen, keyed by level; calibration: the frozen one, with each split's
    Brier and ECE before it). ``before[split]``: its calibration before temperature scaling,
    drawn beside the calibrated curve. ``figures=False`` (evaluation.figures): no PNG, and the
    checklist says the gallery and decision curve were not drawn. ``explainer``
    (`explain.Explainer`, or None): the galleries drawn again under its maps
    (`plot_explained_galleries`).
    """
    report_dir = Path(report_dir)
    header = dict(header or {})
    galleries = galleries or {}
    if not evaluations:
        raise ValueError("no evaluations to report")
    paths = (
        _figures(report_dir, evaluations, galleries, max_gallery, before, explainer)
        if figures
        else []
    )
    if not figures:
        header["figures"] = False  # recorded in best.json; the checklist names it
    checklist = _checklist(evaluations, header, bool(paths and galleries), bool(paths))
    flat: dict[str, Any] = {}
    for name, ev in evaluations.items():
        flat.update(ev.as_flat_dict(f"{name}_"))
    summary_path = atomic_write_text(
        report_dir / "summary.md", _clinical_markdown(evaluations, header, checklist, paths)
    )
    best = {
        **header,
        **flat,
        "checklist": checklist,
        "splits": {name: ev.to_dict() for name, ev in evaluations.items()},
        "figures": [p.name for p in paths],
    }
    best_path = write_best_json(report_dir / "best.json", best)
    return [*paths, summary_path, best_path]


def _figures(
    report_dir: Path,
    evaluations: dict[str, SplitEvaluation],
    galleries: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]],
    max_gallery: int,
    before: dict[str, Calibration] | None,
    explainer: Any = None,
) -> list[Path]:
    figures = [
        plot_roc_ci(report_dir / "roc.png", evaluations),
        *_plot_level_rocs(report_dir, evaluations),
        plot_precision_recall(report_dir / "precision_recall.png", evaluations),
        plot_reliability(report_dir / "reliability.png", evaluations, before),
        plot_decision_curves(report_dir / "decision_curve.png", evaluations),
    ]
    for name, ev in evaluations.items():
        figures.append(
            plot_confusion_matrices(
                report_dir / f"confusion_{safe_name(name)}.png", ev, _split_title(name)
            )
        )
    figures += _plot_galleries(report_dir, galleries, max_gallery)
    if explainer is not None:
        try:  # an optional figure never costs a finished run its report
            figures += plot_explained_galleries(report_dir, galleries, max_gallery, explainer)
        except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
            warnings.warn(
                f"evaluation.explain: no overlays ({type(exc).__name__}: {exc})", stacklevel=2
            )
    return figures
