"""Mixed precision: which autocast dtype a run uses, and whether it needs a GradScaler.

One decision for training, the scoring pass and every command that scores a run, so a run is
scored in the precision it was trained in.
"""

from __future__ import annotations

import torch

NATIVE_BF16_CAPABILITY = (8, 0)


def resolve_amp(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler) for `trainer.amp` on the run's device.

    auto: bf16 where the run's GPU has it natively, else fp16 + GradScaler; fp32 on the CPU,
    where bf16 autocast without bf16 instructions runs many times slower. bf16 on the CPU only
    when asked. The capability asked is `device`'s, not the current device's.
    """
    capability = None
    if amp == "auto" and device.type == "cuda" and not torch.version.hip:
        capability = torch.cuda.get_device_capability(device)
    return amp_choice(amp, device.type, capability)


def amp_choice(
    amp: str, device_type: str, capability: tuple[int, int] | None
) -> tuple[torch.dtype | None, bool]:
    """The decision of `resolve_amp`, given the GPU's compute capability (None: not CUDA, or
    ROCm, whose bf16 is native on every GPU PyTorch supports)."""
    if amp == "off" or (amp == "auto" and device_type != "cuda"):
        return None, False
    if amp == "auto":
        native = capability is None or tuple(capability) >= NATIVE_BF16_CAPABILITY
        return (torch.bfloat16, False) if native else (torch.float16, True)
    if amp == "bf16":
        return torch.bfloat16, False
    return torch.float16, True
