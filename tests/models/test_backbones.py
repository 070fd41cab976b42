"""Backbones: local weights, foundation-model configs, fine-tuning modes, layer decay and the
feature cache. Offline throughout: architectures are built with random weights (tiny ones at
32 px; the foundation models on PyTorch's meta device), written to local files and loaded back
through `model.weights`, exactly as a cluster without internet would.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf, open_dict
from safetensors.torch import save_file

from conftest import compose_train, mlflow_store, run_cli
from her2exp import data, models
from her2exp.config import ConfigError, validate
from her2exp.core import checkpoint
from her2exp.engine import features
from her2exp.runtime import distributed
from her2exp.training import run as train_mod
from her2exp.training.trainer import build_optimizer

VIT = ["model.name=vit_tiny_patch16_224", "+model.kwargs.img_size=32"]
CPU = torch.device("cpu")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A ViT-Ti/16 (32 px) with an ImageNet-style 1000-class head, saved as .safetensors."""
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=1000).eval()
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return path, ref


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """timm's test_resnet backbone (with BatchNorm) saved as a .pth state dict."""
    torch.manual_seed(2)
    backbone = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.pth"
    torch.save(backbone.state_dict(), path)
    return path


# -- local weights -------------------------------------------------------------------------------
def test_local_safetensors_weights_give_the_files_backbone(vit_file, tmp_path: Path) -> None:
    path, ref = vit_file
    cfg = compose_train([*VIT, f"model.weights={path}"], tmp_path)
    validate(cfg)
    torch.manual_seed(99)  # the head is new; the backbone must be exactly the file's
    model = models.build(cfg.model, CPU).eval()
    x = _images()
    with torch.no_grad():
        expected = ref.forward_head(ref.forward_features(x), pre_logits=True)
        assert torch.equal(model.embed(x), expected)
    assert model.weights_info == {
        "source": "file",
        "file": str(path.resolve()),
        "sha256": _sha256(path),
    }


def test_pretrained_uses_timms_own_loading(vit_file, tmp_path: Path) -> None:
    """model.pretrained=true goes through timm's loader (here pointed at a local file with
    timm's pretrained_cfg_overlay, so no hub is needed) and records a digest of what it loaded."""
    path, ref = vit_file
    overlay = f"+model.kwargs.pretrained_cfg_overlay={{file: '{path}'}}"
    cfg = compose_train([*VIT, "model.pretrained=true", overlay], tmp_path)
    validate(cfg)
    model = models.build(cfg.model, CPU).eval()
    x = _images()
    with torch.no_grad():
        expected = ref.forward_head(ref.forward_features(x), pre_logits=True)
        assert torch.equal(model.embed(x), expected)
    info = model.weights_info
    assert info["source"] == "timm pretrained" and info["hub_id"] == "vit_tiny_patch16_224"
    assert info["state_sha256"] == models.state_digest(model.backbone)
    # Evaluation rebuilds the same architecture without loading anything.
    assert models.build(cfg.model, CPU, load_weights=False).weights_info["source"] == "random init"


def test_weights_round_trip_through_the_config(tmp_path: Path) -> None:
    """A model's backbone saved (.pth) and loaded back through model.weights: same outputs."""
    cfg = compose_train(VIT, tmp_path)
    torch.manual_seed(3)
    original = models.build(cfg.model, CPU).eval()
    path = tmp_path / "backbone.pth"
    torch.save(original.backbone.state_dict(), path)
    loaded = models.build(compose_train([*VIT, f"model.weights={path}"]).model, CPU).eval()
    loaded.head.load_state_dict(original.head.state_dict())
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))
    # A her2exp checkpoint (backbone.* + head.*) is accepted too: start from a previous run.
    checkpoint.save({"model": original.state_dict()}, tmp_path / "best.pt")
    again = models.build(compose_train([*VIT, f"model.weights={tmp_path / 'best.pt'}"]).model, CPU)
    with torch.no_grad():
        assert torch.equal(again.eval().embed(x), original.embed(x))


