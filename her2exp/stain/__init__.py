"""Stain normalisation (batched Macenko) and stain augmentation (HED jitter) in torch.

Why a package of its own: colour differences between sites are the main domain shift in HER2
IHC; normalisation (validation/test and training) and augmentation (training only) act on uint8
batches on any device and never touch files (docs/architecture.md: one home per concern).
"""

from her2exp.stain.hed import HedJitter
from her2exp.stain.macenko import MacenkoInfo, MacenkoNormalizer

__all__ = ["HedJitter", "MacenkoInfo", "MacenkoNormalizer"]
