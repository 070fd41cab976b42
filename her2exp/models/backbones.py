"""timm backbones with a HER2 head: weights from the hub or a local file, fine-tuning modes.

Every model is `Her2Classifier(backbone, head)`: a timm backbone built with `num_classes=0`
(its embedding) and a small head. One structure for full fine-tuning, frozen probes and cached
features means a checkpoint is always the whole model, whichever way it was trained.
Nothing is downloaded unless `model.pretrained=true`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from timm.layers import Mlp
from timm.models import group_parameters, load_checkpoint
from torch import nn

from her2exp.config import ConfigError, close_matches
from her2exp.core import checkpoint
from her2exp.models.knn import KNNHead


def check_model_name(name: str) -> None:
    """Fail before training on a name timm does not know, suggesting what the user likely meant."""
    if name.startswith(("hf-hub:", "hf_hub:")):
        return
    if timm.is_model(name):
        return
    available = timm.list_models()
    if name not in available:
        hints = close_matches(name, available)
        hint = f"; did you mean: {', '.join(hints)}" if hints else ""
        raise ConfigError(f"model.name={name!r} is not a timm model (see timm.list_models()){hint}")


class Her2Classifier(nn.Module):
    """A timm backbone's embedding followed by the HER2 head.

    `embed` is what the feature cache stores and `head` what a frozen probe trains, so cached
    and uncached training compute the same function.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, embedding: str = "pooled") -> None:
        super().__init__()
        self.backbone, self.head, self.embedding = backbone, head, embedding
        self.frozen_backbone = False
        self.weights_info: dict[str, str] = {"source": "random init"}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding == "pooled":
            return self.backbone(x)
        # Virchow2's embedding: class token next to the mean of the patch tokens (registers,
        # like the class token, are prefix tokens and left out of the mean).
        tokens = self.backbone.forward_features(x)
        n_prefix = getattr(self.backbone, "num_prefix_tokens", 1)
        return torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(dim=1)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def train(self, mode: bool = True) -> Her2Classifier:
        """A frozen backbone stays in eval mode: BatchNorm statistics and dropout are part of
        the features a probe learns on, and must not drift while the head trains."""
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    # timm's layer-wise lr decay (param_groups_layer_decay) groups parameters with these.
    def group_matcher(self, coarse: bool = False) -> Any:
        inner = layer_ids(self.backbone, coarse)
        top = max(inner.values(), default=-1) + 1

        def layer_of(name: str) -> int:
            if name.startswith("backbone."):
                return inner.get(name[len("backbone.") :], top - 1)
            return top  # the head sits above every backbone layer

        return layer_of

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{n}" for n in inner}


def layer_ids(backbone: nn.Module, coarse: bool = False) -> dict[str, int]:
    """Parameter name -> timm layer group (0 = stem), as timm's layer decay counts them."""
    if not hasattr(backbone, "group_matcher"):
        return {name: 0 for name, _ in backbone.named_parameters()}
    return group_parameters(backbone, backbone.group_matcher(coarse=coarse), reverse=True)


def create_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """`model.kwargs` with `_target_` nodes instantiated (classes, partials) for timm."""
    kwargs = cfg.get("kwargs") or {}
    if isinstance(kwargs, DictConfig):
        kwargs = OmegaConf.to_container(kwargs, resolve=True)
    try:
        return dict(instantiate(kwargs, _convert_="all"))
    except Exception as exc:  # noqa: BLE001 - any instantiation failure is a config problem
        raise ConfigError(f"model.kwargs could not be instantiated: {exc}") from exc


def _head(cfg: DictConfig, in_features: int) -> nn.Module:
    if cfg.head == "knn":  # probe=knn: fitted on the cached training embeddings, not trained
        return KNNHead(in_features, cfg.get("knn_k", 20))
    if cfg.head == "mlp":
        return Mlp(in_features, cfg.head_hidden_dim, cfg.num_classes, drop=cfg.drop_rate)
    return nn.Sequential(nn.Dropout(cfg.drop_rate), nn.Linear(in_features, cfg.num_classes))


