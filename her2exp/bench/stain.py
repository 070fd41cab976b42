"""Throughput of her2exp's batched Macenko against the field, on the same patches, same process.

Why it exists: stain normalisation runs on every batch, so it must cost far less than the model.
Compared: torchstain's numpy and torch Macenko (one image per call, the way they are used in a
Dataset) and torch-staintools' batched Macenko. Competitors that are not installed are skipped
with a message. Run: ``python -m her2exp.bench.stain [--n 256 --size 128 --rounds 3]``.

Methods are timed in interleaved rounds (median reported) so that load from other processes on a
shared machine hits all of them alike; the ratios are the number to read, not absolute patches/s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from her2exp.stain.macenko import MacenkoNormalizer

__all__ = ["ihc_patches", "main"]


def ihc_patches(n: int = 256, size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n crops (N,H,W,3 uint8) of skimage's bundled IHC sample, and a reference region.

    Crops are drawn from the left/top of the 512x512 image (plus flips for variety); the
    reference is its bottom-right quarter, so the two overlap as little as the image allows.
    """
    from skimage.data import immunohistochemistry

    image = immunohistochemistry()
    rng = np.random.default_rng(seed)
    limit = image.shape[0] - size
    crops = []
    while len(crops) < n:
        i, j = rng.integers(0, limit + 1, size=2)
        if i >= 256 - size // 2 and j >= 256 - size // 2:
            continue  # keep crops mostly outside the reference quarter
        crop = image[i : i + size, j : j + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crops.append(np.ascontiguousarray(crop))
    return np.stack(crops), np.ascontiguousarray(image[256:, 256:])


def _time_rounds(methods: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each method, interleaved over rounds after one warm-up."""
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _competitors(crops: np.ndarray, reference: np.ndarray) -> dict[str, Callable[[], object]]:
    """The field's normalisers fitted to the same reference; missing packages are skipped."""
    methods: dict[str, Callable[[], object]] = {}
    try:
        import torchstain
    except ImportError:
        print("skip torchstain: not installed (pip install torchstain)")
    else:
        ts_np = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        ts_np.fit(reference)
        methods["torchstain numpy (per image)"] = lambda: [
            ts_np.normalize(c, stains=False) for c in crops
        ]
        ts_torch = torchstain.normalizers.MacenkoNormalizer(backend="torch")
        ts_torch.fit(torch.from_numpy(reference).permute(2, 0, 1).contiguous())
        chw = [torch.from_numpy(c).permute(2, 0, 1).contiguous() for c in crops]
        methods["torchstain torch (per image)"] = lambda: [
            ts_torch.normalize(c, stains=False) for c in chw
        ]
    try:
        from torch_staintools.normalizer import NormalizerBuilder
    except ImportError:
        print("skip torch-staintools: not installed (pip install torch-staintools)")
    else:
        tst = NormalizerBuilder.build("macenko")
        tst.fit(torch.from_numpy(reference).permute(2, 0, 1)[None].float() / 255.0)
        batch01 = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
        methods["torch-staintools (batched)"] = lambda: tst(batch01)
    return methods


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print patches/s of each normaliser and her2exp's speed-up; return patches/s by name."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="patches")
    parser.add_argument("--size", type=int, default=128, help="patch side in pixels")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per method")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    crops, reference = ihc_patches(args.n, args.size)
    batch = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()
    ours = MacenkoNormalizer().fit(torch.from_numpy(reference).permute(2, 0, 1))
    methods: dict[str, Callable[[], object]] = {"her2exp (batched)": lambda: ours.normalize(batch)}
    methods.update(_competitors(crops, reference))

    print(
        f"{args.n} patches of {args.size}x{args.size} (skimage IHC sample), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.rounds} interleaved rounds"
    )
    seconds = _time_rounds(methods, args.rounds)
    rates = {name: args.n / s for name, s in seconds.items()}
    base = rates["her2exp (batched)"]
    for name, rate in rates.items():
        ratio = "" if name.startswith("her2exp") else f"  her2exp is {base / rate:6.1f}x faster"
        print(f"{name:32s} {rate:10.0f} patches/s{ratio}")
    return rates


if __name__ == "__main__":
    main()
