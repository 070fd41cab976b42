"""Issue 20, item 4: `her2exp-promote` sets a registered model's alias only after the version's
checklist passed (or with force=true, recorded on the version), and `her2exp-predict
model_uri=models:/NAME@alias` scores with the run the alias names (her2exp/tracking/registry.py).

Every test works on a COPY of the smoke run's MLflow store (its artifact paths are absolute, so
the copy still finds best.pt and the logged model): versions are registered there, never in the
session's own store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image

from conftest import SmokeRun, copy_store
from her2exp.cli.common import compose
from her2exp.config import ConfigError
from her2exp.data import synthetic
from her2exp.tracking import registry

NAME = "her2"


@dataclass
class Registry:
    uri: str
    client: object
    real: str  # the version registered from the smoke run
    strict: str  # a version whose run asked for a sensitivity above what its test split gave
    strict_run: str


def _mirror_run(client, smoke, target: float, op: str) -> str:
    """A finished run in the copy with the smoke run's metrics and params, but trained for a
    stricter target (or another operating point): its checklist must fail on sensitivity."""
    run = client.create_run(smoke.info.experiment_id, run_name="stricter target")
    rid = run.info.run_id
    from mlflow.entities import Metric, Param

    params = {**smoke.data.params, "evaluation.target_sensitivity": f"{target:.6f}"}
    params["evaluation.operating_point"] = op
    metrics = [Metric(k, v, 0, 0) for k, v in smoke.data.metrics.items()]
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()], metrics=metrics)
    client.set_terminated(rid, "FINISHED")
    return rid


@pytest.fixture(scope="module")
def store(smoke_run: SmokeRun, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    import mlflow

    folder = tmp_path_factory.mktemp("registry")
    copy_store(smoke_run.cwd / "mlflow.db", folder / "copy.db")
    uri = f"sqlite:///{folder / 'copy.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    smoke = client.get_run(smoke_run.run_id)
    model_id = smoke.outputs.model_outputs[0].model_id  # the run's logged model (`model`)
    client.create_registered_model(NAME)
    # The logged model's own location: a `models:/<id>` source would be looked up through
    # MLflow's global tracking URI, which another test of the session may have set.
    source = client.get_logged_model(model_id).artifact_location

    def version(run_id: str) -> Any:
        return client.create_model_version(NAME, source, run_id=run_id, model_id=model_id)

    real = version(smoke_run.run_id)
    # The operating point with the lowest test sensitivity, and a target just above it.
    sens = {
        op: smoke.data.metrics[f"test_{op}_sensitivity"]
        for op in ("youden", "sens90", "sens90_lcb", "p50")
        if f"test_{op}_sensitivity" in smoke.data.metrics
    }
    op = min(sens, key=sens.get)
    assert sens[op] < 0.98, f"the smoke run catches every test positive at every point: {sens}"
    strict_run = _mirror_run(client, smoke, (sens[op] + 1) / 2, op)
    strict = version(strict_run)
    return Registry(uri, client, real.version, strict.version, strict_run)


def promote_cfg(store: Registry, *args: str):
    return compose("promote", [f"name={NAME}", f"tracking.uri={store.uri}", *args])


def refused(cfg, capsys) -> str:
    from her2exp.cli.promote import main

    with pytest.raises(SystemExit) as info:
        main(cfg)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("her2exp: ") and err.count("\n") == 1, err
    return err


# -- model URIs ----------------------------------------------------------------------------------
def test_model_uris_are_parsed_or_refused_in_one_line() -> None:
    assert registry.parse_model_uri("models:/her2@champion") == registry.ModelRef(
        "alias", "her2", "champion"
    )
    assert registry.parse_model_uri("models:/team/her2/3").kind == "version"
    assert registry.parse_model_uri("runs:/abc123/model") == registry.ModelRef("run", "abc123")
    for bad in ("her2", "models:/her2", "models:/her2/0", "models:/@x", "runs:/a/other", "s3://x"):
        with pytest.raises(ConfigError, match=r"model_uri=.* is not allowed \(models:/NAME@ALIAS"):
            registry.parse_model_uri(bad)
    with pytest.raises(ConfigError, match="give exactly one of .*model_uri"):
        from her2exp.config import commands as schemas

        schemas.validate_only("predict", ["input=.", "run_id=x", "model_uri=models:/a@b"])


# -- the checklist -------------------------------------------------------------------------------
def test_the_sensitivity_check_reads_the_runs_frozen_decision_point(smoke_run, store) -> None:
    run = store.client.get_run(smoke_run.run_id)
    params, metrics = dict(run.data.params), dict(run.data.metrics)
    op, level = params["evaluation.operating_point"], params["evaluation.decision_level"]
    key = f"test_{'' if level == 'tile' else level + '_'}{op}_sensitivity"
    value, target = metrics[key], float(params["evaluation.target_sensitivity"])
    check = registry.sensitivity_check(params, metrics)
    assert check.passed == (value >= target) and f"{key} = {value:.4f}" in check.evidence
    for moved, passes in ((value - 0.01, True), (value + 0.01, False)):
        if 0 < moved < 1:
            shifted = {**params, "evaluation.target_sensitivity": str(moved)}
            assert registry.sensitivity_check(shifted, metrics).passed is passes
    patient = {**params, "evaluation.decision_level": "patient"}
    assert f"test_patient_{op}_sensitivity" in registry.sensitivity_check(patient, metrics).evidence
    missing = registry.sensitivity_check(params, {k: v for k, v in metrics.items() if k != key})
    assert not missing.passed and "was not logged" in missing.evidence


def test_a_version_below_its_target_is_refused_and_nothing_changes(store, capsys) -> None:
    err = refused(promote_cfg(store, f"version={store.strict}"), capsys)
    run = store.client.get_run(store.strict_run)
    op = run.data.params["evaluation.operating_point"]
    value = run.data.metrics[f"test_{op}_sensitivity"]
    assert f"version {store.strict} of '{NAME}'" in err and "is not promoted to 'champion'" in err
    assert f"test_{op}_sensitivity = {value:.4f}" in err and "force=true" in err
    assert "champion" not in store.client.get_registered_model(NAME).aliases
    assert not store.client.get_model_version(NAME, store.strict).tags


def test_force_promotes_it_and_records_why_on_the_version(store, capsys) -> None:
    from her2exp.cli.promote import main

    reason = "accepted by the review board: one site only"
    main(
        promote_cfg(
            store, f"version={store.strict}", "alias=staging", "force=true", f"reason='{reason}'"
        )
    )
    assert "WITH FORCE" in capsys.readouterr().out
    assert store.client.get_model_version_by_alias(NAME, "staging").version == store.strict
    tags = store.client.get_model_version(NAME, store.strict).tags
    assert tags["her2exp.promoted_with_force"] == "true" and tags["her2exp.force_reason"] == reason
    assert tags["her2exp.checklist"] == "FAIL" and tags["her2exp.promoted_alias"] == "staging"
    assert tags["her2exp.check.1"].startswith("PASS: training run finished")
    assert tags["her2exp.check.2"].startswith("FAIL: test sensitivity at")


def test_unknown_names_and_versions_are_refused_naming_what_exists(store, capsys) -> None:
    err = refused(
        compose("promote", ["name=nope", "version=1", f"tracking.uri={store.uri}"]), capsys
    )
    assert "name='nope': no registered model" in err and NAME in err
    err = refused(promote_cfg(store, "version=99"), capsys)
    assert "version=99" in err and f"versions: {store.real}, {store.strict}" in err
    with pytest.raises(ConfigError, match="alias="):
        from her2exp.config import commands as schemas

        schemas.check_promote(promote_cfg(store, "version=1", "alias='a b'"))


def test_predict_through_the_promoted_alias_scores_as_the_run_id(
    smoke_run, store, tmp_path, capsys
):
    """The real version: promoted (with force only if its checklist fails, judged from the run's
    own numbers), then predict with models:/her2@champion equals predict with run_id=."""
    from her2exp.cli.predict import main as predict
    from her2exp.cli.promote import main

    run = store.client.get_run(smoke_run.run_id)
    passes = all(c.passed for c in registry.checklist(run))
    main(promote_cfg(store, f"version={store.real}", f"force={str(not passes).lower()}"))
    tags = store.client.get_model_version(NAME, store.real).tags
    assert tags["her2exp.checklist"] == ("PASS" if passes else "FAIL")
    assert ("her2exp.promoted_with_force" in tags) is (not passes)
    assert registry.resolve_model_uri(f"models:/{NAME}@champion", store.uri) == smoke_run.run_id
    assert registry.resolve_model_uri(f"models:/{NAME}/{store.real}", store.uri) == smoke_run.run_id

    folder = tmp_path / "patches"
    folder.mkdir()
    data = synthetic.generate(n_patients=2, patches_per_patient=2, image_size=32, seed=3)
    for i, image in enumerate(data.images):
        Image.fromarray(image).save(folder / f"p{i}.png")
    tables = {}
    for name, source in (
        ("alias", f"model_uri=models:/{NAME}@champion"),
        ("run", f"run_id={smoke_run.run_id}"),
    ):
        out = tmp_path / f"{name}.csv"
        predict(
            compose(
                "predict", [source, f"input={folder}", f"out={out}", f"tracking.uri={store.uri}"]
            )
        )
        tables[name] = pd.read_csv(out)
    pd.testing.assert_frame_equal(tables["alias"], tables["run"])
    assert len(tables["alias"]) == len(data.images)
    with pytest.raises(SystemExit):
        predict(
            compose(
                "predict",
                [
                    f"model_uri=models:/{NAME}@nobody",
                    f"input={folder}",
                    f"out={tmp_path / 'x.csv'}",
                    f"tracking.uri={store.uri}",
                ],
            )
        )
    err = capsys.readouterr().err
    assert "has no alias 'nobody'" in err and "champion" in err, err
    assert not Path(tmp_path / "x.csv").exists()
