"""One name per concept across the commands, and the old spellings that still work.

Why: the same thing had several names (the input was `data.root`, `input=`, `slide_table=`,
`root=`, `run_dir=`; "workers" meant DataLoader processes, tiling processes and server
processes; `experiment=` was a Hydra bundle in one command and an MLflow experiment in another),
so what a user learnt on one command misled them on the next. The rules (docs/names.md):

- the input: `data.*` where a command composes training's data config (train, eval, prepare),
  `input=` where it takes one file, folder or table;
- the output: `out=` for what a command writes, `hydra.run.dir` only for run directories;
- which trained model: `run_id=`, `checkpoint=`, `sweep_run_id=` or `model_uri=`, the same keys
  wherever a command takes one;
- `tracking.experiment` for the MLflow experiment everywhere (`experiment=` is train's bundle);
- `num_workers` only for DataLoader worker processes; other pools are `processes`;
- `tta=` for the views a command scoring a trained run averages (eval, predict, export).

`RENAMED` maps each command's old spellings to the new keys. A command line (and `compose`)
rewrites an old one before anything is composed, with one warning naming the new key; each
keeps working until a CHANGELOG entry removes it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

#: command -> {old key: new key}. Removing an entry is a breaking change: CHANGELOG.md says when.
RENAMED: dict[str, dict[str, str]] = {
    "tile": {"slide_table": "input", "tiles.workers": "tiles.processes"},
    "manifest": {"root": "input"},
    "sync": {"run_dir": "input"},
    "server": {"dir": "out", "workers": "processes"},
    "compare": {"experiment": "tracking.experiment"},
    "predict": {"output": "out"},
    "eval": {"evaluation.tta": "tta"},
    "rerun": {"output_dir": "out"},
}

_PREFIXES = ("++", "+", "~")


def renamed(command: str, overrides: Iterable[str]) -> tuple[list[str], list[str]]:
    """(the overrides with old keys replaced by their new names, a note per replacement)."""
    table = RENAMED.get(command, {})
    out, notes = [], []
    for override in overrides:
        prefix = next((p for p in _PREFIXES if override.startswith(p)), "")
        body = override[len(prefix) :]
        key, sep, value = body.partition("=")
        new = table.get(key)
        if new is None or (not sep and prefix != "~"):
            out.append(override)
            continue
        out.append(f"{prefix}{new}{sep}{value}")
        notes.append(
            f"{key}= is an old name in her2exp-{command}: write {new}= (the old one works until "
            "the CHANGELOG says it is removed)"
        )
    return out, notes


def apply(command: str, overrides: Iterable[str]) -> list[str]:
    """`renamed`, each note printed once on stderr as a warning."""
    new, notes = renamed(command, overrides)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        for note in notes:
            print(f"her2exp: warning: {note}", file=sys.stderr, flush=True)
    return new