def test_missing_and_unexpected_keys_are_named(vit_file, tmp_path: Path) -> None:
    path, ref = vit_file
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    del state["blocks.3.attn.qkv.weight"]
    state["blocks.0.ls1.gamma"] = torch.ones(192)  # LayerScale weights, but init_values not set
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    cfg = compose_train([*VIT, f"model.weights={bad}"], tmp_path)
    with pytest.raises(ConfigError) as err:
        models.build(cfg.model, CPU)
    message = str(err.value)
    assert "1 missing key(s): blocks.3.attn.qkv.weight" in message
    assert "1 unexpected key(s): blocks.0.ls1.gamma" in message
    assert "head.weight" not in message  # the file's ImageNet head is not ours to load
    missing = compose_train([*VIT, f"model.weights={tmp_path / 'nope.pth'}"], tmp_path)
    with pytest.raises(ConfigError, match="nope.pth' does not exist"):
        models.build(missing.model, CPU)


# -- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.finetune=partial"], "model.finetune"),
        (["model.head=transformer"], "model.head"),
        (["model.embedding=gem"], "model.embedding"),
        (["model.finetune=last_n_blocks", "model.n_last_blocks=0"], "model.n_last_blocks"),
        (["trainer.layer_decay=1.5"], "trainer.layer_decay"),
        (["model.pretrained=true", "model.weights=/w.pth"], "model.weights"),
        (["model.weights=/w.npz"], "model.weights"),
        (["+model.kwargs.num_classes=5"], "model.kwargs.num_classes"),
        (["model.cache_features=true", "data.augment=false"], "model.cache_features"),
        (["model.finetune=frozen", "model.cache_features=true"], "data.augment"),
        (
            [
                "model.finetune=frozen",
                "model.cache_features=true",
                "data.augment=false",
                "stain=hed_jitter",
            ],
            "stain.name",
        ),
    ],
)
def test_bad_backbone_options_fail_with_one_line(overrides: list[str], key: str) -> None:
    cfg = compose_train(["experiment=smoke", *overrides])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        validate(cfg)
    assert "\n" not in str(err.value)
    if key == "data.augment":  # the refusal says why
        assert "drawn once and frozen into the cache" in str(err.value)


# -- foundation-model configs --------------------------------------------------------------------
FOUNDATION = {
    # option: (hub name, embedding size, parameters in millions, mean)
    "uni": ("hf-hub:MahmoodLab/uni", 1024, 303, (0.485, 0.456, 0.406)),
    "h_optimus_0": ("hf-hub:bioptimus/H-optimus-0", 1536, 1135, (0.707223, 0.578729, 0.703617)),
    "virchow2": ("hf-hub:paige-ai/Virchow2", 2560, 631, (0.485, 0.456, 0.406)),
    "prov_gigapath": ("hf_hub:prov-gigapath/prov-gigapath", 1536, 1135, (0.485, 0.456, 0.406)),
    # issue 19: the newer backbones (parameters as each model card states them)
    "uni2_h": ("hf-hub:MahmoodLab/UNI2-h", 1536, 681, (0.485, 0.456, 0.406)),
    "h0_mini": ("hf-hub:bioptimus/H0-mini", 1536, 86, (0.707223, 0.578729, 0.703617)),
}
#: The model card's SwiGLU MLP (timm.layers.SwiGLUPacked) with SiLU, and the prefix tokens
#: (class token + registers) of those that have registers.
SWIGLU_PREFIX = {"virchow2": 5, "uni2_h": 9, "h0_mini": 5}


