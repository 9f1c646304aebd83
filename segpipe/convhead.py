"""The reference paper's custom model: dilated ResNet-50, a few conv3x3-BN-ReLU, bilinear upsampling."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from segpipe.backbones import ResNetFeatures, build_resnet


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv (no bias: BN has one) + BatchNorm + ReLU, the unit every head and decoder here uses."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ConvHeadSegmenter(nn.Module):
    """Backbone features -> `depth` conv3x3-BN-ReLU -> 1x1 classifier -> bilinear to the input size."""

    def __init__(self, backbone: nn.Module, in_channels: int, num_classes: int, depth: int, width: int):
        super().__init__()
        self.backbone = backbone  # returns {"out": last feature map}, like torchvision's segmenters
        channels = [in_channels] + [width] * depth
        self.head = nn.Sequential(*(conv_bn_relu(c_in, c_out) for c_in, c_out in zip(channels, channels[1:])))
        self.classifier = nn.Conv2d(channels[-1], num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Return {"out": logits of shape [N, num_classes, H, W]} for any H, W."""
        features = self.backbone(x)["out"]
        logits = self.classifier(self.head(features))
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}


# Which of layer2/3/4 trade their stride for dilation, as torchvision's resnet50() expects.
DILATION_FOR_OUTPUT_STRIDE = {8: [False, True, True], 16: [False, False, True]}


def build_resnet50_convhead(num_classes: int, weights: str = "none", weights_backbone: str = "none",
                            output_stride: int = 8, head_depth: int = 3, head_width: int = 256) -> nn.Module:
    """Build the paper's custom model; weights_backbone applies to the ResNet-50 (no whole-model weights exist)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if output_stride not in DILATION_FOR_OUTPUT_STRIDE:
        raise ValueError(f"output_stride must be one of {sorted(DILATION_FOR_OUTPUT_STRIDE)}, got {output_stride}")
    if head_depth < 0 or head_width < 1:
        raise ValueError(f"need head_depth >= 0 and head_width >= 1, got {head_depth} and {head_width}")
    if weights != "none":
        raise ValueError(f"model.weights={weights} is not available for resnet50_convhead (no whole-model weights "
                         f"exist); use none, model.weights_backbone=imagenet, or a local file")
    resnet = build_resnet("resnet50", weights_backbone,
                          replace_stride_with_dilation=DILATION_FOR_OUTPUT_STRIDE[output_stride])
    backbone = ResNetFeatures(resnet, return_layers={"layer4": "out"})
    return ConvHeadSegmenter(backbone, in_channels=2048, num_classes=num_classes, depth=head_depth, width=head_width)
