"""`her2exp-sync`: send the MLflow calls a run deferred while its server was unreachable.

    her2exp-sync input=outputs/<date>/<time>
    her2exp-sync input=outputs/<date>/<time> tracking.uri=http://host:5000   # another server

A run whose tracking server went away keeps training and queues its MLflow calls in
`<run_dir>/mlflow_buffer.jsonl`; it replays them itself when the server answers again. If the
server was still away when the run ended, this replays them later, in order, to the run recorded
in `<run_dir>/mlflow_run.json` (at `tracking.uri`, default: the one the run used). Calls already
sent are removed from the queue, so running it twice sends nothing twice. (`her2exp-sync DIR`,
the older spelling, still works.) Only the run directory's own files are sent: a queued path
outside it is refused (exit 2) before anything is sent; a deferred model is unpickled, so sync
only run directories you or your colleagues wrote.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from her2exp.cli.common import UserError, hydra_command
from her2exp.config import commands as schemas


@hydra_command("sync", positional="input")
def main(cfg: DictConfig) -> None:
    """Replay; exit 1 (the rest stays queued) when the server is still away or a call fails."""
    from her2exp import tracking
    from her2exp.core.fileio import UnsafePath

    schemas.check_sync(cfg)
    run_dir = Path(cfg.input)
    buffer = run_dir / tracking.BUFFER_FILE
    queued = tracking.DeferredLog(buffer).records()
    what = tracking.describe_deferred(queued)
    try:
        sent, left = tracking.sync(run_dir, cfg.tracking.uri)
    except UnsafePath as exc:
        raise UserError(str(exc)) from None
    except (tracking.TrackingUnavailable, FileNotFoundError) as exc:
        print(f"her2exp-sync: {exc}; nothing sent ({what} still queued)", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as exc:  # noqa: BLE001 - the unsent rest stays queued; say so, don't trace
        rest = tracking.describe_deferred(tracking.DeferredLog(buffer).records())
        print(
            f"her2exp-sync: stopped by {type(exc).__name__}: {exc}; still queued: {rest}; "
            "run it again",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    if not queued:
        print(f"her2exp-sync: nothing to replay in {run_dir}")
        return
    if left:
        print(
            f"her2exp-sync: sent {sent} call(s), {len(left)} left "
            f"({tracking.describe_deferred(left)}); run it again",
            file=sys.stderr,
        )
        raise SystemExit(1)
    print(f"her2exp-sync: replayed {what} to the MLflow run")


if __name__ == "__main__":
    main()
