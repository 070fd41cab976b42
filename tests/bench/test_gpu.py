"""The GPU paths, on a real CUDA device (`make gpu-check`; skipped with a reason without CUDA).

What the CPU suite cannot show: fp16 autocast with a live GradScaler, clipping and a skipped
non-finite step; bf16 autocast; channels_last and torch.compile (inductor) training like the
plain model; Macenko on the device equal to the CPU result; an NCCL process group (DDP through
her2exp's engine); cached features computed on the GPU equal to the CPU ones. Each test uses
her2exp's public pieces the way training does and compares with the CPU or the plain path.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset

from conftest import compose_train
from her2exp import data, models
from her2exp.bench.stain import ihc_patches
from her2exp.engine import (
    EpochState,
    OptimizerUpdate,
    Preprocess,
    StepPolicy,
    features,
    train_one_epoch,
)
from her2exp.runtime import distributed
from her2exp.runtime.amp import resolve_amp
from her2exp.stain import MacenkoNormalizer

NO_CUDA = "no CUDA: torch.cuda.is_available() is false"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


class Patches(Dataset):
    """Fixed uint8 patches (3, size, size), label and index, as PatchDataset yields them."""

    def __init__(self, n: int, size: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.y = torch.arange(n) % 2

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


def small_cnn(seed: int = 0) -> nn.Module:
    """Conv + BatchNorm (buffers a skipped step must restore) + linear head, for 8 px patches."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 2),
    )


def sgd_update(
    model: nn.Module, policy: StepPolicy, device: torch.device, scaler: bool, lr: float
) -> OptimizerUpdate:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    grad_scaler = torch.amp.GradScaler(device.type, enabled=scaler)
    return OptimizerUpdate(optimizer, schedule, grad_scaler, policy)


def head_dtypes(model: nn.Module) -> set[torch.dtype]:
    """The dtypes the last layer produced (a forward hook): what autocast really ran."""
    seen: set[torch.dtype] = set()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    last.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    return seen


def epoch_losses(
    model: nn.Module,
    update: OptimizerUpdate,
    preprocess: Preprocess,
    dataset: Dataset,
    epochs: int = 1,
) -> list[float]:
    loader = DataLoader(dataset, batch_size=8)
    return [
        train_one_epoch(
            model, loader, nn.CrossEntropyLoss(), update, preprocess, EpochState(e)
        ).loss
        for e in range(1, epochs + 1)
    ]


@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """Full fp32 convolutions and matmuls (no TF32) while a test compares two fp32 paths."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_fp16_gradscaler_clipping_and_a_skipped_step_leave_finite_weights() -> None:
    """trainer.amp=fp16 on CUDA: autocast in fp16, a live GradScaler, clipping, and a NaN batch
    skipped (on_nonfinite=skip): one step skipped, the scaler backed off, weights and BatchNorm
    buffers finite, and the steps after the skip still train."""
    assert resolve_amp("fp16", CUDA) == (torch.float16, True)
    model = small_cnn().to(CUDA)
    dtypes = head_dtypes(model)
    policy = StepPolicy(
        autocast_dtype=torch.float16, grad_clip_norm=1.0, on_nonfinite="skip", debug_nan_at_step=2
    )
    update = sgd_update(model, policy, CUDA, scaler=True, lr=0.01)
    scale = update.scaler.get_scale()
    before = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(Patches(48), batch_size=8)
    stats = train_one_epoch(
        model, loader, nn.CrossEntropyLoss(), update, Preprocess(CUDA), EpochState()
    )
    assert dtypes == {torch.float16}
    assert stats.nonfinite_steps == 1 and stats.samples == 40  # the bad window's 8 left out
    assert update.scaler.get_scale() <= scale * update.scaler.get_backoff_factor()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in model.buffers() if b.is_floating_point())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_bf16_autocast_trains() -> None:
    """trainer.amp=bf16 (and auto on a bf16 GPU): bf16 autocast, no scaler, the loss falls."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16 support")
    assert resolve_amp("bf16", CUDA) == (torch.bfloat16, False)
    assert resolve_amp("auto", CUDA) == (torch.bfloat16, False)
    model = small_cnn().to(CUDA)
    dtypes = head_dtypes(model)
    update = sgd_update(model, StepPolicy(autocast_dtype=torch.bfloat16), CUDA, False, 0.05)
    losses = epoch_losses(model, update, Preprocess(CUDA), Patches(32), epochs=15)
    assert dtypes == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


