"""`make bench` keeps running and each benchmark computes what it prints, at tiny sizes.

Speed itself is measured by `make bench`, never asserted here: these tests check that both
training loops see the same images and train, that the printed figures are the quotients of
what was measured, and that the CI benchmark times the intervals it reports.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from her2exp import bench
from her2exp.bench import ci, epoch, gpu_check
from her2exp.bench import stain as stain_bench


def test_training_bench_compares_her2exp_with_a_bare_loop(capsys: pytest.CaptureFixture) -> None:
    args = ["--rounds", "2", "--skip-extras", "experiment=smoke", "data.patches_per_patient=6"]
    results = bench.main(args)["epoch"]
    out = capsys.readouterr().out
    assert list(results) == ["clip on", "clip off"]
    # Clipping is on in both loops, or off in both: its cost is never counted as overhead.
    assert results["clip on"].grad_clip_norm == 1.0 and results["clip off"].grad_clip_norm is None
    assert "grad_clip_norm 1.0 (both loops)" in out and "grad_clip_norm None (both loops)" in out
    assert out.count("  round ") == 4
    for result in results.values():
        assert len(result.ours) == len(result.bare) == 2
        for ours, bare in zip(result.ours, result.bare, strict=True):
            # Same images per epoch: the whole train split less at most a last batch of one.
            assert ours.samples == bare.samples >= result.train_patches - 1
            assert ours.images_per_second == pytest.approx(ours.samples / ours.seconds)
            assert bare.images_per_second == pytest.approx(bare.samples / bare.seconds)
            assert math.isfinite(bare.loss) and bare.loss > 0
        ours_ips = statistics.median(s.samples / s.seconds for s in result.ours)
        bare_ips = statistics.median(s.samples / s.seconds for s in result.bare)
        assert result.ratio == pytest.approx(ours_ips / bare_ips)
        assert f"median her2exp {ours_ips:.1f} img/s, bare PyTorch {bare_ips:.1f} img/s" in out
        assert f"ratio {result.ratio:.3f} (target >= 0.97)" in out
        # The summary names each setting with its ratio and both images/s.
        assert (
            f"bench summary [{result.label}]: ratio {result.ratio:.3f}  her2exp "
            f"{ours_ips:.1f} img/s  bare {bare_ips:.1f} img/s"
        ) in out
        # Both loops trained from the shared initial weights.
        assert result.ours_weight_change > 0 and result.bare_weight_change > 0


def test_clip_value_given_on_the_command_line_is_the_one_both_loops_clip_to() -> None:
    rest, clip = epoch._split_clip(["experiment=smoke", "trainer.grad_clip_norm=0.5"])
    assert rest == ["experiment=smoke"] and clip == 0.5
    assert epoch._split_clip(["trainer.grad_clip_norm=null"]) == ([], epoch.DEFAULT_CLIP)


def _clipped_update_norms(clip: float | None) -> list[float]:
    """Gradient norms the bare loop leaves for AdamW after each step (a recording optimizer)."""
    torch.manual_seed(0)
    images = torch.randn(32, 3, 4, 4) * 50.0  # large inputs: gradient norms far above 0.1
    labels = (images.mean(dim=(1, 2, 3)) > 0).long()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
    norms: list[float] = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norms.append(float(torch.nn.utils.get_total_norm(grads)))
            return super().step(closure)

    gen = torch.Generator().manual_seed(0)
    epoch.bare_epoch(
        model, Recording(model.parameters(), lr=1e-3), images, labels, 8, gen, clip=clip
    )
    return norms


def test_bare_loop_clips_exactly_when_asked() -> None:
    clipped, unclipped = _clipped_update_norms(0.1), _clipped_update_norms(None)
    assert len(clipped) == len(unclipped) == 4
    assert max(clipped) == pytest.approx(0.1, rel=1e-4)
    assert min(unclipped) > 0.1


def test_cuda_preset_refuses_without_cuda_in_one_line(capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the preset runs (make gpu-check measures it)")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--cuda", "--rounds", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == epoch.NO_CUDA + "\n" and "torch.cuda.is_available() is false" in err


def test_bare_loop_trains_on_every_image_but_a_lone_last_one() -> None:
    torch.manual_seed(0)
    images = torch.randn(65, 3, 4, 4)
    labels = (images.mean(dim=(1, 2, 3)) > 0).long()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    stats = [epoch.bare_epoch(model, optimizer, images, labels, 16, gen) for _ in range(8)]
    assert {s.samples for s in stats} == {64}  # 65 % 16 == 1: the lone last image is dropped
    assert stats[-1].loss < 0.5 * stats[0].loss
    assert epoch.bare_epoch(model, optimizer, images[:64], labels[:64], 16, gen).samples == 64


def test_ci_bench_times_the_intervals_it_reports(capsys: pytest.CaptureFixture) -> None:
    r = ci.main(n=5000, n_boot=200, repeats=2)
    line = capsys.readouterr().out
    assert r["delong_seconds"] > 0 and r["bootstrap_seconds"] > 0
    assert r["total_seconds"] == pytest.approx(r["delong_seconds"] + r["bootstrap_seconds"])
    assert r["auc"] == pytest.approx(0.7602, abs=0.02)  # binormal 1 SD apart: Phi(1/sqrt(2))
    assert r["delong_low"] < r["auc"] < r["delong_high"]
    # DeLong and the bootstrap, printed side by side, agree on a large well-behaved split.
    assert r["bootstrap_low"] == pytest.approx(r["delong_low"], abs=0.01)
    assert r["bootstrap_high"] == pytest.approx(r["delong_high"], abs=0.01)
    assert "DeLong CI on 5,000 scores" in line and "bootstrap (200 resamples)" in line
    assert f"= {r['total_seconds']:.3f} s (best of 2;" in line


def test_stain_bench_reports_every_installed_normaliser() -> None:
    rates = stain_bench.main(["--n", "8", "--size", "64", "--rounds", "1"])
    assert rates["her2exp (batched)"] > 0
    assert all(rate > 0 for rate in rates.values())


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_gpu" name="test_bf16_autocast_trains" time="0.001">
<skipped type="pytest.skip" message="no CUDA: torch.cuda.is_available() is false">x</skipped>
</testcase>
<testcase classname="tests.test_gpu_path" name="test_cpu_part" time="0.1" />
<testcase classname="tests.test_gpu_path" name="test_broken" time="0.1"><failure message="boom" />
</testcase></testsuite></testsuites>"""


