"""Issue 16: the defects of the GPU path, each tested where it can be, on the CPU.

AdamW's no-decay list, amp=auto's choice, stain jitter keyed per patch, the Youden drift of
the final rescoring, a resume under DDP without a pickled copy of the checkpoint per rank, and
at most one host sync per optimizer step. The CUDA-only checks are `make gpu-check`
(tests/bench/test_gpu.py, and the CUDA test at the end of this file).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

from conftest import SmokeRun, compose_train
from her2exp import models
from her2exp.core import checkpoint
from her2exp.core.seed import keyed_uniform
from her2exp.engine import EpochState, OptimizerUpdate, Preprocess, StepPolicy, train_one_epoch
from her2exp.runtime import distributed
from her2exp.runtime.amp import amp_choice, resolve_amp
from her2exp.runtime.distributed import DistContext
from her2exp.runtime.rundir import RunDir
from her2exp.stain.hed import HedJitter
from her2exp.stain.pipeline import StainPipeline
from her2exp.training import builders
from her2exp.training.final import youden_drift
from her2exp.training.trainer import Checkpointer, Trainer, build_optimizer
from toys import Patches  # uint8 patches, label and index, as PatchDataset yields

CPU = torch.device("cpu")
VIT = ["model.name=vit_tiny_patch16_224", "+model.kwargs.img_size=32", "+model.kwargs.reg_tokens=4"]
TOKENS = {"backbone.cls_token", "backbone.reg_token", "backbone.pos_embed"}


# -- 1. AdamW ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_adamw_keeps_a_vits_tokens_and_position_embedding_out_of_weight_decay(
    layer_decay: float | None,
) -> None:
    extra = [] if layer_decay is None else [f"trainer.layer_decay={layer_decay}"]
    cfg = compose_train([*VIT, "trainer.weight_decay=0.05", *extra])
    model = models.build(cfg.model, CPU)
    optimizer, _ = build_optimizer(model, cfg.trainer, steps_per_epoch=4)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert set(decay) == set(names.values())  # every trainable parameter, once
    assert TOKENS <= set(decay)
    assert all(decay[n] == 0.0 for n in TOKENS)
    for name, p in model.named_parameters():
        if p.ndim <= 1:  # norms and biases
            assert decay[name] == 0.0, name
    assert decay["backbone.blocks.0.attn.qkv.weight"] == 0.05
    assert decay["backbone.patch_embed.proj.weight"] == 0.05


# -- 2. amp=auto ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("capability", "want"),
    [
        ((7, 0), (torch.float16, True)),  # V100: bf16 only emulated
        ((7, 5), (torch.float16, True)),  # T4
        ((8, 0), (torch.bfloat16, False)),  # A100
        ((8, 9), (torch.bfloat16, False)),  # L4 / L40S
        ((9, 0), (torch.bfloat16, False)),  # H100 / H200
        (None, (torch.bfloat16, False)),  # ROCm: bf16 is native on every GPU PyTorch supports
    ],
)
def test_amp_auto_takes_bf16_only_where_the_gpu_has_it_natively(capability, want) -> None:
    assert amp_choice("auto", "cuda", capability) == want


def test_amp_choices_that_do_not_depend_on_the_gpu() -> None:
    assert amp_choice("auto", "cpu", None) == (None, False)  # fp32 on the CPU
    assert resolve_amp("auto", CPU) == (None, False)  # asks no CUDA question on a CPU run
    assert amp_choice("off", "cuda", (9, 0)) == (None, False)
    assert amp_choice("bf16", "cuda", (7, 0)) == (torch.bfloat16, False)  # asked for: given
    assert amp_choice("fp16", "cuda", (9, 0)) == (torch.float16, True)


# -- 3. stain jitter keyed by (seed, epoch, index) -------------------------------------------------
def _patches(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.tensor([150, 90, 160], dtype=torch.uint8).view(1, 3, 1, 1)
    noise = torch.randint(-40, 40, (n, 3, 16, 16), generator=g)
    return (base.int() + noise).clamp(0, 255).to(torch.uint8)


def test_stain_jitter_of_a_patch_depends_on_its_index_not_its_batch() -> None:
    pipe = StainPipeline(None, HedJitter(sigma=0.2), seed=3)
    x, idx = _patches(6), torch.arange(10, 16)
    whole = pipe(x, True, 2, idx)
    for rank_rows in ([0, 2, 4], [1, 3, 5], [3]):  # two "ranks" of one batch, a batch of one
        part = pipe(x[rank_rows], True, 2, idx[rank_rows])
        assert torch.equal(part, whole[rank_rows])
    # The same pixels under another index, epoch or seed get other colours.
    assert not torch.equal(pipe(x[:1], True, 2, idx[1:2]), whole[:1])
    assert not torch.equal(pipe(x, True, 3, idx), whole)
    assert not torch.equal(
        StainPipeline(None, HedJitter(sigma=0.2), seed=4)(x, True, 2, idx), whole
    )
    assert torch.equal(pipe(x, False, 2, idx), x)  # validation and test are never jittered
    with pytest.raises(ValueError, match="dataset index"):
        pipe(x, True, 2)


def test_keyed_draws_are_uniform_and_independent_of_the_batch() -> None:
    from scipy import stats

    u = keyed_uniform(0, 1, np.arange(20000), 6)
    assert u.shape == (20000, 6) and u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03  # draws of one patch
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.03  # neighbouring indices
    assert np.array_equal(keyed_uniform(0, 1, np.array([7, 19999]), 6), u[[7, 19999]])


def _jittered_epoch(on_device: bool, rank: int, world: int, epoch: int) -> dict[int, torch.Tensor]:
    """index -> the float batch row the model sees, through build_data's real loaders."""
    overrides = [
        "experiment=smoke",
        "stain=hed_jitter",
        "stain.sigma=0.2",
        "data.mean=[0.5,0.5,0.5]",
    ]
    cfg = compose_train([*overrides, "data.std=[0.25,0.25,0.25]", f"stain.on_device={on_device}"])
    parts = builders.build_data(cfg, DistContext(rank, rank, world, CPU, None))
    loader = parts.loaders["train"]
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    out = {}
    for x, _, idx in loader:
        for i, row in zip(idx.tolist(), parts.preprocess(x, True, epoch, idx), strict=True):
            out[i] = row
    return out


