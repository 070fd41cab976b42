"""torchrun entry for the DDP tests: `her2exp.cli.train.main` with test-only perturbations.

HER2EXP_TEST_SKEW_S delays each rank's start by LOCAL_RANK * that many seconds (ranks then
compose their configs in different seconds); HER2EXP_TEST_FAIL_RANK makes that rank raise in
its second training epoch, as a real bug on one rank would.
"""

from __future__ import annotations

import os
import time

import her2exp.engine
import her2exp.training.trainer
from her2exp.cli.train import main

rank = int(os.environ.get("RANK", 0))
time.sleep(float(os.environ.get("HER2EXP_TEST_SKEW_S", 0)) * int(os.environ.get("LOCAL_RANK", 0)))

if os.environ.get("HER2EXP_TEST_FAIL_RANK") == str(rank):
    real = her2exp.engine.train_one_epoch

    def failing(*args, **kwargs):
        if args[5].epoch >= 2:  # the EpochState argument
            raise RuntimeError(f"deliberate failure on rank {rank}")
        return real(*args, **kwargs)

    her2exp.training.trainer.train_one_epoch = failing

if __name__ == "__main__":
    main()
