"""Cross-entropy with ignore_index, Dice, their sum, and median-frequency class weights."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import nn

from segpipe.config import LOSSES



def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice averaged over classes, with ignored pixels left out of both sums."""
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    valid = (target != ignore_index).unsqueeze(1)
    onehot = nnf.one_hot(target.masked_fill(~valid.squeeze(1), 0), num_classes).permute(0, 3, 1, 2)
    probs, onehot = probs * valid, onehot * valid
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * intersection + eps) / (total + eps)).mean()


class SegmentationLoss(nn.Module):
    """The configured loss on the main output, plus aux_weight times it on the auxiliary head if present."""

    def __init__(self, kind: str, ignore_index: int, class_weights: Optional[torch.Tensor] = None,
                 aux_weight: float = 0.5):
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"train.loss={kind!r}; choose one of {', '.join(LOSSES)}")
        self.kind, self.ignore_index, self.aux_weight = kind, ignore_index, aux_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.kind in ("ce", "ce+dice"):  # not a substring test: "ce" is in "dice"
            loss = loss + nnf.cross_entropy(logits.float(), target, weight=self.class_weights,
                                            ignore_index=self.ignore_index)
        if self.kind in ("dice", "ce+dice"):
            loss = loss + dice_loss(logits, target, self.ignore_index)
        return loss

    def forward(self, outputs: dict, target: torch.Tensor) -> torch.Tensor:
        loss = self.single(outputs["out"], target)
        if "aux" in outputs and self.aux_weight:
            loss = loss + self.aux_weight * self.single(outputs["aux"], target)
        return loss


def median_frequency_weights(pixel_counts: np.ndarray, present_pixels: np.ndarray) -> torch.Tensor:
    """Eigen & Fergus weights: median(freq) / freq_c, freq_c = pixels of c / pixels of images containing c.

    Classes never seen get weight 0 (nothing to learn from and no reason to blow up the loss).
    """
    freq = np.where(present_pixels > 0, pixel_counts / np.maximum(present_pixels, 1), 0.0)
    seen = freq > 0
    weights = np.zeros_like(freq, dtype=np.float64)
    weights[seen] = np.median(freq[seen]) / freq[seen]
    return torch.tensor(weights, dtype=torch.float32)