def _her2exp_model(*overrides: str) -> tuple[nn.Module, object]:
    """experiment=smoke's model (timm's test_resnet) on the GPU, and its config."""
    cfg = compose_train(["experiment=smoke", *overrides])
    return models.build(cfg.model, CUDA), cfg


def test_channels_last_trains_like_contiguous(exact_fp32: None) -> None:
    """model.channels_last=true: weights and inputs in NHWC, and an epoch's loss and weights
    equal the NCHW model's from the same start."""
    nhwc, _ = _her2exp_model("model.channels_last=true")
    nchw = copy.deepcopy(nhwc).to(memory_format=torch.contiguous_format)
    convs = [m.weight for m in nhwc.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    pre_nhwc, pre_nchw = Preprocess(CUDA, channels_last=True), Preprocess(CUDA)
    x = pre_nhwc(Patches(4, size=32).x)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    dataset, policy = Patches(48, size=32), StepPolicy(grad_clip_norm=1.0)
    loss_nhwc = epoch_losses(nhwc, sgd_update(nhwc, policy, CUDA, False, 0.01), pre_nhwc, dataset)
    loss_nchw = epoch_losses(nchw, sgd_update(nchw, policy, CUDA, False, 0.01), pre_nchw, dataset)
    assert loss_nhwc == pytest.approx(loss_nchw, rel=1e-3)
    for a, b in zip(nhwc.parameters(), nchw.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_compile_on_and_off_give_the_same_loss(exact_fp32: None) -> None:
    """model.compile=true (inductor, as builders.py applies it): the same logits and the same
    epoch loss as the uncompiled model from the same weights."""
    plain, cfg = _her2exp_model("model.compile=true")
    raw = copy.deepcopy(plain)
    compiled = models.maybe_compile(raw, cfg.model)
    assert compiled is not raw
    x = Preprocess(CUDA)(Patches(8, size=32).x)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled.eval()(x), plain.eval()(x), rtol=1e-3, atol=1e-4, msg="eval logits"
        )
    dataset, policy = Patches(48, size=32), StepPolicy(grad_clip_norm=1.0)
    pre = Preprocess(CUDA)
    loss_on = epoch_losses(compiled, sgd_update(raw, policy, CUDA, False, 0.01), pre, dataset, 2)
    loss_off = epoch_losses(plain, sgd_update(plain, policy, CUDA, False, 0.01), pre, dataset, 2)
    assert loss_on == pytest.approx(loss_off, rel=1e-3)
    for a, b in zip(raw.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def _chw(images: np.ndarray) -> torch.Tensor:
    """(N,H,W,3) or (H,W,3) numpy uint8 -> channels-first torch."""
    t = torch.from_numpy(images)
    return t.permute(0, 3, 1, 2).contiguous() if t.dim() == 4 else t.permute(2, 0, 1).contiguous()


def test_macenko_on_cuda_equals_cpu_within_one_level() -> None:
    """stain.on_device=true: a reference fitted on the CPU and moved with .to(cuda) normalises
    real tissue (skimage's IHC sample) to within one uint8 level of the CPU result, with the
    same patches skipped; fitting on the GPU finds the same reference."""
    crops, reference = ihc_patches(n=32, size=128, seed=1)
    batch, ref = _chw(crops), _chw(reference)
    cpu = MacenkoNormalizer().fit(ref)
    moved = MacenkoNormalizer().load_state_dict(cpu.state_dict()).to(CUDA)
    out_cpu, info_cpu = cpu.normalize(batch)
    out_gpu, info_gpu = moved.normalize(batch.to(CUDA))
    assert out_gpu.device.type == CUDA.type and out_gpu.dtype == torch.uint8
    assert torch.equal(info_gpu.skipped.cpu(), info_cpu.skipped)
    diff = (out_gpu.cpu().int() - out_cpu.int()).abs()
    assert int(diff.max()) <= 1, f"max difference {int(diff.max())} levels"
    fitted_on_gpu = MacenkoNormalizer().fit(ref.to(CUDA))
    torch.testing.assert_close(
        fitted_on_gpu.stain_matrix.cpu(), cpu.stain_matrix, atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        fitted_on_gpu.max_concentrations.cpu(), cpu.max_concentrations, rtol=1e-4, atol=1e-5
    )


def _nccl_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: her2exp's distributed.init on NCCL, a flag agreed by every rank, one DDP epoch
    through her2exp's engine (no_sync included)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    dctx = distributed.init("auto", timeout_s=120)
    if world == 1:  # distributed.init joins a group only for world > 1: make one here
        torch.cuda.set_device(dctx.device)
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    flags = torch.tensor([float(rank == world - 1)], device=dctx.device)
    agreed = distributed.any_rank_tensor(flags).tolist()
    total = distributed.all_reduce_sum([float(rank + 1)], dctx.device)
    model = small_cnn().to(dctx.device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[dctx.device.index])
    update = sgd_update(
        ddp, StepPolicy(grad_clip_norm=1.0, accumulation_steps=2), CUDA, False, 0.01
    )
    loader = DataLoader(Patches(32, seed=rank), batch_size=8)
    stats = train_one_epoch(
        ddp,
        loader,
        nn.CrossEntropyLoss(),
        update,
        Preprocess(dctx.device),
        EpochState(),
        ddp.no_sync,
    )
    result = {
        "backend": torch.distributed.get_backend(),
        "device": str(dctx.device),
        "agreed": agreed,
        "total": total,
        "samples": stats.samples,
        "weights": [p.detach().double().sum().item() for p in model.parameters()],
    }
    distributed.teardown()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.parametrize("world", [1, 2])
def test_nccl_process_group_trains_ddp(world: int, tmp_path: Path) -> None:
    """An NCCL group of `world` processes (one GPU each): collectives agree, DDP trains and
    every rank ends with the same weights."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"NCCL world size {world} needs {world} GPUs, {torch.cuda.device_count()} here")
    mp.spawn(
        _nccl_worker, args=(world, distributed.free_port(), str(tmp_path)), nprocs=world, join=True
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(ranks):
        assert res["backend"] == "nccl" and res["device"] == f"cuda:{r}"
        assert res["agreed"] == [1.0]
        assert res["total"] == [world * (world + 1) / 2]
        assert res["samples"] == 32
        assert all(math.isfinite(w) for w in res["weights"])
    assert all(res["weights"] == ranks[0]["weights"] for res in ranks)


def test_cached_features_on_the_gpu_equal_the_cpu_ones(tmp_path: Path, exact_fp32: None) -> None:
    """model.cache_features on a GPU: features.build embeds every split on the device, and the
    embeddings equal those computed on the CPU."""
    cfg = compose_train(["experiment=smoke", "data.augment=false"], tmp_path)
    model = models.build(cfg.model, CPU)
    mean, std = models.normalisation(model)
    cfg.data.mean, cfg.data.std = cfg.data.mean or mean, cfg.data.std or std
    bundle = data.build(cfg.data, cfg.seed)
    on_cpu = features.build(model, bundle, cfg, tmp_path / "cpu", distributed.init("cpu"), None)
    on_gpu = features.build(
        copy.deepcopy(model).to(CUDA),
        bundle,
        cfg,
        tmp_path / "gpu",
        distributed.init(CUDA.type),
        None,
    )
    assert on_gpu.computed == on_cpu.computed > 0
    for split in features.SPLITS:
        assert on_gpu.features[split].device.type == "cpu"  # stored on the host, like the CPU's
        torch.testing.assert_close(
            on_gpu.features[split], on_cpu.features[split], rtol=1e-3, atol=1e-4, msg=split
        )
