"""summary.md: the clinical report in markdown: the run's header, the frozen operating points,
how the scores were made (TTA, recalibration, MIL bags), each split's tables per level and site,
what validation can promise, the checklist and the figures' names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from her2exp.metrics import LEVELS, SplitEvaluation, as_level_thresholds, promise
from her2exp.reports.checklist import checklist_table, val_level_groups, val_level_scores
from her2exp.reports.formatting import ci, fmt, split_title


def _split_section(
    name: str, ev: SplitEvaluation, decision_level: str = "tile", bags: str | None = None
) -> list[str]:
    """`bags`: a MIL run's bag_by (its first level is the bag, not the tile)."""
    a = ev.auc
    mark = " **(decision level)**" if decision_level == "tile" else ""
    unit = f"Bag level (one bag per {bags}){mark}: n = {ev.n} bags" if bags else ""
    lines = [
        f"## {split_title(name)}",
        "",
        (unit or f"Tile level{mark}: n = {ev.n} patches") + f", HER2+ = {ev.n_pos}. "
        f"AUC {ci(a.auc, a.low, a.high)} (95% CI, DeLong)"
        + (
            f"; bootstrap {fmt(ev.auc_bootstrap.low)}-{fmt(ev.auc_bootstrap.high)}"
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
        f"Calibration: Brier {fmt(c.brier, 4)}, ECE {fmt(c.ece, 4)} "
        f"({c.n_bins} equal-width bins)."
        + (f" Average precision {fmt(ev.pr.average_precision)}." if ev.pr is not None else ""),
        "",
    ]
    for p in ev.levels().values():
        mark = " **(decision level)**" if decision_level == p.level else ""
        lines += [
            f"### {name}: {p.level} level ({p.how} of tile scores){mark}",
            "",
            f"n = {p.n} {p.level}s, HER2+ = {p.n_pos}. "
            f"AUC {ci(p.auc.auc, p.auc.low, p.auc.high)} (95% CI, DeLong).",
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
                    else f"{ci(r.sensitivity, r.sensitivity_low, r.sensitivity_high)} / "
                    f"{ci(r.specificity, r.specificity_low, r.specificity_high)}"
                )
            lines.append(
                f"| {site.site} | {level} | {n} ({n_pos}) | {ci(a.auc, a.low, a.high)} | "
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
        pair = val_level_scores(val, level)
        if pair is None or name not in val.level_reports(level):
            continue
        p = promise(pair[0], float(target), float(confidence), val_level_groups(val, level))
        verdict = "can be made" if p.feasible else "cannot be made: too few positives"
        lines.append(
            f"| {level} | {p.n_pos} | {p.n_eff:.1f} | {p.needed} | {fmt(p.best_bound)} | "
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
            f"{ci(r.sensitivity, r.sensitivity_low, r.sensitivity_high)} | "
            f"{ci(r.specificity, r.specificity_low, r.specificity_high)} | "
            f"{ci(r.precision, r.precision_low, r.precision_high)} | "
            f"{ci(r.npv, r.npv_low, r.npv_high)} | {fmt(r.f1)} | "
            f"{ci(r.accuracy, r.accuracy_low, r.accuracy_high)} | "
            f"{r.tp}/{r.fn}/{r.fp}/{r.tn} |"
        )
    return lines


def clinical_markdown(
    evaluations: dict[str, SplitEvaluation],
    header: dict[str, Any],
    checklist: list[dict[str, str]],
    figures: list[Path],
) -> str:
    lines = [f"# her2exp clinical evaluation ({header.get('model', 'model')})", ""]
    lines += ["| run | value |", "|---|---|"]
    lines += [
        f"| {k} | {fmt(v, 4) if isinstance(v, float) else v} |"
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
                f"| {name} | {fmt(b['brier'], 4)} | {fmt(a.brier, 4)} | "
                f"{fmt(b['ece'], 4)} | {fmt(a.ece, 4)} |"
            )
        lines.append("")
    return lines
