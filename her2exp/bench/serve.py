"""Served throughput and latency of a run's MLflow model under `mlflow models serve`.

Why it exists: a served model's cost per patch is the network plus everything around it (HTTP,
JSON, decoding, preprocessing); the issue asks for patches/s and p50/p95 latency at 64 and 224
px, batch 1 and 32, measured on 127.0.0.1 with a bounded request loop (one client, sequential
requests on a kept-alive connection, a warm-up first). Without `--run-id` it trains a tiny run per
patch size itself (experiment=smoke, one epoch, `data.image_size` = that size, the model
logged) into a temporary SQLite store, so nothing downloads; `--run-id` serves an existing run.

The request body is built by one small function per input form (`png_body`: base64 PNG strings,
issue 20's raw-patch model; `tensor_body`: the float NCHW tensors normalised by the run's
mean/std, the model logged before it), chosen from the logged signature.

    python -m her2exp.bench.serve [--sizes 64 224 --batches 1 32 --requests 30]
    python -m her2exp.bench.serve --run-id <id> --tracking-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ServeRate", "main", "png_body", "tensor_body"]

BIN = Path(sys.executable).parent


@dataclass
class ServeRate:
    """One (size, batch) setting of one served model."""

    size: int
    batch: int
    requests: int
    patches_per_second: float
    p50_ms: float
    p95_ms: float
    form: str  # png | tensor


def png_body(patches: np.ndarray) -> dict[str, Any]:
    """/invocations body of the raw-patch model: one base64-encoded PNG string per patch
    (uint8 (N, H, W, 3) in). The one place to change when the served input form changes."""
    from PIL import Image

    def encode(patch: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(patch).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")

    return {"dataframe_split": {"columns": ["image"], "data": [[encode(p)] for p in patches]}}


def tensor_body(patches: np.ndarray, mean: list[float], std: list[float]) -> dict[str, Any]:
    """/invocations body of a model that takes float32 NCHW patches normalised by mean/std."""
    x = (patches.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(
        std, np.float32
    )
    return {"inputs": x.transpose(0, 3, 1, 2).tolist()}


def input_form(run_id: str, tracking_uri: str) -> tuple[str, dict[str, Any]]:
    """("tensor" when the run's logged signature takes a float tensor, else "png"; the model's
    metadata), read from its MLmodel in the run's own store (this bench process's tracking
    URI becomes that store, as the server's does)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    sig = info.signature
    tensor = sig is not None and sig.inputs.is_tensor_spec()
    return ("tensor" if tensor else "png"), dict(info.metadata or {})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/ping")
        return conn.getresponse().status == 200
    except OSError:
        return False


@contextlib.contextmanager
def served(model_uri: str, tracking_uri: str, timeout_s: float = 240) -> Iterator[int]:
    """`mlflow models serve --env-manager local` on 127.0.0.1 (one worker) for the block; its
    port. The server's process group is ended afterwards."""
    port = _free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        # The server starts `uvicorn` by name: the venv's bin must be on PATH.
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": tracking_uri,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        },
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not _ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"mlflow models serve did not answer on {port}:\n{tail}")
            time.sleep(0.5)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def request_loop(port: int, body: bytes, batch: int, requests: int, warmup: int = 3) -> ServeRate:
    """`warmup` then `requests` sequential POSTs of `body` on one connection: patches/s over the
    timed requests and their p50/p95 latency. A non-200 answer stops the bench, shown."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {"Content-Type": "application/json"}
    seconds = []
    for i in range(warmup + requests):
        start = time.perf_counter()
        conn.request("POST", "/invocations", body=body, headers=headers)
        answer = conn.getresponse()
        text = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"/invocations answered {answer.status}: {text[:500]!r}")
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    conn.close()
    ms = np.asarray(seconds) * 1000.0
    return ServeRate(
        0,
        batch,
        requests,
        batch * requests / float(np.sum(seconds)),
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 95)),
        "",
    )


def train_tiny(folder: Path, size: int) -> tuple[str, str]:
    """A tiny run at `size` px with its model logged (experiment=smoke, one epoch): (run id,
    tracking URI)."""
    uri = f"sqlite:///{folder}/mlflow.db"
    args = ["experiment=smoke", "tracking.log_model=true", "trainer.epochs=1"]
    args += [f"data.image_size={size}", f"tracking.uri={uri}", f"hydra.run.dir={folder}/run{size}"]
    proc = subprocess.run(
        [sys.executable, "-m", "her2exp.cli.train", *args],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    found = re.search(r"^her2exp: MLflow run (\w+) in ", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"the tiny training run failed:\n{proc.stdout[-2000:]}{proc.stderr}")
    return found.group(1), uri


def patches_at(size: int, n: int) -> np.ndarray:
    """n embedded synthetic patches (uint8 (n, size, size, 3)): tissue-like, so PNG sizes are."""
    from her2exp.data import synthetic

    data = synthetic.generate(n_patients=4, patches_per_patient=-(-n // 4), image_size=size)
    return np.ascontiguousarray(data.images[:n])


def bench_model(
    run_id: str, tracking_uri: str, sizes: list[int], batches: list[int], requests: int
) -> list[ServeRate]:
    """Serve one run's model and time every (size, batch) it takes: a tensor model its own
    size only (its input is not resized), a raw-patch model every size."""
    form, meta = input_form(run_id, tracking_uri)
    model_uri = f"runs:/{run_id}/model"
    if form == "tensor":
        sizes = [s for s in sizes if s == int(meta["image_size"])]
    found = []
    with served(model_uri, tracking_uri) as port:
        for size in sizes:
            pool = patches_at(size, max(batches))
            for batch in batches:
                x = pool[:batch]
                body = png_body(x) if form == "png" else tensor_body(x, meta["mean"], meta["std"])
                r = request_loop(port, json.dumps(body).encode(), batch, requests)
                r.size, r.form = size, form
                print(format_line(r), flush=True)  # a 224 px tensor batch takes a while
                found.append(r)
    return found


def format_line(r: ServeRate) -> str:
    return (
        f"  {r.size} px batch {r.batch} ({r.form}): {r.patches_per_second:.1f} patches/s, "
        f"latency p50 {r.p50_ms:.1f} ms p95 {r.p95_ms:.1f} ms ({r.requests} requests)"
    )


def main(argv: list[str] | None = None) -> list[ServeRate]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--requests", type=int, default=30, help="timed requests per setting")
    parser.add_argument("--run-id", default=None, help="serve this run's model (no training)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    print(
        "bench: served model (mlflow models serve --env-manager local, 127.0.0.1, one worker, "
        f"one client), {args.requests} timed requests per setting (her2exp.bench.serve)"
    )
    found: list[ServeRate] = []
    if args.run_id:
        found = bench_model(args.run_id, args.tracking_uri, args.sizes, args.batches, args.requests)
    else:
        with tempfile.TemporaryDirectory(prefix="her2exp-bench-serve-") as tmp:
            for size in args.sizes:
                run_id, store = train_tiny(Path(tmp), size)
                found += bench_model(run_id, store, [size], args.batches, args.requests)
    return found


if __name__ == "__main__":
    main()
