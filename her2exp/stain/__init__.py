"""Stain normalisation (batched Macenko) and stain augmentation (HED jitter) in torch.

Why a package of its own: colour differences between sites are the main domain shift in HER2
IHC; normalisation (validation/test and training) and augmentation (training only) act on uint8
batches on any device and never touch files (docs/architecture.md: one home per concern).

Owns: :mod:`.estimate` (Macenko's stain-vector fit), :mod:`.log_affine` (the per-patch log-space
colour map both methods reduce to), :mod:`.macenko` (the normaliser), :mod:`.hed` (the jitter)
and :mod:`.pipeline` (the configured choice applied per batch, fitted on training patches).

May import: `her2exp.config` and `her2exp.core` only (a floor below data); never `metrics` or
`slides`, its siblings.
"""

from her2exp.stain.hed import HedJitter
from her2exp.stain.macenko import MacenkoInfo, MacenkoNormalizer

__all__ = ["HedJitter", "MacenkoInfo", "MacenkoNormalizer"]
