"""The output the README and Getting started show is the shape a run prints (issue 33).

The README's sample of `make train` had drifted from what the command prints. Each line of the
pages' sample (numbers, run ids and paths aside) must be a line the session's smoke run printed:
a changed message or table layout fails here until the pages show the new one.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import SmokeRun

REPO = Path(__file__).resolve().parents[2]
SAMPLES = ["README.md", "docs/getting-started.md"]
_TOKEN = re.compile(
    r"(?<=^ site )\S+|[0-9a-f]{32}|sqlite:\S+|/\S+|(?<![\w.])(?:-?\d+(?:\.\d+)?|nan)(?![\w])"
)


def sample(page: str) -> list[str]:
    """The lines of the page's ```text block that starts with `her2exp: best val AUC`."""
    text = (REPO / page).read_text(encoding="utf-8")
    match = re.search(r"```text\n(her2exp: best val AUC.*?)\n```", text, re.S)
    assert match, f"{page}: no sample of a run's output"
    return [ln for ln in match.group(1).splitlines() if not ln.startswith("(")]


def shape(line: str) -> str:
    """A printed line with its numbers (NaN too: a toy run's one-class slide), run ids, paths and site names
    (a toy run has fewer sites) replaced by `#`."""
    return _TOKEN.sub("#", line.rstrip())


def test_shape_ignores_only_the_values() -> None:
    assert shape("her2exp: best val AUC 0.9669 at epoch 4") == "her2exp: best val AUC # at epoch #"
    assert shape("her2exp: run directory /a/b/01-25-35") == "her2exp: run directory #"
    assert shape("her2exp: best val AUC 0.9 at epoch 4") != shape("her2exp: best AUC 0.9 at 4")


@pytest.mark.parametrize("page", SAMPLES)
def test_the_sample_is_what_a_run_prints(page: str, smoke_run: SmokeRun) -> None:
    printed = {shape(line) for line in smoke_run.stdout.splitlines()}
    lines = sample(page)
    assert len(lines) >= 5
    stale = [line for line in lines if shape(line) not in printed]
    assert not stale, f"{page}: lines a run no longer prints (rerun make train and paste):\n" + (
        "\n".join(stale)
    )