def test_on_device_jitter_equals_the_workers_on_any_rank_count() -> None:
    workers = _jittered_epoch(False, 0, 1, epoch=2)
    on_device = _jittered_epoch(True, 0, 1, epoch=2)
    two_ranks = {**_jittered_epoch(True, 0, 2, epoch=2), **_jittered_epoch(False, 1, 2, epoch=2)}
    assert len(workers) > 150
    assert set(on_device) == set(workers) and set(two_ranks) <= set(workers)
    assert len(two_ranks) >= len(workers) - 2  # the sampler drops a last lone sample per rank
    for i, row in workers.items():
        assert torch.equal(on_device[i], row), i
        if i in two_ranks:
            assert torch.equal(two_ranks[i], row), i


# -- 4. the Youden drift of the final rescoring -----------------------------------------------------
def test_youden_drift_warns_with_both_values_and_never_raises(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="her2exp"):
        assert youden_drift(0.4123456, 0.4123457) == pytest.approx(1e-7)
    assert "0.4123456" in caplog.text and "0.4123457" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="her2exp"):
        assert youden_drift(0.25, 0.25) == 0.0
    assert caplog.text == ""


def test_the_run_records_the_drift_and_freezes_the_rescored_threshold(smoke_run: SmokeRun) -> None:
    import mlflow

    run = mlflow.MlflowClient(tracking_uri=smoke_run.uri).get_run(smoke_run.run_id)
    m = run.data.metrics
    assert m["youden_threshold_drift"] == 0.0  # same weights, same val, same CPU kernels
    best = checkpoint.load(RunDir(smoke_run.run_dir).best)
    assert best["thresholds"]["tile"]["youden"] == pytest.approx(m["threshold_youden_val"], abs=0)


# -- 5. resume under DDP: tensors broadcast in place ------------------------------------------------
WIDTH = 1225