@pytest.mark.parametrize("option", sorted(FOUNDATION))
def test_foundation_model_composes_and_its_architecture_builds(option: str) -> None:
    """Composed as a user would, kwargs instantiated by Hydra, the architecture built on the
    meta device (no memory, no download) and its embedding shape checked."""
    hub, dim, millions, mean = FOUNDATION[option]
    cfg = compose_train([f"model={option}", "data.image_size=224"])
    validate(cfg)
    assert cfg.model.hub_id == hub and cfg.model.pretrained is False
    kwargs = models.create_kwargs(cfg.model)
    assert kwargs["img_size"] == 224
    assert kwargs["init_values"] == 1e-5
    if option in SWIGLU_PREFIX:
        assert kwargs["act_layer"] is torch.nn.SiLU
    with torch.device("meta"):
        model = models.build(cfg.model, torch.device("meta"))
        out = model(torch.zeros(2, 3, 224, 224))
        emb = model.embed(torch.zeros(2, 3, 224, 224))
    assert tuple(emb.shape) == (2, dim) and tuple(out.shape) == (2, 2)
    if option in SWIGLU_PREFIX:
        mlp = model.backbone.blocks[0].mlp
        assert isinstance(mlp, timm.layers.GluMlp) and isinstance(mlp.act, torch.nn.SiLU)
        assert model.backbone.num_prefix_tokens == SWIGLU_PREFIX[option]
    n = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    assert n == pytest.approx(millions, rel=0.01)
    got_mean, _ = models.normalisation(model)
    assert got_mean == pytest.approx(mean)


def test_h_optimus_1_is_h_optimus_0s_architecture_and_transform() -> None:
    """The card: H-optimus-0's architecture and mean/std, so only the hub name differs (built
    once above, as h_optimus_0)."""
    one = OmegaConf.to_container(compose_train(["model=h_optimus_1"]).model)
    zero = OmegaConf.to_container(compose_train(["model=h_optimus_0"]).model)
    assert one.pop("hub_id") == "hf-hub:bioptimus/H-optimus-1"
    zero.pop("hub_id")
    assert one == zero


def test_fixed_size_foundation_model_names_its_input_size() -> None:
    cfg = compose_train(["model=h_optimus_0"])
    with pytest.raises(ConfigError, match="at least 224 px"):
        validate(cfg)


# -- fine-tuning modes and the optimizer ---------------------------------------------------------
def test_last_n_blocks_trains_the_top_blocks_and_the_head() -> None:
    cfg = compose_train([*VIT, "model.finetune=last_n_blocks", "model.n_last_blocks=2"])
    model = models.build(cfg.model, CPU)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"blocks.10.mlp.fc1.weight", "blocks.11.attn.qkv.weight", "norm.weight"} <= {
        n.removeprefix("backbone.") for n in trainable
    }
    assert "head.1.weight" in trainable
    assert not any(n.startswith(("backbone.blocks.9.", "backbone.patch_embed")) for n in trainable)
    assert "backbone.cls_token" not in trainable


