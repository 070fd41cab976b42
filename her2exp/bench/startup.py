"""Seconds from a typo on the command line to its answer: `her2exp-train trainer.epoch=3`.

A misspelt key is answered before Hydra composes anything and before torch, timm or mlflow are
imported (her2exp.config.keys.check_overrides); this times the whole process, interpreter start
included, against a bare `python -c pass`, so the ratio shows what her2exp adds. The goal: under
2 s. Run: ``python -m her2exp.bench.startup``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

TYPO = ["-m", "her2exp.cli.train", "trainer.epoch=3"]


def seconds(args: list[str], cwd: str) -> tuple[float, int]:
    """Wall time and exit status of `python <args>` (one thread: as the tests run it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True)
    return time.perf_counter() - start, done.returncode


def main(repeats: int = 5) -> dict[str, float]:
    """Best of `repeats` for the typo and for the bare interpreter; prints one line."""
    with tempfile.TemporaryDirectory() as cwd:  # a refused command writes nothing: checked
        typo = min(seconds(TYPO, cwd) for _ in range(repeats))
        bare = min(seconds(["-c", "pass"], cwd) for _ in range(repeats))
        left = os.listdir(cwd)
    out = {"typo_seconds": typo[0], "bare_seconds": bare[0], "ratio": typo[0] / bare[0]}
    print(
        f"bench: her2exp-train trainer.epoch=3 answered in {typo[0]:.2f} s (exit {typo[1]}; "
        f"goal < 2 s) vs python -c pass {bare[0]:.2f} s (x{out['ratio']:.0f}; best of "
        f"{repeats}){'; LEFT FILES: ' + ', '.join(left) if left else ''}"
    )
    return out


if __name__ == "__main__":
    main()