def test_gpu_check_names_every_skipped_check_with_its_reason(tmp_path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    counts, skipped = gpu_check.read_junit(junit)
    assert counts == "1 passed, 1 failed, 1 skipped"
    assert skipped == [("test_gpu::test_bf16_autocast_trains", gpu_check.NO_CUDA)]
    bench_step = gpu_check.run_bench(rounds=1, timeout_s=1, cuda=False)
    assert bench_step.status == "skipped" and bench_step.detail == gpu_check.NO_CUDA
    tests_step = gpu_check.Step("pytest tests/bench/test_gpu.py", "passed", 3.0, skipped)
    lines = gpu_check.report([tests_step, bench_step], 3.5, 480)
    assert lines[1:3] == [
        "  passed    pytest tests/bench/test_gpu.py in 3 s",
        f"  skipped   {gpu_check.BENCH_NAME}",
    ]
    assert lines[3:] == [
        f"gpu-check: skipped ({gpu_check.NO_CUDA}):",
        "  - test_gpu::test_bf16_autocast_trains",
        f"  - {gpu_check.BENCH_NAME}",
    ]


def test_slides_bench_counts_and_reads_the_tiles_it_times(tmp_path, capsys) -> None:
    import numpy as np
    import pandas as pd

    from her2exp.bench import slides as slide_bench
    from her2exp.data.synthetic_slides import write_repeated_slide
    from her2exp.slides.reader import Slide

    block = slide_bench.rendered_block(512)
    image = np.tile(block, (2, 2, 1))
    rates = slide_bench.tile_rates(image, tmp_path, rounds=1, compression="zlib")
    scans = [(scan, mpp) for scan, mpp, _ in slide_bench.SCANS]
    assert [(r.scan, r.reader) for r in rates] == [
        (scan, reader) for scan, _ in scans for reader in slide_bench.READERS
    ]
    mpps = [mpp for _, mpp in scans for _ in slide_bench.READERS]
    for rate, mpp in zip(rates, mpps, strict=True):
        assert rate.ratio == pytest.approx(rate.slide_per_second / rate.memory_per_second)
        with Slide(tmp_path / f"scan_{mpp}.tiff", reader=rate.reader) as slide:
            choice, coords = slide_bench.tissue_tiles(slide)
            # 0.25 um/px, 4x levels: read 448 px at level 0 and reduce; 0.5: read as is.
            assert (choice.level, choice.read_size) == (0, 448 if mpp == 0.25 else 224)
            assert rate.tiles == len(coords) > 0
            got = slide_bench.from_slide(slide, choice, coords)
        want = slide_bench.from_memory(image, choice, coords)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.shape == (224, 224, 3) and np.array_equal(g, w)
    big = write_repeated_slide(tmp_path / "big.tiff", block, (1024, 1536), 0.5)
    tiling = slide_bench.tiling_rate(big, tmp_path / "tiled", rounds=1)
    written = pd.read_parquet(tmp_path / "tiled" / "slides" / "bench.parquet")
    assert (tiling.width, tiling.height, tiling.tiles) == (1536, 1024, len(written))
    assert tiling.slides_per_minute == pytest.approx(60 / tiling.seconds)


def test_slide_training_bench_trains_both_ways_on_the_same_tiles(tiled_slides, capsys) -> None:
    from her2exp.bench import slide_train

    tiles = tiled_slides[2] / "tiles.parquet"
    out = slide_train.run(tiles, ["model=test_resnet", "data.image_size=32"], rounds=1)
    assert out["ratio"] == pytest.approx(out["slides"] / out["memory"]) and out["slides"] > 0
    assert "2 workers reading the slides vs the same tiles in memory" in capsys.readouterr().out


def test_mil_bench_trains_each_head_on_every_bag_and_reads_the_shard_it_wrote(
    tmp_path, capsys
) -> None:
    from her2exp.bench import mil as mil_bench

    batches = list(mil_bench.synthetic_bags(10, 7, 32, 4, seed=3))
    assert [len(x) for x, _, _ in batches] == [4, 4, 2]  # every bag once, a short last batch
    for x, mask, labels in batches:
        assert x.shape[1:] == (7, 32) and mask.all()
        # A HER2+ bag has one tile shifted by 2 along the first 16 features.
        shifted = (x[..., :16].mean(-1) > 1.0).sum(1)
        assert torch.equal(shifted >= 1, labels.bool())
    out = mil_bench.main(["--bags", "10", "--tiles", "7", "--dim", "32", "--read-features", "64"])
    printed = capsys.readouterr().out
    epochs = {r.head: r for r in out["epochs"]}
    assert list(epochs) == ["mean_pool", "abmil"]
    for r in epochs.values():
        assert (r.bags, r.tiles, r.dim) == (10, 7, 32)
        assert r.seconds > 0 and math.isfinite(r.first_loss) and math.isfinite(r.last_loss)
        assert r.bags_per_second == pytest.approx(10 / r.seconds)
        assert f"  {r.head}: {r.seconds:.2f} s ({r.compute_seconds:.2f} s compute)" in printed
    ratio = epochs["abmil"].compute_seconds / epochs["mean_pool"].compute_seconds
    assert f"abmil / mean_pool compute: {ratio:.2f}x" in printed
    read = out["read"]
    assert read.features == 64 and read.features_per_second == pytest.approx(64 / read.load_seconds)
    assert read.megabytes * 1e6 > 64 * 32 * 4  # the float32 tensor is in the file
    assert read.raw_seconds > 0 and mil_bench.read_line(read) in printed