def test_layer_decay_scales_each_vit_block(tmp_path: Path) -> None:
    cfg = compose_train([*VIT, "trainer.layer_decay=0.5", "trainer.lr=1e-3"], tmp_path)
    model = models.build(cfg.model, CPU)
    optimizer, _ = build_optimizer(model, cfg.trainer, steps_per_epoch=10)
    names = {id(p): n for n, p in model.named_parameters()}
    lr = {names[id(p)]: g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}
    decay = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    # 12 blocks: stem = group 0, block i = group i + 1 (the final norm joins block 11), head 13.
    assert lr["head.1.weight"] == pytest.approx(1e-3)
    assert lr["backbone.blocks.11.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.5)
    assert lr["backbone.norm.weight"] == pytest.approx(1e-3 * 0.5)
    assert lr["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5**12)
    assert lr["backbone.patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.5**13)
    assert decay["backbone.pos_embed"] == 0.0 and decay["backbone.blocks.0.norm1.weight"] == 0.0
    assert decay["backbone.blocks.0.attn.qkv.weight"] == cfg.trainer.weight_decay


def test_default_schedule_is_the_former_warmup_then_cosine(tmp_path: Path) -> None:
    """The LambdaLR that lets layer-decayed groups keep their ratios reproduces the former
    SequentialLR(LinearLR, CosineAnnealingLR) of the default run step for step."""
    cfg = compose_train(["experiment=smoke"], tmp_path).trainer
    steps = 7
    p = torch.nn.Parameter(torch.zeros(2))
    ours, sched = build_optimizer(torch.nn.Linear(2, 2), cfg, steps)
    old = torch.optim.AdamW([p], lr=cfg.lr)
    total = cfg.epochs * steps
    warmup = int(round(cfg.warmup_epochs * steps))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        old, T_max=total - warmup, eta_min=cfg.lr * cfg.min_lr_ratio
    )
    ramp = torch.optim.lr_scheduler.LinearLR(
        old, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup
    )
    old_sched = torch.optim.lr_scheduler.SequentialLR(old, [ramp, cosine], milestones=[warmup])
    for _ in range(total):
        assert ours.param_groups[0]["lr"] == pytest.approx(old.param_groups[0]["lr"], abs=1e-12)
        ours.step(), sched.step(), old.step(), old_sched.step()


def _train(tmp: Path, *extra: str) -> dict:
    cfg = compose_train(["experiment=smoke", "tracking=off", *extra], tmp)
    return train_mod.train(cfg)


def test_frozen_backbone_is_unchanged_by_training(resnet_file: Path, tmp_path: Path) -> None:
    _train(tmp_path, f"model.weights={resnet_file}", "model.finetune=frozen")
    trained = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["model"]
    initial = torch.load(resnet_file, weights_only=True)
    assert any("running_mean" in k for k in initial)  # BatchNorm statistics are checked too
    for key, value in initial.items():
        assert torch.equal(trained[f"backbone.{key}"], value), key
    fresh = models.build(compose_train(["experiment=smoke"]).model, CPU)
    assert not torch.equal(trained["head.1.weight"], fresh.head[1].weight)  # the head trained


def test_cached_features_train_the_same_head_as_uncached(resnet_file, tmp_path: Path) -> None:
    common = [f"model.weights={resnet_file}", "model.finetune=frozen", "data.augment=false"]
    plain = _train(tmp_path / "plain", *common)
    cache_dir = tmp_path / "shared_cache"
    cached = _train(
        tmp_path / "cached",
        *common,
        "model.cache_features=true",
        f"model.feature_cache_dir={cache_dir}",
    )
    n_images = 24 * 12
    assert cached["feature_cache"]["computed"] == n_images
    assert cached["feature_cache"]["reused"] == 0
    last = {
        name: checkpoint.load(tmp_path / name / "checkpoints" / "last.pt")["model"]
        for name in ("plain", "cached")
    }
    for key in ("head.1.weight", "head.1.bias"):
        torch.testing.assert_close(last["cached"][key], last["plain"][key], atol=1e-5, rtol=1e-4)
    assert cached["best_val_auc"] == pytest.approx(plain["best_val_auc"], abs=1e-6)
    assert cached["test_auc"] == pytest.approx(plain["test_auc"], abs=1e-6)
    # The best checkpoint is the whole model: backbone + head, usable without any cache.
    best = checkpoint.load(tmp_path / "cached" / "checkpoints" / "best.pt")
    assert (
        any(k.startswith("backbone.") for k in best["model"]) and "head.1.weight" in best["model"]
    )
    # A second run on the shared cache embeds nothing.
    again = _train(
        tmp_path / "again",
        *common,
        "model.cache_features=true",
        f"model.feature_cache_dir={cache_dir}",
    )
    assert again["feature_cache"]["computed"] == 0
    assert again["feature_cache"]["reused"] == n_images
    assert again["test_auc"] == pytest.approx(cached["test_auc"], abs=1e-9)


# -- the feature cache ---------------------------------------------------------------------------
class _Counter:
    """Counts images through the backbone (a forward hook: the real backbone still runs)."""

    def __init__(self, model: models.Her2Classifier) -> None:
        self.n = 0
        model.backbone.register_forward_hook(self)

    def __call__(self, _module, inputs, _output) -> None:
        self.n += inputs[0].shape[0]


def _cache_setup(tmp_path: Path, *extra: str):
    cfg = compose_train(["experiment=smoke", "data.augment=false", *extra], tmp_path)
    model = models.build(cfg.model, CPU)
    mean, std = models.normalisation(model)
    cfg.data.mean, cfg.data.std = cfg.data.mean or mean, cfg.data.std or std
    return cfg, model


def test_feature_cache_embeds_each_image_once_and_reuses(resnet_file, tmp_path: Path) -> None:
    cfg, model = _cache_setup(tmp_path, f"model.weights={resnet_file}")
    bundle = data.build(cfg.data, cfg.seed)
    # Every patch twice over: a duplicate image is still embedded once.
    twice = data.DataBundle(
        manifest=bundle.manifest.loc[bundle.manifest.index.repeat(2)].reset_index(drop=True),
        patches=data.InMemoryPatches(np.repeat(bundle.images, 2, axis=0)),
        fingerprint=bundle.fingerprint,
    )
    dctx = distributed.init("cpu")
    counter = _Counter(model)
    first = features.build(model, twice, cfg, tmp_path / "cache", dctx, None)
    distinct = len(set(features.image_hashes(bundle.images)))
    assert counter.n == first.computed == distinct and first.reused == 0
    second = features.build(model, twice, cfg, tmp_path / "cache", dctx, None)
    assert counter.n == distinct and second.computed == 0 and second.reused == distinct
    for split in features.SPLITS:
        assert torch.equal(first.features[split], second.features[split])
    # The cached embedding is the model's own embedding of the normalised patch.
    val = torch.from_numpy(twice.images[twice.indices("val")[:5]]).permute(0, 3, 1, 2).float()
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        direct = model.eval().embed((val - mean) / std)
    torch.testing.assert_close(first.features["val"][:5], direct, atol=1e-5, rtol=1e-4)


def test_feature_cache_is_invalidated_by_weights_and_transform(resnet_file, tmp_path) -> None:
    cache = tmp_path / "cache"
    dctx = distributed.init("cpu")
    cfg, model = _cache_setup(tmp_path, f"model.weights={resnet_file}")
    bundle = data.build(cfg.data, cfg.seed)
    n = len(set(features.image_hashes(bundle.images)))
    base = features.build(model, bundle, cfg, cache, dctx, None)
    assert base.computed == n
    # Other weights (another file): a new key, everything embedded again.
    other = tmp_path / "other.pth"
    state = torch.load(resnet_file, weights_only=True)
    state = {k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, other)
    cfg2, model2 = _cache_setup(tmp_path, f"model.weights={other}")
    changed = features.build(model2, bundle, cfg2, cache, dctx, None)
    assert changed.key != base.key and changed.computed == n
    # Another transform (normalisation): again a new key.
    cfg3, model3 = _cache_setup(
        tmp_path,
        f"model.weights={resnet_file}",
        "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.25,0.25,0.25]",
    )
    renorm = features.build(model3, bundle, cfg3, cache, dctx, None)
    assert renorm.key not in (base.key, changed.key) and renorm.computed == n
    # Random-init weights are keyed by a digest of the parameters themselves.
    cfg4, model4 = _cache_setup(tmp_path)
    with torch.no_grad():
        model4.backbone.conv1[0].weight.add_(1.0)
    key4, _ = features.cache_key(
        model4, cfg4.model, cfg4.data.mean, cfg4.data.std, None, None, None
    )
    cfg5, model5 = _cache_setup(tmp_path)
    key5, _ = features.cache_key(
        model5, cfg5.model, cfg5.data.mean, cfg5.data.std, None, None, None
    )
    assert key4 != key5
    # And the original set-up still finds its entries.
    assert features.build(model, bundle, cfg, cache, dctx, None).computed == 0


def test_stain_normalisation_is_applied_before_caching(resnet_file, tmp_path: Path) -> None:
    from her2exp.stain import pipeline as stain_pipeline

    cfg, model = _cache_setup(tmp_path, f"model.weights={resnet_file}", "stain=macenko")
    bundle = data.build(cfg.data, cfg.seed)
    stain = stain_pipeline.build(cfg.stain, bundle.images[bundle.indices("train")], cfg.seed)
    dctx = distributed.init("cpu")
    plain = features.build(model, bundle, cfg, tmp_path / "cache", dctx, None)
    normed = features.build(model, bundle, cfg, tmp_path / "cache", dctx, None, stain)
    assert normed.key != plain.key and normed.computed == plain.computed
    x = torch.from_numpy(bundle.images[bundle.indices("test")[:4]]).permute(0, 3, 1, 2)
    x = stain(x.contiguous(), False).float()
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        direct = model.eval().embed((x - mean) / std)
    torch.testing.assert_close(normed.features["test"][:4], direct, atol=1e-5, rtol=1e-4)


# -- the real CLI --------------------------------------------------------------------------------
def test_cli_cached_probe_records_the_weights_and_evaluates(resnet_file, tmp_path: Path) -> None:
    """her2exp-train with a frozen, cached probe on local weights, as the README shows; the
    MLflow run names the weights file and its sha256; her2exp-eval's evaluation then scores
    best.pt with the weights file gone (the checkpoint holds the whole model)."""
    import mlflow

    weights = tmp_path / "backbone.pth"
    weights.write_bytes(resnet_file.read_bytes())
    run_dir = tmp_path / "run"
    mlflow_store(tmp_path / "mlflow.db")
    proc = run_cli(
        [
            "experiment=smoke",
            f"model.weights={weights}",
            "model.finetune=frozen",
            "model.cache_features=true",
            "data.augment=false",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = next(ln for ln in proc.stdout.splitlines() if ln.startswith("her2exp: MLflow run "))
    run_id = run_id.split()[3]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["weights.source"] == "file"
    assert tags["weights.file"] == str(weights.resolve())
    assert tags["weights.sha256"] == _sha256(weights)
    assert params["model.weights"] == str(weights) and params["model.finetune"] == "frozen"
    assert params["data.mean"] == "[0.5, 0.5, 0.5]"  # test_resnet's own, via resolve_data_config
    assert metrics["features_computed"] == 24 * 12 and metrics["features_reused"] == 0
    assert (run_dir / "features" / tags["features.cache_key"]).is_dir()
    assert math.isfinite(metrics["test_auc"]) and metrics["best_val_auc"] > 0.5
    history = client.get_metric_history(run_id, "epoch_seconds")
    assert len(history) == 2

    weights.unlink()
    from her2exp import evaluation
    from her2exp.cli.common import compose

    best = run_dir / "checkpoints" / "best.pt"
    ecfg = compose("eval", [f"checkpoint={best}", "tracking=off", "data.n_patients=12"])
    with open_dict(ecfg):
        ecfg.data.patches_per_patient = 4
        ecfg.output_dir = str(tmp_path / "eval")
    external = evaluation.evaluate_cohort(ecfg)["evaluation"]
    assert external.n == 12 * 4 and 0.0 <= external.auc.auc <= 1.0
    state = OmegaConf.create(checkpoint.load(run_dir / "checkpoints" / "best.pt")["config"])
    assert state.model.cache_features is True and list(state.data.mean) == [0.5, 0.5, 0.5]


@pytest.mark.slow
def test_ddp_cached_probe_matches_one_process(tmp_path: Path) -> None:
    """Two gloo workers embed half of the images each, with rank 0's (random-init) backbone,
    and train the same head as one process does. In `make test-slow` only:
    test_cached_features_train_the_same_head_as_uncached proves the cached head equals the
    uncached one and test_ddp_matches_single_process DDP's equality with one process."""
    import json

    args = ["model.finetune=frozen", "model.cache_features=true", "data.augment=false"]
    single = _train(tmp_path / "single", *args)
    run_dir = tmp_path / "ddp"
    proc = run_cli(
        [
            "experiment=smoke",
            "tracking=off",
            "trainer.nproc_per_node=2",
            *args,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (key_dir,) = (run_dir / "features").iterdir()  # both ranks used one key: the same weights
    assert key_dir.name == single["feature_cache"]["key"]
    best = json.loads((run_dir / "reports" / "best.json").read_text())
    assert best["best_val_auc"] == pytest.approx(single["best_val_auc"], abs=0.002)
    assert best["test_auc"] == pytest.approx(single["test_auc"], abs=0.002)