def build(cfg: DictConfig, device: torch.device, load_weights: bool = True) -> Her2Classifier:
    """Create the classifier; `pretrained=false` by default so nothing downloads.

    `load_weights=False` builds the same architecture without fetching weights: what evaluation
    and prediction do before loading a trained checkpoint (which holds the backbone too).
    """
    check_model_name(cfg.name)
    kwargs = create_kwargs(cfg)
    hub = cfg.get("hub_id") or cfg.name
    try:
        if load_weights and cfg.pretrained:
            backbone = timm.create_model(hub, pretrained=True, num_classes=0, **kwargs)
        else:
            backbone = timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as exc:  # an unknown kwarg for this architecture
        raise ConfigError(f"model.kwargs do not fit model.name={cfg.name}: {exc}") from exc
    info = {"source": "random init"}
    if load_weights and cfg.pretrained:
        info = {"source": "timm pretrained", "hub_id": str(hub)}
        tag = backbone.pretrained_cfg.get("hf_hub_id") or backbone.pretrained_cfg.get("url")
        if tag:
            info["pretrained_cfg"] = str(tag)
        info["state_sha256"] = state_digest(backbone)  # what was downloaded, as loaded
    elif load_weights and cfg.get("weights"):
        info = load_backbone_weights(backbone, cfg.weights)
    n_features = backbone.num_features * (2 if cfg.get("embedding") == "cls_mean" else 1)
    model = Her2Classifier(backbone, _head(cfg, n_features), cfg.get("embedding", "pooled"))
    model.weights_info = info
    set_finetune(model, cfg.get("finetune", "full"), cfg.get("n_last_blocks", 1))
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def update_digest(digest: Any, obj: Any) -> None:
    """Feed nested dicts/lists/tensors into a hash deterministically (keys sorted)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        update_digest(digest, torch.from_numpy(np.ascontiguousarray(obj)))
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            digest.update(str(k).encode())
            update_digest(digest, obj[k])
    elif isinstance(obj, list | tuple):
        for v in obj:
            update_digest(digest, v)
    else:
        digest.update(repr(obj).encode())


def state_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers: the identity of weights without a file."""
    digest = hashlib.sha256()
    update_digest(digest, dict(module.state_dict()))
    return digest.hexdigest()


def _her2exp_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """A her2exp best.pt (backbone.* + head.*) as a backbone state dict; others unchanged."""
    if state and all(k.startswith(("backbone.", "head.")) for k in state):
        return {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> dict[str, str]:
    """Load a local weights file into the backbone (timm.models.load_checkpoint, weights only).

    The file's classifier (timm's pretrained_cfg["classifier"], e.g. an ImageNet head) is not
    loaded: her2exp puts its own head on the embedding. Any other missing or unexpected key is
    an error that names the keys: a silently half-loaded backbone trains on garbage.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.weights={str(path)!r} does not exist")
    classifier = backbone.pretrained_cfg.get("classifier") or ()
    prefixes = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
    try:
        result = load_checkpoint(
            backbone,
            str(path),
            strict=False,
            filter_fn=lambda state, _model: _her2exp_checkpoint(state),
            weights_only=True,
        )
    except RuntimeError as exc:  # shape mismatches: another architecture or other kwargs
        raise ConfigError(
            f"model.weights={str(path)!r} does not fit model.name={backbone.default_cfg.get('architecture')}"
            f" with these model.kwargs: {exc}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - unreadable file: name it
        raise ConfigError(f"model.weights={str(path)!r} could not be read: {exc}") from exc
    missing = list(result.missing_keys)
    unexpected = [k for k in result.unexpected_keys if not k.startswith(prefixes)]
    if missing or unexpected:

        def listing(keys: list[str]) -> str:
            more = f" ... (+{len(keys) - 12} more)" if len(keys) > 12 else ""
            return ", ".join(keys[:12]) + more

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {listing(unexpected)}")
        raise ConfigError(
            f"model.weights={str(path)!r} does not match the backbone {backbone.__class__.__name__}"
            f" built from model.name and model.kwargs: {'; '.join(parts)} (check model.kwargs, e.g."
            " init_values for LayerScale weights, reg_tokens, mlp_layer)"
        )
    return {"source": "file", "file": str(path.resolve()), "sha256": checkpoint.sha256_file(path)}


def set_finetune(model: Her2Classifier, mode: str, n_last_blocks: int = 1) -> None:
    """full: train everything; frozen: head only; last_n_blocks: the top `n_last_blocks` timm
    layer groups of the backbone (the ones layer decay counts; a ViT's final norm goes with its
    last block) plus the head."""
    model.frozen_backbone = mode == "frozen"
    for p in model.parameters():
        p.requires_grad_(True)
    if mode == "full":
        return
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    if mode == "last_n_blocks":
        ids = layer_ids(model.backbone)
        first = max(ids.values(), default=0) - n_last_blocks + 1
        for name, p in model.backbone.named_parameters():
            if ids.get(name, first) >= first:
                p.requires_grad_(True)
    model.train(model.training)


def normalisation(model: Her2Classifier) -> tuple[list[float], list[float]]:
    """The backbone's own input mean/std (timm.data.resolve_data_config on its pretrained_cfg)."""
    resolved = timm.data.resolve_data_config({}, model=model.backbone)
    return [float(v) for v in resolved["mean"]], [float(v) for v in resolved["std"]]


def maybe_compile(model: torch.nn.Module, cfg: DictConfig) -> torch.nn.Module:
    """torch.compile when asked; the uncompiled module is kept for checkpoints."""
    if cfg.compile:
        return torch.compile(
            model,
            backend=cfg.compile_backend,
            mode=None if cfg.compile_backend != "inductor" else cfg.compile_mode,
        )
    return model
