"""The MLflow model registry as her2exp uses it: which training run a `models:/` URI names, and
the checklist a registered version passes before an alias (`champion`) points at it (the
library part of `her2exp-promote`, her2exp/cli/promote.py; `her2exp-predict model_uri=...`).

An alias is what a service loads (`models:/her2@champion`), so moving it is a release: the
version's training run must have finished and its test sensitivity at the run's own frozen
decision point (`evaluation.operating_point` at `evaluation.decision_level`, the metric
`test_[<level>_]<op>_sensitivity` that evaluation logged) must reach the run's
`evaluation.target_sensitivity`. A version that fails is refused in one line unless
`force=true`, which is recorded on the version (`her2exp.promoted_with_force`, the reason).
What was checked is tagged on the version when the alias is set; a refusal changes nothing.
`import mlflow` happens only when a store is opened.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Any

from her2exp.config import ConfigError, EvaluationConfig

# A model URI's and an alias's forms are checked (config) before any store is read; re-exported.
from her2exp.config.model_uri import ALIAS_RE as ALIAS_RE
from her2exp.config.model_uri import MODEL_URI_FORMS as MODEL_URI_FORMS
from her2exp.config.model_uri import ModelRef as ModelRef
from her2exp.config.model_uri import parse_model_uri
from her2exp.tracking.schema import level_infix
from her2exp.tracking.store import require_store

#: Version tags written by a promotion (the checklist's evidence, the force record).
TAG_PREFIX = "her2exp."


def _client(tracking_uri: str) -> Any:
    """An MlflowClient on a store that must already exist (a look-up never creates one)."""
    resolved = require_store(tracking_uri, lookup=True)
    import mlflow

    return mlflow.MlflowClient(tracking_uri=resolved, registry_uri=resolved)


def _missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def registered_model(client: Any, name: str, uri: str) -> Any:
    """The registered model `name`; an unknown name is one line listing some that exist."""
    import mlflow

    try:
        return client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if not _missing(exc):
            raise
        known = [m.name for m in client.search_registered_models(max_results=20)]
        listed = ", ".join(sorted(known)) if known else "none"
        raise ConfigError(
            f"name={name!r}: no registered model of that name in {uri} (registered: {listed}; "
            "register one with tracking.registered_model_name=... when training)"
        ) from exc


def model_version(client: Any, name: str, version: str | int, uri: str) -> Any:
    """Version `version` of `name`; an unknown one is one line listing the versions there are."""
    import mlflow

    registered_model(client, name, uri)
    try:
        return client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException as exc:
        if not _missing(exc):
            raise
        found = client.search_model_versions(f"name='{_quoted(name)}'")
        versions = ", ".join(str(v) for v in sorted(int(m.version) for m in found)) or "none"
        raise ConfigError(
            f"version={version}: model {name!r} has no such version (versions: {versions})"
        ) from exc


def _quoted(name: str) -> str:
    return name.replace("'", "\\'")


def version_by_alias(client: Any, name: str, alias: str, uri: str) -> Any:
    """The version `alias` points at; an unset alias is one line listing the model's aliases."""
    import mlflow

    model = registered_model(client, name, uri)
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as exc:
        if not _missing(exc):
            raise
        aliases = ", ".join(sorted(getattr(model, "aliases", {}) or {})) or "none"
        raise ConfigError(
            f"model_uri=models:/{name}@{alias}: model {name!r} has no alias {alias!r} "
            f"(aliases: {aliases}; her2exp-promote sets one)"
        ) from exc


def resolve_model_uri(model_uri: str, tracking_uri: str) -> str:
    """The training run id behind `model_uri` (an alias, a version or `runs:/ID/model`), so
    predict loads that run's best.pt (thresholds, stain, calibration) as with `run_id=`."""
    ref = parse_model_uri(model_uri)
    if ref.kind == "run":
        return ref.name
    client = _client(tracking_uri)
    if ref.kind == "alias":
        mv = version_by_alias(client, ref.name, ref.ref, tracking_uri)
    else:
        mv = model_version(client, ref.name, ref.ref, tracking_uri)
    if not mv.run_id:
        raise ConfigError(
            f"model_uri={model_uri}: version {mv.version} of {ref.name!r} names no training run "
            "(registered from outside her2exp): give run_id= or checkpoint="
        )
    return str(mv.run_id)


# -- the promotion checklist ---------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """One checklist item: passed or not, and the evidence (what a version tag records)."""

    item: str
    passed: bool
    evidence: str


