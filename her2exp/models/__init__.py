"""What a run trains: timm backbones with a HER2 head, the heads, the losses, attention MIL.

Owns `backbones` (`Her2Classifier`, `build`, weights loading, fine-tuning modes, state digests),
`knn` (the kNN head of `probe=knn`), `losses` and `mil` (the ABMIL model). May import `core`,
`config` and the pure floors (`metrics`, `stain`, `slides`), and its siblings `runtime` and
`reports` (no cycle); never `tracking`, `data`, `engine` or anything above. The names below are
re-exported because callers have always written `from her2exp import models; models.build(...)`.
"""

from her2exp.models.backbones import (
    Her2Classifier,
    build,
    check_model_name,
    create_kwargs,
    layer_ids,
    load_backbone_weights,
    maybe_compile,
    normalisation,
    set_finetune,
    state_digest,
    update_digest,
)
from her2exp.models.knn import KNNHead

__all__ = [
    "Her2Classifier",
    "KNNHead",
    "build",
    "check_model_name",
    "create_kwargs",
    "layer_ids",
    "load_backbone_weights",
    "maybe_compile",
    "normalisation",
    "set_finetune",
    "state_digest",
    "update_digest",
]