class Wide(nn.Module):
    """12 M parameters in 8 matrices: a checkpoint big enough for RSS to tell copies apart."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(8))
        self.out = nn.Linear(WIDTH, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def _trainer(model: nn.Module, folder: Path, dctx: DistContext) -> Trainer:
    t = OmegaConf.create(
        {"lr": 1e-3, "weight_decay": 0.01, "epochs": 5, "warmup_epochs": 0, "min_lr_ratio": 0.0}
    )
    optimizer, scheduler = build_optimizer(model, t, steps_per_epoch=2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    update = OptimizerUpdate(optimizer, scheduler, scaler, StepPolicy())
    with open_dict(t):
        t.early_stop_patience = 3
    ckpt = Checkpointer(RunDir(folder), True, dctx.is_main, {})
    return Trainer(t, model, model, None, (None, None), update, None, None, ckpt, dctx, None)


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM (peak RSS) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def _resume_worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(100 + rank)  # different weights per rank before the resume
    dctx = DistContext(rank, rank, 2, CPU, "gloo")
    trainer = _trainer(Wide(), Path(folder), dctx)
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    trainer.resume_from(RunDir(Path(folder)).last)
    peak = _status_bytes("VmHWM")
    state = trainer.update.optimizer.state
    result = {
        "weights": [float(p.detach().double().sum()) for p in trainer.model.parameters()],
        "exp_avg": [float(state[p]["exp_avg"].double().sum()) for p in trainer.model.parameters()],
        "step_on_host": all(state[p]["step"].device.type == "cpu" for p in state),
        "best": [float(v.double().sum()) for v in trainer.best_state.values()],
        "start_epoch": trainer.start_epoch,
        "lr": trainer.update.scheduler.get_last_lr(),
        "rng": float(torch.rand(1)),
        "peak_growth": peak - before,
    }
    torch.distributed.destroy_process_group()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(result))


def test_ddp_resume_broadcasts_tensors_in_place_not_a_pickled_checkpoint(tmp_path: Path) -> None:
    """Two gloo ranks resume one last.pt: both end up with rank 0's file, and rank 1's memory
    grows by what it must hold (AdamW state, best weights) plus one tensor, not by the two or
    three copies a pickled broadcast of the checkpoint costs."""
    torch.manual_seed(0)
    model = Wide()
    dctx = DistContext(0, 0, 1, CPU, None)
    trainer = _trainer(model, tmp_path, dctx)
    model(torch.randn(4, WIDTH)).sum().backward()
    trainer.update.optimizer.step()
    trainer.early.update(0.8, 0.4, 2)
    trainer.best_state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = [checkpoint.rng_state(), checkpoint.rng_state()]
    trainer.checkpointer.save(trainer._resume_state(2, rng), trainer._best_file())
    saved = checkpoint.load(RunDir(tmp_path).last)
    torch.multiprocessing.spawn(
        _resume_worker, args=(distributed.free_port(), str(tmp_path)), nprocs=2, join=True
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    want_weights = [float(v.double().sum()) for v in saved["model"].values()]
    exp_avg = [float(s["exp_avg"].double().sum()) for s in saved["optimizer"]["state"].values()]
    for r in ranks:
        assert r["weights"] == pytest.approx(want_weights, rel=1e-12)
        assert sorted(r["exp_avg"]) == pytest.approx(sorted(exp_avg), rel=1e-12)
        assert r["step_on_host"]  # AdamW's step stays a host tensor (no sync per step)
        assert r["best"] == pytest.approx(want_weights, rel=1e-12)
        assert r["start_epoch"] == 3
    assert ranks[0]["rng"] == ranks[1]["rng"]  # both restored the saved per-rank streams
    n_bytes = sum(p.numel() * 4 for p in model.parameters())  # 48 MB of fp32
    must_hold = 3 * n_bytes  # exp_avg + exp_avg_sq + the best weights on the host
    assert ranks[1]["peak_growth"] < must_hold + 0.35 * n_bytes, ranks[1]["peak_growth"] / 1e6


# -- 6. host syncs per optimizer step -----------------------------------------------------------------
HOST_READS = {"item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"}


class HostReads(TorchFunctionMode):
    """Counts tensor reads to the host made by her2exp's own code (on a GPU each is a sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}her2exp{os.sep}" in caller and "tests" not in caller:
                self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("accumulation", [1, 3])
def test_at_most_one_host_read_per_optimizer_step(accumulation: int) -> None:
    """With the progress bar on, clipping and skip-on-non-finite: the step's flags and loss
    come back in one read; nothing else of her2exp's reads a tensor inside the epoch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    policy = StepPolicy(
        accumulation_steps=accumulation,
        grad_clip_norm=1.0,
        on_nonfinite="skip",
        show_progress=True,
    )
    update = OptimizerUpdate(
        optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), policy
    )
    loader = DataLoader(Patches(96), batch_size=8)
    with warnings.catch_warnings(), HostReads() as reads:
        warnings.simplefilter("ignore")
        stats = train_one_epoch(
            model, loader, nn.CrossEntropyLoss(), update, Preprocess(CPU), EpochState()
        )
    steps = -(-len(loader) // accumulation)
    assert stats.samples == 96 and np.isfinite(stats.loss)
    assert 0 < reads.count <= steps


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (make gpu-check)")
def test_cuda_step_synchronises_once_per_optimizer_step() -> None:
    """torch's own sync detector: bf16 autocast, clipping, no GradScaler (whose inf check is a
    sync of its own), batches in pinned memory."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(288, 2))
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    policy = StepPolicy(autocast_dtype=torch.bfloat16, grad_clip_norm=1.0, show_progress=True)
    update = OptimizerUpdate(
        optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False), policy
    )
    loader = DataLoader(Patches(160), batch_size=16, pin_memory=True)
    preprocess = Preprocess(device)
    train_one_epoch(model, loader, nn.CrossEntropyLoss(), update, preprocess, EpochState())
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(model, loader, nn.CrossEntropyLoss(), update, preprocess, EpochState())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= len(loader) + 1, [str(w.message) for w in syncs[:5]]  # + the epoch's end
