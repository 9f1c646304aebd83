"""The reference paper's custom model: dilated ResNet-50, a few conv3x3-BN-ReLU, bilinear upsampling.

Also holds `build_resnet`, the one place that turns model.weights (none | imagenet | a local
.pth file) into a torchvision ResNet, with the offline-download error message; unet.py reuses
it. FIXME: move it to segpipe/backbones.py (or models.py) once the registry settles.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import (
    ResNet,
    ResNet18_Weights,
    ResNet34_Weights,
    ResNet50_Weights,
    resnet18,
    resnet34,
    resnet50,
)
from torchvision.models._utils import IntermediateLayerGetter

# IMAGENET1K_V2 for ResNet-50 is torchvision's better recipe (80.9 vs 76.1 top-1);
# ResNet-18/34 only ship V1.
RESNETS = {
    "resnet18": (resnet18, ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (resnet34, ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (resnet50, ResNet50_Weights.IMAGENET1K_V2),
}


def weights_download_error(arch: str, cause: BaseException) -> RuntimeError:
    """Explain that the ImageNet weights of `arch` could not be fetched, and what to do instead."""
    enum = RESNETS[arch][1]
    file_name = Path(enum.url).name
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return RuntimeError(
        f"could not download the ImageNet weights {enum} for {arch} from {enum.url} "
        f"({type(cause).__name__}: {cause}); this machine may be offline. Either train from "
        f"random init with model.weights=none, or fetch {file_name} on a machine with internet "
        f"and pass its path, model.weights=/path/to/{file_name} (copying it into {cache} also works)."
    )


def build_resnet(arch: str, weights: str = "none", **resnet_kwargs) -> ResNet:
    """Build a torchvision ResNet with weights "none", "imagenet" or a path to torchvision's ImageNet .pth file."""
    if arch not in RESNETS:
        raise ValueError(f"unknown ResNet '{arch}'; choose one of {sorted(RESNETS)}")
    constructor, enum = RESNETS[arch]
    if weights == "none":
        return constructor(weights=None, **resnet_kwargs)
    if weights == "imagenet":
        try:
            return constructor(weights=enum, **resnet_kwargs)
        except OSError as error:  # URLError, socket timeouts, DNS failures are all OSErrors
            raise weights_download_error(arch, error) from error
    path = Path(weights)
    if not path.is_file():
        raise ValueError(
            f"model.weights='{weights}' is neither 'none', 'imagenet' nor an existing file; "
            f"use one of those or the path to torchvision's {Path(enum.url).name}"
        )
    model = constructor(weights=None, **resnet_kwargs)
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"{path} is not a torchvision {arch} ImageNet state dict (expected {Path(enum.url).name}): {error}"
        ) from error
    return model


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


def build_resnet50_convhead(
    num_classes: int, weights: str = "none", output_stride: int = 8, depth: int = 3, width: int = 256
) -> nn.Module:
    """Build the paper's custom model; weights apply to the ResNet-50 backbone only."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if output_stride not in DILATION_FOR_OUTPUT_STRIDE:
        raise ValueError(f"output_stride must be one of {sorted(DILATION_FOR_OUTPUT_STRIDE)}, got {output_stride}")
    if depth < 0 or width < 1:
        raise ValueError(f"need depth >= 0 and width >= 1, got depth={depth}, width={width}")
    resnet = build_resnet("resnet50", weights, replace_stride_with_dilation=DILATION_FOR_OUTPUT_STRIDE[output_stride])
    backbone = IntermediateLayerGetter(resnet, return_layers={"layer4": "out"})
    return ConvHeadSegmenter(backbone, in_channels=2048, num_classes=num_classes, depth=depth, width=width)
