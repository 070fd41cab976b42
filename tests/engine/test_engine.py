"""The optimizer update step on toy models, in-process: accumulation equals one big batch step by
step, fp16 + GradScaler + clipping survives a skipped step, and under DDP a NaN on one rank is
skipped on every rank with identical scales, weights and counts (issue 14, part 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader

from her2exp.engine import (
    EpochState,
    NonFiniteLossError,
    OptimizerUpdate,
    Preprocess,
    StepPolicy,
    train_one_epoch,
)
from her2exp.runtime import distributed
from toys import Patches

CPU = torch.device("cpu")


def toy_model(seed: int = 0) -> nn.Module:
    """BatchNorm-free: a big batch and its accumulated halves see the same statistics."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.GELU(), nn.Linear(16, 2))


class RecordingSchedule(torch.optim.lr_scheduler.LambdaLR):
    """A constant schedule that snapshots the weights after every optimizer update."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        super().__init__(optimizer, lambda step: 1.0)  # its first step() is not an update
        self.model, self.snapshots = model, []

    def step(self, *args, **kwargs) -> None:
        if hasattr(self, "snapshots"):
            self.snapshots.append([p.detach().clone() for p in self.model.parameters()])
        super().step(*args, **kwargs)


def updater(model: nn.Module, policy: StepPolicy, scaler: bool = False, lr: float = 0.1):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    schedule = RecordingSchedule(optimizer, model)
    return OptimizerUpdate(
        optimizer, schedule, torch.amp.GradScaler("cpu", enabled=scaler), policy
    ), schedule


def epoch(model, loader, update, **state) -> object:
    return train_one_epoch(
        model, loader, nn.CrossEntropyLoss(), update, Preprocess(CPU), EpochState(**state)
    )


@pytest.mark.parametrize("n", [16, 12])  # 12: the last window of the epoch is a partial one
def test_accumulation_equals_one_big_batch_step_by_step(n: int) -> None:
    data = Patches(n)
    big, small = toy_model(), toy_model()
    up_big, rec_big = updater(big, StepPolicy(accumulation_steps=1))
    up_small, rec_small = updater(small, StepPolicy(accumulation_steps=2))
    for e in (1, 2):
        a = epoch(big, DataLoader(data, batch_size=8), up_big, epoch=e)
        b = epoch(small, DataLoader(data, batch_size=4), up_small, epoch=e)
        assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.samples == b.samples == n
    assert len(rec_big.snapshots) == len(rec_small.snapshots) == 4  # 2 updates per epoch
    for step, (wa, wb) in enumerate(zip(rec_big.snapshots, rec_small.snapshots, strict=True)):
        for pa, pb in zip(wa, wb, strict=True):
            torch.testing.assert_close(pa, pb, rtol=0, atol=2e-6, msg=f"update {step + 1}")
    # The updates moved the weights (the comparison is not between two untouched models).
    assert not torch.equal(rec_big.snapshots[0][1], rec_big.snapshots[-1][1])


def test_fp16_scaler_clip_and_skip_continue_after_a_skipped_step() -> None:
    """trainer.amp=fp16 + on_nonfinite=skip + clipping: the step after a skip used to raise
    'unscale_() has already been called on this optimizer since the last update()'."""
    model = toy_model()
    policy = StepPolicy(
        autocast_dtype=torch.float16, grad_clip_norm=1.0, on_nonfinite="skip", debug_nan_at_step=2
    )
    update, schedule = updater(model, policy, scaler=True, lr=0.01)
    scale = update.scaler.get_scale()
    stats = epoch(model, DataLoader(Patches(48), batch_size=8), update)
    assert stats.nonfinite_steps == 1 and stats.samples == 40  # the bad window's 8 left out
    assert len(schedule.snapshots) == 6  # the schedule still advances on the skipped step
    assert update.scaler.get_scale() == scale * update.scaler.get_backoff_factor()
    assert torch.equal(schedule.snapshots[2][0], schedule.snapshots[1][0])  # skipped: unchanged
    assert not torch.equal(schedule.snapshots[3][0], schedule.snapshots[2][0])  # then it steps
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_stop_raises_before_the_weights_change() -> None:
    model = toy_model()
    update, schedule = updater(model, StepPolicy(debug_nan_at_step=1))
    with pytest.raises(NonFiniteLossError, match=r"at epoch 1, step 1"):
        epoch(model, DataLoader(Patches(32), batch_size=8), update)
    assert len(schedule.snapshots) == 1  # one good update, none for the bad window


class NanOnRank(Preprocess):
    """The inputs of one training batch become NaN on one rank only."""

    def __call__(self, x, train=False, epoch=0, index=None):
        x = super().__call__(x, train, epoch, index)
        # Batches of 8 in order: indices 16..23 are step 2.
        if train and distributed.env_rank() == 1 and int(index[0]) == 16:
            x = x * float("nan")
        return x


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    results = {}
    for budget in (5, 0):
        model = toy_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        policy = StepPolicy(
            autocast_dtype=torch.float16,
            grad_clip_norm=1.0,
            on_nonfinite="skip",
            max_nonfinite_steps=budget,
        )
        update, _ = updater(ddp, policy, scaler=True, lr=0.01)
        loader = DataLoader(Patches(40, seed=rank), batch_size=8)
        try:
            stats = train_one_epoch(
                ddp,
                loader,
                nn.CrossEntropyLoss(),
                update,
                NanOnRank(CPU),
                EpochState(),
                ddp.no_sync,
            )
            outcome = {"skipped": stats.nonfinite_steps, "samples": stats.samples}
        except NonFiniteLossError:
            outcome = {"raised": True}
        outcome["scale"] = update.scaler.get_scale()
        outcome["weights"] = [p.detach().double().sum().item() for p in model.parameters()]
        results[str(budget)] = outcome
    torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def test_ddp_nan_on_one_rank_is_skipped_on_every_rank(tmp_path: Path) -> None:
    """Two gloo processes, a GradScaler, a NaN batch on rank 1 only: every rank skips the same
    step and backs the scale off alike, so scales, weights and skip counts stay equal; with no
    skip budget left every rank stops (no rank is left waiting in a collective)."""
    mp.spawn(_ddp_worker, args=(distributed.free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    ok0, ok1 = r0["5"], r1["5"]
    assert ok0["skipped"] == ok1["skipped"] == 1
    assert ok0["scale"] == ok1["scale"] == 65536.0 * 0.5
    assert ok0["weights"] == ok1["weights"]
    assert r0["0"].get("raised") and r1["0"].get("raised")
