"""Each loss kind against a hand computation on a tiny example."""
import math

import pytest
import torch

from segpipe.losses import SegmentationLoss, dice_loss

IGNORE = 255


def example():
    """Two classes, one image of 1 x 3 pixels, the last pixel ignored."""
    logits = torch.tensor([[[[2.0, 0.0, 5.0]], [[0.0, 1.0, -5.0]]]])  # (N=1, C=2, H=1, W=3)
    target = torch.tensor([[[0, 1, IGNORE]]])
    return logits, target


def hand_ce() -> float:
    p0 = math.exp(2) / (math.exp(2) + 1)  # pixel 0, class 0
    p1 = math.exp(1) / (math.exp(1) + 1)  # pixel 1, class 1
    return -(math.log(p0) + math.log(p1)) / 2


def hand_dice() -> float:
    a = math.exp(2) / (math.exp(2) + 1)  # P(class 0) at pixel 0
    b = 1 / (math.exp(1) + 1)  # P(class 0) at pixel 1
    # class 0: truth only at pixel 0; class 1: truth only at pixel 1; eps = 1 in both ratios
    d0 = (2 * a + 1) / ((a + b) + 1 + 1)
    d1 = (2 * (1 - b) + 1) / (((1 - a) + (1 - b)) + 1 + 1)
    return 1 - (d0 + d1) / 2


@pytest.mark.parametrize("kind, expected", [("ce", hand_ce), ("dice", hand_dice),
                                            ("ce+dice", lambda: hand_ce() + hand_dice())])
def test_each_loss_kind_matches_its_formula(kind, expected):
    logits, target = example()
    loss = SegmentationLoss(kind, IGNORE)({"out": logits}, target)
    assert loss.item() == pytest.approx(expected(), rel=1e-5)


def test_dice_leaves_ignored_pixels_out():
    logits, target = example()
    changed = logits.clone()
    changed[..., 2] = torch.tensor([-9.0, 9.0]).view(1, 2, 1)  # only the ignored pixel changes
    assert dice_loss(logits, target, IGNORE).item() == pytest.approx(dice_loss(changed, target, IGNORE).item())


def test_aux_head_adds_its_weighted_loss():
    logits, target = example()
    loss = SegmentationLoss("ce", IGNORE, aux_weight=0.25)({"out": logits, "aux": logits}, target)
    assert loss.item() == pytest.approx(1.25 * hand_ce(), rel=1e-5)
