"""`her2exp-train` with test-only pause points, so a test can kill or signal it at an exact place.

HER2EXP_TEST_PAUSE lists points: `train:E:S` (before training batch S of epoch E), `eval:E`
(before the first validation batch of epoch E) or `ckpt:E` (half-way through writing last.pt of
epoch E: half of the bytes are in the temporary file). At a point the process writes its pid to
`<HER2EXP_TEST_MARKER>.<point>` and waits (at most 10 min) for `<that file>.go`. A point fires
once per marker (a process restarted by torchrun does not pause again) and, with
HER2EXP_TEST_PAUSE_RANK, only on that rank. What the test then does to the process (SIGKILL,
SIGTERM, a file-size limit, stopping the MLflow server) is real; nothing else is changed.
"""

from __future__ import annotations

import io
import os
import time

import torch

from her2exp.cli.train import main
from her2exp.engine import Preprocess
from her2exp.training.trainer import Trainer

POINTS = [p for p in os.environ.get("HER2EXP_TEST_PAUSE", "").split(",") if p]
MARKER = os.environ.get("HER2EXP_TEST_MARKER", "")
RANK = os.environ.get("RANK", "0")


def pause(point: str) -> None:
    if point not in POINTS or os.environ.get("HER2EXP_TEST_PAUSE_RANK", RANK) != RANK:
        return
    base = f"{MARKER}.{point.replace(':', '_')}"
    if os.path.exists(base):
        return
    with open(base + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(base + ".tmp", base)
    deadline = time.monotonic() + 600
    while not os.path.exists(base + ".go") and time.monotonic() < deadline:
        time.sleep(0.02)


_preprocess = Preprocess.__call__
_end_of_epoch = Trainer._end_of_epoch


_train_calls: dict[int, int] = {}  # epoch -> training batches preprocessed so far


def preprocess(self, x, train=False, epoch=0, index=None):
    if train:
        step = _train_calls.get(epoch, 0)
        _train_calls[epoch] = step + 1
        pause(f"train:{epoch}:{step}")
    return _preprocess(self, x, train, epoch, index)


def end_of_epoch(self, epoch, stats):
    pause(f"eval:{epoch}")  # before the first validation batch
    return _end_of_epoch(self, epoch, stats)


_save = torch.save


def save(obj, f, *args, **kwargs):
    point = f"ckpt:{obj.get('epoch')}" if isinstance(obj, dict) and "optimizer" in obj else None
    if point in POINTS and hasattr(f, "write"):
        buf = io.BytesIO()
        _save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        pause(point)
        f.write(data[len(data) // 2 :])
        return None
    return _save(obj, f, *args, **kwargs)


if POINTS:
    Preprocess.__call__ = preprocess
    Trainer._end_of_epoch = end_of_epoch
    torch.save = save

if __name__ == "__main__":
    main()
