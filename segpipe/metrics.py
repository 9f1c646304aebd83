"""ConfusionMatrix: update, all_reduce, IoU / mIoU / Dice (F1) / accuracy.

A class absent from both truth and prediction has no defined IoU or Dice: it is NaN in per-class results,
excluded from the means, and listed under "absent_classes". Per class, Dice = 2TP / (truth + prediction) is
the F-score with beta = 1 (mmsegmentation's Fscore), so mDice and mFscore are equal; both are reported
because both names are in use.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """Counts of (truth, prediction) pixel pairs; rows are truth, columns prediction."""

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device | str = "cpu"):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        """Add one batch of class maps of equal shape; ignore_index pixels in target are skipped."""
        target, pred = target.flatten().long(), pred.flatten().long()
        keep = target != self.ignore_index
        pairs = target[keep] * self.num_classes + pred[keep]
        n = self.num_classes
        self.matrix += torch.bincount(pairs, minlength=n * n).view(n, n).to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the matrix over all processes (works with gloo on CPU and nccl on CUDA alike)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix)

    def compute(self) -> dict:
        """IoU, Dice, precision and accuracy (recall) per class; mIoU, mDice, mFscore, pixel accuracy, mean accuracy
        and frequency-weighted IoU."""
        m = self.matrix.double().cpu()
        tp, truth, predicted = m.diag(), m.sum(1), m.sum(0)
        union = truth + predicted - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
        acc = torch.where(truth > 0, tp / truth.clamp(min=1), torch.nan)
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.nan)
        dice = torch.where(union > 0, 2 * tp / (truth + predicted).clamp(min=1), torch.nan)
        total = m.sum().clamp(min=1)
        freq = truth / total
        present = union > 0
        return {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "mdice": float(dice[present].mean()) if present.any() else float("nan"),
            "mfscore": float(dice[present].mean()) if present.any() else float("nan"),  # F1 per class = Dice
            "pixel_accuracy": float(tp.sum() / total),
            "mean_accuracy": float(acc[truth > 0].mean()) if (truth > 0).any() else float("nan"),
            "fw_iou": float((freq[present] * iou[present]).sum()),
            "iou": iou.tolist(),
            "dice": dice.tolist(),
            "precision": precision.tolist(),
            "accuracy": acc.tolist(),
            "pixel_share": freq.tolist(),
            "absent_classes": [i for i in range(self.num_classes) if not present[i]],
            "num_pixels": int(m.sum()),
        }
