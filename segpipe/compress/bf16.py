"""bf16 artefacts: fp32 weights run under bf16 autocast (a checkpoint with compression method "bf16")."""
from __future__ import annotations

import torch
from torch import nn


class Bf16Autocast(nn.Module):
    """Runs a float model under bf16 autocast in channels_last and returns fp32 logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16):
            out = self.model(images.contiguous(memory_format=torch.channels_last))
        return {k: v.float() for k, v in out.items()}
