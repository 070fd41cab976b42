"""`make bench`: the benchmarks, one module each, run in this order by :func:`main`.

- :mod:`her2exp.bench.epoch`: images/s of her2exp's training epoch vs a bare PyTorch loop, with
  gradient clipping on in both loops and off in both (``--cuda``: the GPU preset, resnet18 at
  224 px, batch 128, amp auto, channels_last, compile off and on).
- :mod:`her2exp.bench.startup`: seconds from a misspelt key (`her2exp-train trainer.epoch=3`)
  to its one-line answer, against a bare `python -c pass` (goal: under 2 s).
- :mod:`her2exp.bench.ci`: seconds of the DeLong and bootstrap AUC intervals on 100,000 scores.
- :mod:`her2exp.bench.stain`: patches/s of her2exp's batched Macenko vs torchstain and
  torch-staintools.
- :mod:`her2exp.bench.slides`: one worker's tiles/s read from slides (OpenSlide, tiffslide) vs
  the same tiles from memory; `her2exp-tile`'s slides/min on a 20,000 px slide.
- :mod:`her2exp.bench.mil`: seconds of one epoch of the bag heads (abmil vs mean_pool) over
  1,000 bags of 500 synthetic 1,536-dim features; the feature cache's read rate.
- :mod:`her2exp.bench.export`: ONNX Runtime vs PyTorch CPU inference of the graph
  `her2exp-export` writes (resnet18, random weights; 64 and 224 px, batch 1 and 32).
- :mod:`her2exp.bench.serve`: served patches/s and p50/p95 latency under `mlflow models serve`
  (a tiny run trained per patch size; 64 and 224 px, batch 1 and 32).
- :mod:`her2exp.bench.gpu_check`: `make gpu-check`, the CUDA-only tests and ``--cuda``.

Speed is measured here, never asserted by the tests (they check what each bench computes).

    python -m her2exp.bench [--rounds 3] [--skip-extras] [--cuda] [hydra overrides, e.g. model=resnet10t]
"""

from __future__ import annotations

import argparse
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every benchmark (only the epoch one with ``--skip-extras``); returns their results.

    ``--cuda`` on a machine without CUDA exits with one line (status 2) before measuring.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-extras", action="store_true", help="training throughput only")
    parser.add_argument(
        "--cuda",
        action="store_true",
        help="GPU preset: resnet18, 224 px, batch 128, amp auto, channels_last, compile off/on",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from her2exp.bench import epoch

    if args.cuda:
        import torch

        if not torch.cuda.is_available():
            parser.exit(2, f"{epoch.NO_CUDA}\n")
        results = epoch.run_cuda(args.overrides, args.rounds)
    else:
        results = epoch.run_clip_pair(args.overrides, args.rounds)
    for line in epoch.summary_lines(results):
        print(line)
    out: dict[str, Any] = {"epoch": results}
    if args.skip_extras:
        return out
    from her2exp.bench import ci, mil, slides, stain, startup

    out["startup"] = startup.main()
    out["ci"] = ci.main()
    print("bench: stain normalisation, 256 patches of 128 px (her2exp.bench.stain)")
    out["stain"] = stain.main([])
    out["slides"] = slides.main([])
    out["mil"] = mil.main([])
    from her2exp.bench import export, serve

    out["export"] = export.main([])
    out["serve"] = serve.main([])
    return out