def decision_metric(params: dict[str, str]) -> tuple[str, str, str]:
    """(level, operating point, metric name) of the run's frozen decision point, from its
    logged params (an old run without them: evaluation's defaults, as her2exp-eval reads it)."""
    default = EvaluationConfig()
    level = params.get("evaluation.decision_level", default.decision_level)
    op = params.get("evaluation.operating_point", default.operating_point)
    return level, op, f"test_{level_infix(level)}{op}_sensitivity"


def sensitivity_check(params: dict[str, str], metrics: dict[str, float]) -> Check:
    """Test sensitivity at the frozen decision point >= the run's target sensitivity. A missing
    or undefined value (no HER2+ in test: NaN, never logged) fails: nothing was shown."""
    level, op, key = decision_metric(params)
    target = float(
        params.get("evaluation.target_sensitivity", EvaluationConfig().target_sensitivity)
    )
    value = metrics.get(key)
    item = f"test sensitivity at {op} ({level} level) >= evaluation.target_sensitivity {target:g}"
    if value is None or not math.isfinite(float(value)):
        return Check(item, False, f"{key} was not logged (no HER2+ in test?)")
    low = metrics.get(f"{key}_low")
    ci = "" if low is None else f", 95% CI low {float(low):.4f}"
    return Check(item, float(value) >= target, f"{key} = {float(value):.4f}{ci}")


def run_check(status: str) -> Check:
    """The training run finished (a failed or killed run's numbers are not its final ones)."""
    return Check("training run finished", status == "FINISHED", f"run status {status}")


def checklist(run: Any) -> list[Check]:
    """The checklist of a version's training run (an MLflow Run)."""
    return [run_check(run.info.status), sensitivity_check(run.data.params, run.data.metrics)]


@dataclass(frozen=True)
class Promotion:
    """What `promote` did: the version the alias now names, the one it named before."""

    name: str
    version: str
    alias: str
    run_id: str
    checks: list[Check]
    forced: bool
    previous: str | None  # the version the alias pointed at before, if any


def _failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.passed]


def version_tags(checks: list[Check], alias: str, forced: bool, reason: str | None) -> dict:
    """The tags a promotion writes on the version: each item's status and evidence, when and
    to which alias, and with force the reason."""
    tags = {
        f"{TAG_PREFIX}checklist": "PASS" if not _failed(checks) else "FAIL",
        f"{TAG_PREFIX}promoted_alias": alias,
        f"{TAG_PREFIX}promoted_at": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
    }
    for i, c in enumerate(checks, 1):
        status = "PASS" if c.passed else "FAIL"
        tags[f"{TAG_PREFIX}check.{i}"] = f"{status}: {c.item}: {c.evidence}"
    if forced:
        failed = "; ".join(f"{c.item}: {c.evidence}" for c in _failed(checks))
        tags[f"{TAG_PREFIX}promoted_with_force"] = "true"
        tags[f"{TAG_PREFIX}force_reason"] = reason or f"forced past: {failed}"
    return tags


def promote(
    name: str,
    version: int | str,
    alias: str,
    tracking_uri: str,
    force: bool = False,
    reason: str | None = None,
) -> Promotion:
    """Point `alias` of registered model `name` at `version` after its checklist passed (or
    with `force`); the version is tagged with what was checked. Refused (ConfigError, nothing
    changed): an unknown name or version, a failed checklist without force."""
    client = _client(tracking_uri)
    mv = model_version(client, name, version, tracking_uri)
    if not mv.run_id:
        raise ConfigError(
            f"version={version}: version {mv.version} of {name!r} names no training run, so "
            "there is no checklist to check"
        )
    import mlflow

    try:
        run = client.get_run(mv.run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(
            f"version={version}: its training run {mv.run_id} is not in {tracking_uri}"
        ) from exc
    checks = checklist(run)
    failed = _failed(checks)
    if failed and not force:
        why = "; ".join(f"{c.item}: FAIL ({c.evidence})" for c in failed)
        raise ConfigError(
            f"version {mv.version} of {name!r} (run {mv.run_id}) is not promoted to {alias!r}: "
            f"{why}; force=true reason='...' promotes it anyway, recorded on the version"
        )
    previous = _alias_target(client, name, alias)
    try:
        client.set_registered_model_alias(name, alias, str(mv.version))
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"alias={alias!r} is refused by MLflow: {exc.message}") from exc
    for key, value in version_tags(checks, alias, bool(failed) and force, reason).items():
        client.set_model_version_tag(name, str(mv.version), key, value)
    return Promotion(name, str(mv.version), alias, mv.run_id, checks, bool(failed), previous)


def _alias_target(client: Any, name: str, alias: str) -> str | None:
    aliases = getattr(client.get_registered_model(name), "aliases", {}) or {}
    found = aliases.get(alias)
    return None if found is None else str(found)
