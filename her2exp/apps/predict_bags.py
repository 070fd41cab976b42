"""`her2exp-predict` with a MIL run: tiles embedded by the run's frozen backbone, grouped into
the run's bags (`data.bag_by`), each bag scored once by its head and called at the frozen
thresholds of the decision level; every tile row carries its bag, its attention and the bag's
call, and the per-bag (per-slide or per-patient) table comes back beside it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from her2exp import metrics
from her2exp.apps.predictions import Predictions, call
from her2exp.config import ConfigError
from her2exp.data.bags import attention, bag_by, bag_rows, group_bags
from her2exp.evaluation.bags import bag_loader
from her2exp.evaluation.scorer import Scorer


def check_bag_run(run: Any, members: list[Any], tta: str | None) -> None:
    """What predict cannot do with bags: an ensemble of MIL runs, TTA views."""
    if len(members) > 1:
        raise ConfigError("sweep_run_id=: an ensemble of mil runs is not supported; give run_id=")
    if (tta or run.tta) != "none":
        raise ConfigError(f"tta={tta}: none for a mil run (a bag holds one embedding per tile)")


def predict_bags(
    run: Any,
    scorer: Scorer,
    level: str,
    thresholds: dict[str, float],
    tiles: pd.DataFrame,
    embedded: torch.Tensor,
    errors: list[tuple[str, str]],
) -> Predictions:
    """Predictions of bags: `tiles` (slide_id, patient_id, ...) in `embedded`'s order."""
    if tiles.empty:
        return Predictions(tiles, errors, level)
    rows = tiles.assign(label=0).reset_index(drop=True)  # labels are unknown here
    try:
        bags = group_bags(rows, bag_by(run.cfg))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    loader = bag_loader(embedded, bags, int(run.cfg.mil.batch_size), scorer.device)
    probs = scorer.for_features().score(loader).probs
    weights = attention(scorer.model.head, loader, scorer.device)
    table = bag_rows(rows, bags).drop(columns="label")
    for column in ("slide_id", "patient_id"):
        if column in table:
            table[column] = table[column].astype(str)
    table["prob_her2_pos"] = probs
    called = call(run, level, thresholds, table, None, errors)
    per_bag = called.tiles.set_index("bag_id")
    positions = np.concatenate(bags.members)
    out = rows.iloc[positions].drop(columns="label").reset_index(drop=True)
    out.insert(0, "row", positions)  # the tile's row in the input (tile manifest or files)
    out["bag_id"] = np.repeat(bags.ids, [len(m) for m in bags.members])
    out["attention"] = weights
    keep = ["prob_her2_pos", *[c for c in per_bag if c.startswith(metrics.CALLED_PREFIX)]]
    for column in keep:
        out[column] = per_bag.loc[out["bag_id"], column].to_numpy()
    return Predictions(out, errors, level, called.groups)
