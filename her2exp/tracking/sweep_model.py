"""The one model of a sweep: what a child is (`SweepChild`), what kind of sweep its children make
(`sweep_kind`: cv, repeat, leaderboard or plain), and why a sweep is not an ensemble
(`not_an_ensemble`).

Both views of a sweep give the same record: MLflow (`tracking.sweep.finished_children`: a child
run's params, which are its resolved config flattened, `mlflow_tracker._params`) and the run
directories (`children_on_disk`: each job's config_resolved.yaml, flattened and stringified the
same way by `audit.as_params`). The kind is decided on those strings alone, so the Hydra
callback's summary (evaluation.crossval) and `her2exp-eval sweep_run_id=` (evaluation.ensemble)
can never disagree about one sweep. Pure: no MLflow here, only files on disk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from omegaconf import OmegaConf

from her2exp.runtime.rundir import RunDir
from her2exp.tracking.audit import as_params, flatten
from her2exp.tracking.offline import read_run_file

CV, REPEAT, LEADERBOARD, PLAIN = "cv", "repeat", "leaderboard", "plain"
#: Keys that differ between the jobs of any sweep and say nothing about the experiment.
JOB_KEYS = ("output_dir", "tracking.run_name")
#: Keys a repeat sweep may vary (the seeds); split and data seeds only with a warning.
SEED_KEYS = ("seed", "data.split_seed", "data.data_seed")
#: Keys a cross-validation sweep varies (which fold is held out).
FOLD_KEYS = ("data.split.fold",)
#: How a config value that was null reads once stringified (as MLflow params hold it).
UNSET = ("", "None", "null")


class HasParams(Protocol):
    """Anything that carries a child's flattened config as strings (a SweepChild, or
    evaluation.sweep_children.Child, which holds one)."""

    @property
    def params(self) -> Mapping[str, str]: ...


C = TypeVar("C", bound=HasParams)


@dataclass(frozen=True)
class SweepChild:
    """One finished job of a sweep, as MLflow or its run directory records it: the job number,
    the MLflow run id ('' when untracked), the flattened config as strings (MLflow's params),
    and the job's run directory when it is known on this machine."""

    job: int
    run_id: str
    params: Mapping[str, str] = field(default_factory=dict)
    run_dir: Path | None = None

    @property
    def fold(self) -> int | None:
        """The held-out fold (`data.split.fold`), None outside cross-validation."""
        return fold_of(self)


def fold_of(child: HasParams) -> int | None:
    """A child's `data.split.fold`, None when unset."""
    value = child.params.get("data.split.fold")
    return None if value is None or value in UNSET else int(value)


def _probe(child: HasParams) -> str:
    value = child.params.get("probe.name")
    return "none" if value is None or value in UNSET else value


def differing_keys(children: Sequence[HasParams]) -> list[str]:
    """The config keys whose values differ between the children (job keys left out), sorted;
    a key one child lacks differs."""
    keys = set().union(*(c.params for c in children)) - set(JOB_KEYS)
    return sorted(k for k in keys if len({c.params.get(k) for c in children}) > 1)


def repeat_groups(children: Sequence[C]) -> list[list[C]]:
    """The children grouped by everything but the seeds (and the job keys): each group is a
    repeat of one setting, in the order of its first job."""
    groups: dict[tuple, list[C]] = {}
    skip = SEED_KEYS + JOB_KEYS
    for c in children:
        key = tuple(sorted(kv for kv in c.params.items() if kv[0] not in skip))
        groups.setdefault(key, []).append(c)
    return list(groups.values())


def sweep_kind(children: Sequence[HasParams]) -> str:
    """The one classification of a sweep. `cv` when the children differ in data.split.fold,
    `repeat` when they differ in the seeds only, `leaderboard` when every child is a probe run
    (`probe.name` set: experiment=fm_probe) or when they fall into several groups that differ
    in the seeds only within and one group at least repeats (backbone x seed), else `plain` (a
    grid, an optimiser, or fewer than two children: the best-of summary only)."""
    if len(children) < 2:
        return PLAIN
    if len({fold_of(c) for c in children}) > 1:
        return CV
    if all(_probe(c) != "none" for c in children):
        return LEADERBOARD  # a probe sweep, even of one backbone x protocol
    differing = set(differing_keys(children))
    if differing and differing <= set(SEED_KEYS):
        return REPEAT
    groups = repeat_groups(children)
    return LEADERBOARD if len(groups) > 1 and max(map(len, groups)) > 1 else PLAIN


def not_an_ensemble(children: Sequence[HasParams]) -> str | None:
    """Why these children cannot be averaged as one model (None when they can: a cv or a
    repeat sweep, or a single child). Members of an ensemble differ in their seeds or their
    held-out fold only; anything else is a comparison of settings, and its mean is no model
    anyone trained."""
    kind = sweep_kind(children)
    if kind in (CV, REPEAT) or len(children) == 1:
        return None
    other = [k for k in differing_keys(children) if k not in SEED_KEYS + FOLD_KEYS]
    if other:
        shown = ", ".join(other[:3]) + (f" (+{len(other) - 3} more)" if len(other) > 3 else "")
        return (
            f"its children differ in {shown}, not only in seeds or folds: a "
            f"hyper-parameter grid ({kind} sweep), not an ensemble"
        )
    if kind == LEADERBOARD:
        return "its children are probe runs (a leaderboard sweep), not an ensemble"
    return "its children differ in nothing, not even their seeds: not an ensemble"


def job_config(run_dir: Path) -> dict[str, Any] | None:
    """A job's config flattened to dotted keys: its config_resolved.yaml, else Hydra's copy
    (a job that died before writing its own); None for a folder with neither."""
    for path in (RunDir(run_dir).config_resolved, RunDir(run_dir).hydra_config):
        if path.is_file():
            container = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            return flatten(container)  # type: ignore[arg-type]
    return None


def _run_id_on_disk(run_dir: Path) -> str:
    """The MLflow run id a job recorded in its folder (mlflow_run.json); '' when untracked."""
    return str((read_run_file(run_dir) or {}).get("run_id") or "")


def children_on_disk(sweep_dir: Path) -> list[SweepChild]:
    """The sweep's children from its run directories (`<sweep_dir>/<job_num>` with a config),
    in job order: the view when tracking is off, or where MLflow is not asked."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    jobs = sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    found = []
    for run_dir in jobs:
        config = job_config(run_dir)
        if config is not None:  # stringified as MLflow holds params
            run_id = _run_id_on_disk(run_dir)
            found.append(SweepChild(int(run_dir.name), run_id, as_params(config), run_dir))
    return found
