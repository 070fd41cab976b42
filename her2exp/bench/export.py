"""ONNX Runtime against PyTorch CPU inference of the graph `her2exp-export` writes.

Why it exists: an exported file is only worth shipping if a client runs it at least as fast as
PyTorch would. Both run the same `export.ProbabilityGraph` (uint8 NCHW in, P(HER2+) out: mean/std
folded in, one view) around a timm resnet18 with random weights (nothing downloads), on the same
uint8 batches, with the same number of intra-op threads, at 64 and 224 px, batch 1 and 32.
Timed in interleaved rounds (median reported) so that other load on a shared machine hits both
alike; the ratio (ONNX Runtime / PyTorch patches/s) is the number to read.

    python -m her2exp.bench.export [--model resnet18 --sizes 64 224 --batches 1 32 --rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["InferenceRate", "main", "rates"]


@dataclass
class InferenceRate:
    """Patches/s of one (size, batch) setting in both runtimes, and their largest disagreement."""

    size: int
    batch: int
    torch_per_second: float
    onnxruntime_per_second: float
    max_abs_diff: float
    threads: int

    @property
    def ratio(self) -> float:
        """ONNX Runtime over PyTorch (above 1: the exported file is faster)."""
        return self.onnxruntime_per_second / self.torch_per_second


def _graph(model_name: str) -> torch.nn.Module:
    import timm

    from her2exp.apps.export import ProbabilityGraph

    torch.manual_seed(0)
    net = timm.create_model(model_name, pretrained=False, num_classes=2)
    return ProbabilityGraph(net, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()


def _per_second(fn, batch: int, min_seconds: float) -> float:
    """Patches/s of `fn` called repeatedly for at least `min_seconds` (after one warm-up)."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls * batch / elapsed


def rate(
    graph: torch.nn.Module,
    size: int,
    batch: int,
    rounds: int = 3,
    min_seconds: float = 1.0,
    threads: int | None = None,
) -> InferenceRate:
    """One setting: export at `size`, then `rounds` interleaved timings of both runtimes."""
    import onnxruntime as ort

    from her2exp.apps.export import INPUT_NAME, OUTPUT_NAME, onnx_bytes

    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    blob = onnx_bytes(graph, x[:1], 18, "legacy", {})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle ORT threads spin by default, taking the cores from the PyTorch rounds in between.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: x.numpy()}

    def run_torch() -> np.ndarray:
        with torch.inference_mode():
            return graph(x).numpy()

    def run_ort() -> np.ndarray:
        return session.run([OUTPUT_NAME], feed)[0]

    diff = float(np.abs(run_torch() - run_ort()).max())
    t, o = [], []
    for _ in range(rounds):
        t.append(_per_second(run_torch, batch, min_seconds))
        o.append(_per_second(run_ort, batch, min_seconds))
    return InferenceRate(size, batch, statistics.median(t), statistics.median(o), diff, threads)


def rates(
    model_name: str = "resnet18",
    sizes: tuple[int, ...] = (64, 224),
    batches: tuple[int, ...] = (1, 32),
    rounds: int = 3,
    min_seconds: float = 1.0,
    threads: int | None = None,
) -> list[InferenceRate]:
    """Every (size, batch) setting of one random-weight timm model."""
    graph = _graph(model_name)
    return [rate(graph, s, b, rounds, min_seconds, threads) for s in sizes for b in batches]


def format_line(r: InferenceRate) -> str:
    return (
        f"  {r.size} px batch {r.batch}: PyTorch {r.torch_per_second:.1f} patches/s, ONNX Runtime "
        f"{r.onnxruntime_per_second:.1f} patches/s, ratio {r.ratio:.3f} (max |diff| "
        f"{r.max_abs_diff:.1e})"
    )


def main(argv: list[str] | None = None) -> list[InferenceRate]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="per round and runtime")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    args = parser.parse_args(argv)
    found = rates(
        args.model,
        tuple(args.sizes),
        tuple(args.batches),
        args.rounds,
        args.seconds,
        args.threads,
    )
    print(
        f"bench: ONNX Runtime vs PyTorch CPU inference, {args.model} (random weights), uint8 "
        f"in, P(HER2+) out, {found[0].threads} threads each (her2exp.bench.export)"
    )
    for r in found:
        print(format_line(r))
    return found


if __name__ == "__main__":
    main()
