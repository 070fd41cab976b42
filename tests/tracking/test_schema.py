"""Issue 33, item 4: an MLflow run a reviewer can read (her2exp/tracking/schema.py).

The experiment opens in MLflow's model-training view (its kind tag, read back through the
client); the smoke run logs only what the schema describes (metrics, tags, top-level artifacts),
every key her2exp's readers read, and the rest of its evaluation as rows of reports/metrics.csv;
docs/reference/mlflow.md is the schema's page (its staleness: tests/docs/test_reference.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import SmokeRun, mlflow_store
from her2exp.apps import compare
from her2exp.tracking import registry, schema
from her2exp.tracking.store import experiment_id


@pytest.fixture(scope="module")
def logged(smoke_run: SmokeRun):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=smoke_run.uri)
    return client, client.get_run(smoke_run.run_id)


def test_the_experiment_opens_in_the_model_training_view(logged) -> None:
    client, run = logged
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags[schema.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_an_older_experiment_gets_the_kind_and_a_users_kind_stays(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{mlflow_store(tmp_path / 'mlflow.db')}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    old = client.create_experiment("before-kinds")  # as her2exp created them before
    assert schema.EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert experiment_id(client, OmegaConf.create({"experiment": "before-kinds"}), uri) == old
    assert client.get_experiment(old).tags[schema.EXPERIMENT_KIND_TAG] == schema.EXPERIMENT_KIND
    chosen = client.create_experiment(
        "chosen", tags={schema.EXPERIMENT_KIND_TAG: "genai_development"}
    )
    experiment_id(client, OmegaConf.create({"experiment": "chosen"}), uri)
    assert client.get_experiment(chosen).tags[schema.EXPERIMENT_KIND_TAG] == "genai_development"


def test_the_run_logs_only_what_the_schema_describes(logged) -> None:
    client, run = logged
    level = run.data.params["evaluation.decision_level"]
    splits = {"split": ("test", "final_val"), "level": (schema.level_infix(level),)}
    assert schema.undescribed(run.data.metrics, schema.METRICS, **splits) == []
    assert len(run.data.metrics) < 100, sorted(run.data.metrics)
    assert schema.undescribed(run.data.tags, schema.RUN_TAGS) == []
    top = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "reports" in top and schema.undescribed(top, schema.ARTIFACTS) == []
    reports = [a.path for a in client.list_artifacts(run.info.run_id, "reports")]
    assert f"reports/{schema.METRICS_TABLE}" in reports


def test_the_readers_keys_are_logged(logged) -> None:
    """What promote's checklist, her2exp-compare and the sweep callback read: a run logged now
    stays promotable and comparable."""
    _, run = logged
    m, params = run.data.metrics, run.data.params
    level, op, key = registry.decision_metric(params)
    read = {key, f"{key}_low", "best_val_auc", "best_epoch", *compare.METRICS}
    prefix = f"test_{schema.level_infix(level)}"
    read |= {prefix + name.format(op=op) for name in compare.AT_DECISION.values()}
    assert read - set(m) == set()
    assert registry.sensitivity_check(params, m).evidence.startswith(f"{key} = ")


def test_the_table_holds_every_number_under_its_former_key(logged, smoke_run: SmokeRun) -> None:
    _, run = logged
    table = pd.read_csv(smoke_run.run_dir / "reports" / schema.METRICS_TABLE)
    parts = ["split", "level", "site", "operating_point"]
    table[parts] = table[parts].astype(object).fillna("")
    assert not table["metric"].duplicated().any()
    values = dict(zip(table["metric"], table["value"].astype(float), strict=True))
    for key, value in run.data.metrics.items():  # every split metric logged is in the table
        if key.startswith(("test_", "final_val_")) and key != "test_loss":
            assert values[key] == pytest.approx(value, nan_ok=True), key
    best = json.loads((smoke_run.run_dir / "reports" / "best.json").read_text())
    slide = best["splits"]["test"]["slide"]["reports"]["youden"]
    row = table[table["metric"] == "test_slide_youden_npv"].iloc[0]
    assert (row["split"], row["level"], row["operating_point"], row["statistic"]) == (
        "test",
        "slide",
        "youden",
        "npv",
    )
    assert float(row["value"]) == pytest.approx(slide["npv"], nan_ok=True)
    assert "test_slide_youden_npv" not in run.data.metrics
    sites = table[table["site"] != ""]
    assert set(sites["metric"]) and not set(sites["metric"]) & set(run.data.metrics)
    frozen = table[table["metric"] == "threshold_patient_youden_val"].iloc[0]
    assert float(frozen["value"]) == pytest.approx(best["thresholds"]["patient"]["youden"])


def test_headline_keeps_the_decision_level_and_the_tile_auc() -> None:
    flat = {
        f"test_{infix}{stat}": 0.5
        for infix in ("", "slide_", "patient_")
        for stat in ("auc", "auc_low", "youden_sensitivity", "youden_npv", "p50_sensitivity")
    }
    kept = schema.headline(flat, ["test_"], "slide", ["youden"])
    assert set(kept) == {"test_auc", "test_auc_low", "test_slide_auc", "test_slide_auc_low",
                         "test_slide_youden_sensitivity"}  # fmt: skip
    # A level without frozen points (a checkpoint from before levels): its AUCs still go.
    assert set(schema.headline(flat, ["test_"], "patient", [])) == {
        "test_auc",
        "test_auc_low",
        "test_patient_auc",
        "test_patient_auc_low",
    }
