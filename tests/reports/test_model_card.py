"""Issue 20, item 5: every run writes and logs `reports/model_card.md` (her2exp/reports/card.py),
read from what the run already recorded: every number below is read from the run's best.json or
its MLflow record, never typed in."""

from __future__ import annotations

import copy
import json

from conftest import SmokeRun
from her2exp.metrics import positives_needed
from her2exp.reports import card as model_card


def _ci(r: dict, key: str) -> str:
    return f"{r[key]:.3f} [{r[f'{key}_low']:.3f}, {r[f'{key}_high']:.3f}]"


def _count_rows(card: str) -> list[list[str]]:
    """The data table's rows: split, site, patients (HER2+), slides, patches (HER2+)."""
    section = card.split("## Data", 1)[1].split("## Training recipe", 1)[0]
    rows = [ln.strip("|").split("|") for ln in section.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in r] for r in rows[1:]]  # without the header


def test_the_runs_card_is_logged_and_holds_what_the_run_recorded(smoke_run: SmokeRun) -> None:
    import mlflow

    reports = smoke_run.run_dir / "reports"
    card = (reports / "model_card.md").read_text()
    best = json.loads((reports / "best.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=smoke_run.uri)
    logged = {a.path for a in client.list_artifacts(smoke_run.run_id, "reports")}
    assert {"reports/model_card.md", "reports/model_card.json"} <= logged
    assert "Research use only" in card and "Not a medical device" in card
    assert f"Fingerprint `{best['data_fingerprint']}`" in card

    # Patches per split (summed over sites) as evaluation counted them, train as MLflow's input.
    run = client.get_run(smoke_run.run_id)
    inputs = run.inputs.dataset_inputs[0].tags
    tags = {t.key: int(t.value) for t in inputs if t.key.startswith(("train_", "val_", "test_"))}
    expected = {s: (best["splits"][s]["n"], best["splits"][s]["n_pos"]) for s in ("val", "test")}
    expected["train"] = (tags["train_her2_neg"] + tags["train_her2_pos"], tags["train_her2_pos"])
    for split, (n, n_pos) in expected.items():
        cells = [r[4] for r in _count_rows(card) if r[0] == split]
        got = [tuple(int(x.strip("()")) for x in c.split()) for c in cells]
        assert (sum(a for a, _ in got), sum(b for _, b in got)) == (n, n_pos), split

    # Every level's frozen thresholds with the test split's sensitivity and specificity CIs.
    test = best["splits"]["test"]
    for level in ("tile", "slide", "patient"):
        at = test if level == "tile" else test[level]
        for op, r in at["reports"].items():
            cells = f"| {op} | {r['threshold']:.4f} | {_ci(r, 'sensitivity')} | "
            assert cells + f"{_ci(r, 'specificity')} |" in card, (level, op)
    op, decision = best["operating_point"], best["decision_level"]
    for site, s in test["sites"].items():
        for level in ("tile", "slide", "patient"):
            at = s if level == "tile" else s[level]
            mark = " (decision)" if level == decision else ""
            start = f"| {site} | {level}{mark} | {at['n']} ({at['n_pos']}) | "
            row = next(ln for ln in card.splitlines() if ln.startswith(start))
            assert _ci(at["reports"][op], "specificity") in row, (site, level)

    assert f"her2exp-rerun run_id={smoke_run.run_id} tracking.uri=" in card
    assert f"her2exp-train {run.data.tags['overrides']}\n" in card  # the command line's own
    assert f"| git commit | {best['git_commit']} " in card


def test_known_limits_follow_the_runs_numbers(smoke_run: SmokeRun) -> None:
    """The limits derived from the facts: each appears exactly when its number says so."""
    facts = json.loads((smoke_run.run_dir / "reports" / "model_card.json").read_text())
    e = facts["evaluation"]
    needed = positives_needed(e["target_sensitivity"], e["lcb_confidence"])
    val_pos = facts["results"]["val"]["patient"]["n_pos"]
    limits = model_card.known_limits(facts)
    assert any(f"Validation holds {val_pos} HER2+ patients" in x for x in limits) is (
        val_pos < needed
    )
    assert "No external cohort has been evaluated." in limits

    changed = copy.deepcopy(facts)
    changed["results"]["val"]["patient"]["n_pos"] = needed
    changed["data"]["counts"] = [
        {**r, "site": "only"} for r in changed["data"]["counts"] if r["split"] != "train"
    ] + [{**r, "site": "only"} for r in changed["data"]["counts"] if r["split"] == "train"][:1]
    changed["git"]["dirty"] = "true"
    cohort = copy.deepcopy(facts["results"]["test"])
    limits = model_card.known_limits(changed, {"site2": cohort})
    assert not any(x.startswith("Validation holds") for x in limits)
    assert any(x.startswith("Trained on one site (only)") for x in limits)
    assert any("audit/git_diff.patch" in x for x in limits)
    assert "No external cohort has been evaluated." not in limits
    rep = cohort["reports"][e["operating_point"]] if e["decision_level"] == "tile" else None
    if rep is not None and rep["sensitivity"] < e["target_sensitivity"]:
        assert any(x.startswith("The site2 sensitivity") for x in limits)

    changed["evaluation"]["calibration"] = {
        "method": "temperature",
        "temperature": 1.5,
        "uncalibrated": {"val": {"brier": 0.25, "ece": 0.125}},
    }
    text = model_card.render(changed, {"site2": cohort})
    assert "temperature scaling, T = 1.5000" in text and "| val |" in text and "0.1250 |" in text
    assert "### site2 (external)" in text and "This copy adds the external cohort(s) site2" in text
