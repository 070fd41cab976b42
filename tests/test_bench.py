"""`make bench` must keep running: the training benchmark and the stain benchmark, tiny sizes."""

from __future__ import annotations

import pytest

from her2exp import bench
from her2exp.stain import bench as stain_bench


def test_training_bench_compares_her2exp_with_a_bare_loop(capsys: pytest.CaptureFixture) -> None:
    bench.main(["--rounds", "1", "--skip-extras", "experiment=smoke"])
    out = capsys.readouterr().out
    assert "bench: median her2exp" in out and "bare PyTorch" in out
    ratio = float(out.split("ratio ")[-1].split()[0])
    assert ratio > 0


def test_stain_bench_reports_every_installed_normaliser() -> None:
    rates = stain_bench.main(["--n", "8", "--size", "64", "--rounds", "1"])
    assert rates["her2exp (batched)"] > 0
    assert all(rate > 0 for rate in rates.values())
