"""Progress bars: the one place tqdm is drawn, so one switch rules every bar.

A step that can take minutes (training batches, feature caching, scoring a cohort, slide
prediction, heatmaps, tiling, the export check, CV pooling, an ensemble's members) wraps its
loop in `bar`; a ViT-g over a real cohort runs for hours, and without a bar nothing says how far
it got. The rules live here, not at each call:

- **Rank 0 only** (torch.distributed's rank once a process group exists, else `RANK` as torchrun
  and `trainer.nproc_per_node` set it): N ranks drawing N interleaved bars is noise.
- **stderr only**: commands print their results on stdout, which scripts and tests parse.
- **One switch**: `HER2EXP_PROGRESS=0` (or off, false, no) turns every bar of every command off,
  without a key in any command's schema; `trainer.progress=false` does the same for a training
  run (`quiet` around it, training.run.train). Unset, or any other value: bars on.
- **A terminal** (stderr a TTY) gets tqdm's live bar. **A log** (SLURM, nohup, CI: stderr not a
  TTY) gets plain lines, no carriage returns or cursor moves: at most one line a minute per bar,
  and only for a step that has already run a minute (`LOG_INTERVAL_S`, tqdm's `delay` and
  `mininterval`). So a log shows where an hours-long step stands without a line per batch, and
  a step of seconds (every step of the test suite) writes nothing into it.

core holds it (not runtime) so that every floor can draw one: reports' attention heatmaps and
the slides below runtime too. It needs no torch: the rank comes from `sys.modules`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

#: The environment variable that turns every bar off (`0`, `off`, `false`, `no`).
ENV = "HER2EXP_PROGRESS"
OFF_VALUES = frozenset({"0", "off", "false", "no"})
#: In a log: no line before a step has run this long, and at most one line per this many s.
LOG_INTERVAL_S = 60.0
#: A log line: no bar graphic (it is one line of many), the counts, the time and the rate.
LOG_FORMAT = (
    "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)
LOG_FORMAT_OPEN = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"  # no total known: no % or ETA
_CONTROL = re.compile(r"\r|\x1b\[[0-9;]*[A-Za-z]")  # carriage returns, cursor moves
_QUIET: list[bool] = []  # `quiet` blocks now open, innermost last


def rank() -> int:
    """This process's rank: the process group's when one exists (torch is never imported here
    for it), else `RANK` (0 outside a launcher)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0") or 0)


def enabled() -> bool:
    """Whether a bar is drawn now: rank 0, `HER2EXP_PROGRESS` not off, no `quiet` block."""
    if any(_QUIET) or os.environ.get(ENV, "1").strip().lower() in OFF_VALUES:
        return False
    return rank() == 0


@contextlib.contextmanager
def quiet(when: bool = True) -> Iterator[None]:
    """Every bar off inside the block when `when` (trainer.progress=false around a training
    run); a block, not a global, so an in-process sweep's next run or a later command in the
    same process gets its own setting back."""
    _QUIET.append(bool(when))
    try:
        yield
    finally:
        _QUIET.pop()


class _LogLines:
    """tqdm's output for a log: each refresh one line of its own, without the carriage returns
    and cursor moves that redraw a bar on a terminal (a log keeps every byte of them)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> None:
        line = _CONTROL.sub("", text).strip()
        if line:
            self.stream.write(line + "\n")
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


def bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: float | None = None,
    unit: str = "it",
    leave: bool = True,
    show: bool = True,
) -> tqdm:
    """A tqdm over `iterable` (or, without one, a bar `update`d by hand up to `total`), drawn on
    stderr by the rules above; a disabled tqdm (iterates, updates, draws nothing) when they
    say no or the caller does (`show=False`: a benchmark's own loop). `leave=False`: the bar is
    cleared when done (the per-epoch bars of training)."""
    stream = sys.stderr
    if not (show and enabled()):
        return tqdm(iterable, total=total, disable=True)
    shown = {"desc": desc, "unit": unit, "leave": leave}
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, total=total, file=stream, dynamic_ncols=True, **shown)
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return tqdm(
        iterable,
        total=total,
        **shown,
        file=_LogLines(stream),
        bar_format=LOG_FORMAT if total is not None else LOG_FORMAT_OPEN,
        delay=LOG_INTERVAL_S,
        mininterval=LOG_INTERVAL_S,
        miniters=1,  # no tqdm monitor thread forcing a refresh between the minutes
    )
