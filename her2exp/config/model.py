"""The model-side groups of a training config: `model.*` (backbone, head, fine-tuning, feature
cache), `loss.*`, `mil.*` (a head over bags) and `probe.*` (a frozen-backbone protocol), each
schema with the check of its values beside it.

Names are checked here only as strings: whether timm knows `model.name` is asked by
her2exp.models.check_model_name when training builds the run (timm is not imported here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from her2exp.config.choices import (
    BAG_BY_CHOICES,
    EMBEDDING_CHOICES,
    FINETUNE_CHOICES,
    HEAD_CHOICES,
    LOSS_CHOICES,
    MIL_CHOICES,
    PROBE_CHOICES,
    WEIGHT_SUFFIXES,
)
from her2exp.config.fields import option, ranged, refuse


@dataclass
class ModelConfig:
    """A timm backbone (built offline from `name` + `kwargs`) and the HER2 head on its embedding."""

    name: str = option(
        "resnet18", help="the timm architecture; hub names (hf-hub:...) go in hub_id"
    )
    pretrained: bool = option(
        False, help="timm's own pretrained weights (a hub download unless cached)"
    )
    hub_id: str | None = option(
        None, help="where pretrained=true loads from; null: timm's default for name"
    )
    weights: str | None = option(
        None, help="a local .safetensors/.pth/.bin for the backbone (offline)"
    )
    kwargs: dict[str, Any] = option(
        factory=dict,
        help="extra timm.create_model arguments; values with a _target_ are built by hydra.utils.instantiate",
    )
    embedding: str = option(
        "pooled", help="pooled: timm's global pool | cls_mean: class token + mean patch token"
    )
    head: str = option(
        "linear", help="linear | mlp (head_hidden_dim wide) | knn (a probe on cached features)"
    )
    head_hidden_dim: int = ranged(256, ge=1, help="head=mlp: width of the hidden layer")
    knn_k: int = ranged(
        20, ge=1, help="head=knn: neighbours voting (probe=knn sets it from probe.k)"
    )
    finetune: str = option("full", help="full | frozen (linear probe) | last_n_blocks")
    n_last_blocks: int = ranged(
        1, ge=1, help="finetune=last_n_blocks: timm layer groups trained, from the top"
    )
    cache_features: bool = option(
        False, help="frozen backbone: embed each image once, train the head on the embeddings"
    )
    feature_cache_dir: str | None = option(
        None,
        help="where cached features go; null: <run dir>/features; a shared folder is reused across runs",
    )
    num_classes: int = ranged(
        2, ge=2, le=2, allowed="2 (binary HER2-/HER2+)", help="classes of the head"
    )
    drop_rate: float = ranged(0.0, ge=0, lt=1, help="dropout before the head")
    channels_last: bool = option(
        False, help="channels-last memory format (faster convolutions on GPUs)"
    )
    compile: bool = option(False, help="torch.compile the model")
    compile_mode: str = option(
        "default", help="torch.compile's mode: default | reduce-overhead | max-autotune"
    )
    compile_before_ddp: bool = option(
        False, help="compile the model before wrapping it in DDP (else after)"
    )
    compile_backend: str = option("inductor", help="torch.compile's backend")
    min_image_size: int = ranged(
        32, ge=1, help="the smallest data.image_size the backbone accepts, in px"
    )


def validate_model(m: Any) -> None:
    """model.*: weights source, fine-tuning mode, head, feature cache."""
    if m.finetune not in FINETUNE_CHOICES:
        refuse("model.finetune", m.finetune, f"one of {', '.join(FINETUNE_CHOICES)}")
    if m.head not in HEAD_CHOICES:
        refuse("model.head", m.head, f"one of {', '.join(HEAD_CHOICES)}")
    if m.embedding not in EMBEDDING_CHOICES:
        refuse("model.embedding", m.embedding, f"one of {', '.join(EMBEDDING_CHOICES)}")
    if m.pretrained and m.weights:
        refuse(
            "model.weights",
            m.weights,
            "null with model.pretrained=true (give one source: the hub or a local file)",
        )
    if m.weights and not str(m.weights).lower().endswith(WEIGHT_SUFFIXES):
        refuse("model.weights", m.weights, f"a {', '.join(WEIGHT_SUFFIXES)} file")
    for key in ("num_classes", "pretrained", "pretrained_cfg", "checkpoint_path"):
        if key in m.kwargs:
            refuse(f"model.kwargs.{key}", m.kwargs[key], f"not set here (her2exp sets {key})")
    if m.head == "knn" and not m.cache_features:
        refuse(
            "model.head",
            m.head,
            "linear or mlp unless model.cache_features=true (the kNN head is fitted on the "
            "cached training embeddings; probe=knn sets both)",
        )
    if m.cache_features and m.finetune != "frozen":
        refuse(
            "model.cache_features",
            True,
            "true only with model.finetune=frozen (a backbone that trains changes its "
            "features every step)",
        )


@dataclass
class LossConfig:
    name: str = option("ce", help="ce (cross-entropy) | focal")
    gamma: float = ranged(2.0, ge=0, help="loss=focal: the focusing exponent")
    alpha: float | None = ranged(
        None,
        gt=0,
        lt=1,
        allowed="null or a value in (0, 1) weighting the HER2+ class",
        help="loss=focal: the weight of the HER2+ class; null: none",
    )
    use_class_weights: bool = option(
        False, help="weight classes by inverse frequency in the train split"
    )
    label_smoothing: float = ranged(0.0, ge=0, lt=1, help="label smoothing of the targets")


def validate_loss(loss: Any) -> None:
    """loss.*: the criterion and its class weighting."""
    if loss.name not in LOSS_CHOICES:
        refuse("loss.name", loss.name, f"one of {', '.join(LOSS_CHOICES)}")


@dataclass
class MilConfig:
    """A head over bags of cached tile embeddings (`mil=abmil`, ...; her2exp/mil/), one bag per
    `data.bag_by`; `none` is the patch classifier. Named apart from `evaluation.*_aggregation`,
    which aggregates patch scores after the fact."""

    name: str = option("none", help="none | mean_pool | max_pool | abmil")
    hidden: int = ranged(128, ge=1, help="the instance embedding's width in the head")
    attention_dim: int = ranged(128, ge=1, help="abmil: width of the attention network")
    dropout: float = ranged(0.25, ge=0, lt=1, help="dropout in the bag head")
    gated: bool = option(True, help="abmil: gated attention (Ilse et al. 2018, eq. 9)")
    batch_size: int = ranged(8, ge=1, help="bags per optimizer step (global) and per scoring batch")


def validate_mil(mil: Any, cfg: Any) -> None:
    """mil.*: the head, and what bags need of the other groups (the group files set them)."""
    if mil.name not in MIL_CHOICES:
        refuse("mil.name", mil.name, f"one of {', '.join(MIL_CHOICES)}")
    d = cfg.data
    if d.bag_by not in BAG_BY_CHOICES:
        refuse("data.bag_by", d.bag_by, f"one of {', '.join(BAG_BY_CHOICES)}")
    if mil.name == "none":
        return
    why = f"mil={mil.name} trains on bags of cached tile embeddings"
    if not cfg.model.cache_features:
        refuse("model.cache_features", False, f"true with mil={mil.name} ({why})")
    levels = (d.bag_by, "patient") if d.bag_by == "slide" else (d.bag_by,)
    e = cfg.evaluation
    if e.decision_level not in levels:
        refuse(
            "evaluation.decision_level",
            e.decision_level,
            f"{' or '.join(levels)} with mil={mil.name} data.bag_by={d.bag_by} (a bag is "
            f"scored as a whole: there are no tile scores to decide on)",
        )


@dataclass
class ProbeConfig:
    """A probing protocol of a frozen backbone on cached features (`probe=linear|knn|abmil`,
    experiment=fm_probe; her2exp/training/probe.py): the group files set the head, this records which
    protocol a run is, so a sweep's leaderboard can group its children by it."""

    name: str = option("none", help="none | linear | knn | abmil (the group file sets the head)")
    k: int = ranged(20, ge=1, help="probe=knn: neighbours by cosine similarity (sets model.knn_k)")
    n_runs: int = ranged(
        5, ge=1, help="seeds per backbone x protocol in an experiment=fm_probe multirun"
    )


def validate_probe(p: Any, cfg: Any) -> None:
    """probe.*: the protocol matches the head (and MIL) its group file set."""
    if p.name not in PROBE_CHOICES:
        refuse("probe.name", p.name, f"one of {', '.join(PROBE_CHOICES)}")
    head = cfg.model.head
    if p.name == "knn" and head != "knn":
        refuse("model.head", head, "knn with probe=knn (the protocol is the kNN head)")
    if p.name == "linear" and head != "linear":
        refuse("model.head", head, "linear with probe=linear")
    mil = (
        OmegaConf.select(cfg, "mil.name", default="none") if isinstance(cfg, DictConfig) else "none"
    )
    if p.name == "abmil" and mil != "abmil":
        refuse("mil.name", mil, "abmil with probe=abmil (the protocol is patient-level ABMIL)")
    if p.name in ("linear", "knn") and mil != "none":
        refuse("mil.name", mil, f"none with probe={p.name} (bags: probe=abmil)")
