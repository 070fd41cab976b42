"""`her2exp-sync <run_dir>`: send MLflow calls a run deferred while its server was unreachable.

A run whose tracking server went away keeps training and queues its MLflow calls in
`<run_dir>/mlflow_buffer.jsonl`; it replays them itself when the server answers again. If the
server was still away when the run ended, this replays them later, in order, to the run recorded
in `<run_dir>/mlflow_run.json` (or `--uri`). Calls already sent are removed from the queue, so
running it twice sends nothing twice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from her2exp import tracking


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="her2exp-sync", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run directory (hydra.run.dir)")
    parser.add_argument("--uri", help="tracking URI (default: the one the run used)")
    args = parser.parse_args(argv)
    queued = tracking.DeferredLog(args.run_dir / tracking.BUFFER_FILE).records()
    what = tracking.describe_deferred(queued)
    try:
        sent, left = tracking.sync(args.run_dir, args.uri)
    except (tracking.TrackingUnavailable, FileNotFoundError) as exc:
        print(f"her2exp-sync: {exc}; nothing sent ({what} still queued)", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the unsent rest stays queued; say so, don't trace
        left = tracking.DeferredLog(args.run_dir / tracking.BUFFER_FILE).records()
        print(f"her2exp-sync: stopped by {type(exc).__name__}: {exc}; still queued: "
              f"{tracking.describe_deferred(left)}; run it again", file=sys.stderr)  # fmt: skip
        return 1
    if not queued:
        print(f"her2exp-sync: nothing to replay in {args.run_dir}")
        return 0
    if left:
        print(f"her2exp-sync: sent {sent} call(s), {len(left)} left "
              f"({tracking.describe_deferred(left)}); run it again", file=sys.stderr)  # fmt: skip
        return 1
    print(f"her2exp-sync: replayed {what} to the MLflow run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
