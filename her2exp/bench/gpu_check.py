"""`make gpu-check`: every GPU-only check in one command, under 8 minutes on one CUDA GPU.

CI has no GPU, so the CUDA paths (fp16 + GradScaler, bf16, channels_last, torch.compile, Macenko
on the device, NCCL, cached features on the GPU) are only exercised when someone runs this on a
GPU machine. It runs, in order, each in its own process with a time limit:

1. pytest on ``tests/bench/test_gpu.py`` (the ``cuda`` marker) and ``tests/training/test_gpu_path.py`` when it
   exists (CPU tests of the GPU-path defects);
2. the CUDA bench, ``python -m her2exp.bench --cuda --skip-extras`` (resnet18, 224 px, batch
   128, amp auto, channels_last, compile off and on; her2exp / bare-loop ratios and images/s).

Without CUDA it runs what the CPU can (the CUDA tests skip) and ends with the list of every
check it skipped and why. Exit status: 0 unless a check failed or ran out of time.

    python -m her2exp.bench.gpu_check [--rounds 3] [--budget-s 480]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_FILES = ("tests/bench/test_gpu.py", "tests/training/test_gpu_path.py")
NO_CUDA = "no CUDA: torch.cuda.is_available() is false"  # as tests/bench/test_gpu.py words it
BENCH_NAME = "CUDA bench (resnet18, 224 px, batch 128, amp auto, channels_last, compile off and on)"


@dataclass
class Step:
    """One check: what ran, how it ended, and the tests it skipped (name, reason)."""

    name: str
    status: str  # passed | failed | skipped | timed out
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    detail: str = ""


def _run(cmd: list[str], timeout_s: float) -> tuple[int | None, float]:
    """Run ``cmd`` in the repository with output streamed; (exit status or None on time-out,
    seconds). On time-out its whole process group goes (pytest's spawned ranks too)."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        rc: int | None = proc.wait(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    return rc, time.perf_counter() - start


def read_junit(junit: Path) -> tuple[str, list[tuple[str, str]]]:
    """("N passed, M skipped, ..." and (test id, reason) of every skipped test) from a pytest
    JUnit XML report."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    skipped = []
    for case in ET.parse(junit).iter("testcase"):
        skip = case.find("skipped")
        if skip is not None:
            module = case.get("classname", "").rsplit(".", 1)[-1]
            skipped.append((f"{module}::{case.get('name')}", skip.get("message", "")))
            counts["skipped"] += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        else:
            counts["passed"] += 1
    return ", ".join(f"{n} {what}" for what, n in counts.items()), skipped


def run_tests(timeout_s: float) -> Step:
    """pytest on the GPU test files that exist, with skip reasons (-rs) and a JUnit report."""
    files = [f for f in TEST_FILES if (REPO / f).is_file()]
    if not files:
        return Step("GPU tests", "skipped", detail=f"none of {', '.join(TEST_FILES)} found")
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
        rc, seconds = _run([*cmd, f"--junitxml={junit}", *files], timeout_s)
        counts, skipped = read_junit(junit) if junit.is_file() else ("no report", [])
    status = "timed out" if rc is None else "passed" if rc == 0 else "failed"
    return Step(f"pytest {' '.join(files)} ({counts})", status, seconds, skipped)


def run_bench(rounds: int, timeout_s: float, cuda: bool) -> Step:
    """The CUDA bench in its own process; skipped (with the reason) without CUDA."""
    if not cuda:
        return Step(BENCH_NAME, "skipped", detail=NO_CUDA)
    cmd = [sys.executable, "-m", "her2exp.bench", "--cuda", "--skip-extras", "--rounds"]
    rc, seconds = _run([*cmd, str(rounds)], timeout_s)
    status = "timed out" if rc is None else "passed" if rc == 0 else "failed"
    return Step(BENCH_NAME, status, seconds)


def report(steps: list[Step], seconds: float, budget_s: float) -> list[str]:
    """The closing lines: each check's outcome, then every skipped test and check by reason."""
    lines = [f"gpu-check: {seconds:.0f} s in all (budget {budget_s:.0f} s)"]
    for step in steps:
        took = f" in {step.seconds:.0f} s" if step.status != "skipped" else ""
        lines.append(f"  {step.status:9s} {step.name}{took}")
    by_reason: dict[str, list[str]] = {}
    for step in steps:
        for name, reason in step.skipped:
            by_reason.setdefault(reason, []).append(name)
        if step.status == "skipped":
            by_reason.setdefault(step.detail, []).append(step.name)
    for reason, names in by_reason.items():
        lines.append(f"gpu-check: skipped ({reason}):")
        lines.extend(f"  - {name}" for name in names)
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the checks within ``--budget-s`` seconds; print the report; 0 unless one failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each bench")
    parser.add_argument("--budget-s", type=float, default=480.0, help="time for all checks")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    print(f"gpu-check: torch {torch.__version__}, {device}, {torch.cuda.device_count()} GPU(s)")
    start = time.perf_counter()
    steps = [run_tests(args.budget_s * 0.5)]
    left = args.budget_s - (time.perf_counter() - start)
    steps.append(run_bench(args.rounds, left, cuda))
    for line in report(steps, time.perf_counter() - start, args.budget_s):
        print(line)
    return 0 if all(s.status in ("passed", "skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
