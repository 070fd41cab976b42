"""best.json: a run's summary as strict JSON (no NaN: `to_jsonable` turns it into null), the
file tools and later commands read back.

`RunSummary` is its typed form: the fields the fit (training/run.py `fit_summary`), the final
evaluation (training/final.py; her2exp-eval's header in evaluation/evaluate.py), the frozen
operating points (evaluation/reporting.py) and the report (reports/clinical.py) put into it.
Written in one place (`write_best_json`), read back in one (`RunSummary.read`), so the model card
and later commands do not each parse the dict their own way. The file itself is unchanged: the
same keys in the same order, so tools and users that read the JSON keep working.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from her2exp.core.fileio import atomic_write_text
from her2exp.metrics import to_jsonable

#: Values stored under `metrics` when read back: the flat `<split>_<metric>` numbers.
_SCALARS = (int, float, bool, type(None))


@dataclass
class RunSummary:
    """best.json, field for field. A field a file lacks (written by an older her2exp, or by a
    command that does not set it: her2exp-eval has no fit) is None and is not written back."""

    # the fit (training/run.py fit_summary)
    model: str | None = None
    best_epoch: int | None = None
    last_epoch: int | None = None
    best_val_auc: float | None = None
    threshold_youden_val: float | None = None
    stopped_early: bool | None = None
    data_fingerprint: str | None = None
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    run_dir: str | None = None
    nonfinite_steps_skipped: int | None = None
    feature_cache: dict[str, Any] | None = None  # model.cache_features=true
    # the final evaluation (training/final.py) or her2exp-eval (evaluation/evaluate.py)
    source_run_id: str | None = None  # her2exp-eval: the scored run
    seed: int | None = None
    git_commit: str | None = None
    git_dirty: str | None = None
    test_loss: float | None = None
    mil: dict[str, Any] | None = None  # mil != none: {"name", "bag_by"}
    # the operating points frozen on val (evaluation/reporting.py)
    decision_level: str | None = None
    operating_point: str | None = None
    target_sensitivity: float | None = None
    lcb_confidence: float | None = None
    aggregation: dict[str, Any] | None = None
    thresholds: dict[str, dict[str, float]] | None = None  # keyed by level
    tta: str | None = None
    calibration: dict[str, Any] | None = None
    # the report (reports/clinical.py)
    checklist: list[dict[str, Any]] | None = None
    splits: dict[str, dict[str, Any]] | None = None  # SplitEvaluation.to_dict() per split
    figures: list[str] | None = None
    #: The flat `<split>_<metric>` numbers (`val_auc`, `test_youden_sensitivity`, ...).
    metrics: dict[str, float | None] = field(default_factory=dict)
    #: Any other key a caller put into the header (an ensemble's members, ...), kept as is.
    extra: dict[str, Any] = field(default_factory=dict)
    #: The file's keys in their order, so a summary is written back as it was read.
    keys: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        """The summary of a best.json's content (or of the dict the report assembles)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"metrics", "extra", "keys"}
        known = {k: v for k, v in data.items() if k in names}
        rest = {k: v for k, v in data.items() if k not in names}
        metrics = {k: v for k, v in rest.items() if isinstance(v, _SCALARS)}
        extra = {k: v for k, v in rest.items() if k not in metrics}
        return cls(**known, metrics=metrics, extra=extra, keys=tuple(data))

    @classmethod
    def read(cls, path: Path) -> RunSummary:
        """A best.json read back; one from an older her2exp, without the newer keys, reads too
        (those fields are None)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        """best.json's content: the keys in the order read (then any field set since)."""
        values = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("metrics", "extra", "keys")
        }
        values.update(self.metrics)
        values.update(self.extra)
        order = list(self.keys) + [k for k in values if k not in self.keys]
        return {
            k: values[k] for k in order if k in values and (values[k] is not None or k in self.keys)
        }

    def write(self, path: Path) -> Path:
        """Write this summary as best.json (atomically: `write_best_json`)."""
        return write_best_json(path, self)


def write_best_json(path: Path, summary: RunSummary | dict[str, Any]) -> Path:
    """Write `summary` as best.json, atomically: NaN/inf become null, so any JSON reader takes
    the file. The one writer of best.json."""
    content = summary.to_dict() if isinstance(summary, RunSummary) else summary
    return atomic_write_text(
        path, json.dumps(to_jsonable(content), indent=2, sort_keys=False, allow_nan=False) + "\n"
    )
