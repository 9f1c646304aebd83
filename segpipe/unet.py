"""U-Net baseline: a torchvision ResNet encoder with a light skip-connection decoder, any input size.

Why a ResNet encoder and not the classic double-conv one: the classic full-width U-Net
(64..1024 channels, two 3x3 convs per level) costs about 290 GFLOPs at 360x480 (hand count),
eight times this model's 37, and has no ImageNet weights in torchvision. A ResNet encoder
gives `model.weights_backbone=imagenet`, and ResNet-50 (the default) is the backbone of the other two
models in the paper's comparison, so differences come from the decoder; its Bottleneck blocks
are also what compress.py's channel pruning works on. ResNet-18/34 are cheaper encoders
(`encoder=`), but have BasicBlocks, which that pruning does not touch.

Decoder: at each of the five scales, upsample x2 (nearest), concatenate the encoder skip,
fuse with a 1x1 conv and refine with one 3x3 conv. The 1x1 fuse keeps ResNet-50's wide skips
cheap: a 3x3 conv on the 2048 + 1024 channels at stride 16 alone would add 10 GFLOPs,
a third of the encoder.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segpipe.backbones import ResNetFeatures, build_resnet
from segpipe.convhead import conv_bn_relu

# The encoder's total stride: inputs are padded to a multiple of it so every skip lines up.
STRIDE = 32
# Encoder outputs at strides 2, 4, 8, 16, 32 (torchvision ResNet module names).
SKIP_LAYERS = {"relu": "s2", "layer1": "s4", "layer2": "s8", "layer3": "s16", "layer4": "s32"}
ENCODER_CHANNELS = {
    "resnet18": (64, 64, 128, 256, 512),
    "resnet34": (64, 64, 128, 256, 512),
    "resnet50": (64, 256, 512, 1024, 2048),
}


class DecoderBlock(nn.Module):
    """Upsample to the skip's size, concatenate it, fuse with conv1x1-BN-ReLU, refine with conv3x3-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.fuse = conv_bn_relu(in_channels + skip_channels, out_channels, kernel_size=1)
        self.refine = conv_bn_relu(out_channels, out_channels, kernel_size=3)

    def forward(self, x: Tensor, skip: Optional[Tensor], size: Sequence[int]) -> Tensor:
        """Upsample x to `size`; `skip` is None for the full-resolution block, which has no skip."""
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:  # a structural choice fixed at build time, not a data-dependent branch
            x = torch.cat([x, skip], dim=1)
        return self.refine(self.fuse(x))


class UNet(nn.Module):
    """ResNet encoder + five decoder blocks (strides 16, 8, 4, 2, 1) + 1x1 classifier."""

    def __init__(
        self,
        backbone: nn.Module,
        encoder_channels: Sequence[int],
        num_classes: int,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    ):
        super().__init__()
        if len(encoder_channels) != 5 or len(decoder_channels) != 5:
            raise ValueError(
                f"need 5 encoder and 5 decoder channel counts (strides 2..32), got "
                f"{list(encoder_channels)} and {list(decoder_channels)}"
            )
        self.backbone = backbone  # returns {"s2", "s4", "s8", "s16", "s32"}
        skips = list(encoder_channels[3::-1]) + [0]  # s16, s8, s4, s2, then none at full size
        ins = [encoder_channels[4]] + list(decoder_channels[:-1])
        self.decoder = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, decoder_channels))
        self.classifier = nn.Conv2d(decoder_channels[-1], num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Return {"out": logits of shape [N, num_classes, H, W]} for any H, W."""
        height, width = x.shape[-2:]
        # Pad bottom/right to a multiple of STRIDE so each upsampled map matches its skip exactly;
        # always pad (possibly by 0) so torch.export sees no shape-dependent branch. Zero is the
        # ImageNet mean after normalisation, so the border looks like a neutral grey.
        x = F.pad(x, (0, (-width) % STRIDE, 0, (-height) % STRIDE))
        features = self.backbone(x)
        skips = [features["s16"], features["s8"], features["s4"], features["s2"], None]
        y = features["s32"]
        for block, skip in zip(self.decoder, skips):
            size = skip.shape[-2:] if skip is not None else x.shape[-2:]
            y = block(y, skip, size)
        # narrow_copy, not [..., :height, :width]: a view makes torch.export guard on whether
        # any padding was added, which breaks export with dynamic height and width.
        logits = self.classifier(y).narrow_copy(2, 0, height).narrow_copy(3, 0, width)
        return {"out": logits}


def build_unet(num_classes: int, weights: str = "none", weights_backbone: str = "none",
               encoder: str = "resnet50") -> nn.Module:
    """Build the U-Net baseline; weights_backbone ("none" | "imagenet") applies to the encoder (no whole-model
    weights exist: weights must be "none")."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if encoder not in ENCODER_CHANNELS:
        raise ValueError(f"unknown U-Net encoder '{encoder}'; choose one of {sorted(ENCODER_CHANNELS)}")
    if weights != "none":
        raise ValueError(f"model.weights={weights} is not available for unet (no whole-model weights exist); use "
                         f"none, model.weights_backbone=imagenet, or a local file")
    backbone = ResNetFeatures(build_resnet(encoder, weights_backbone), return_layers=SKIP_LAYERS)
    return UNet(backbone, ENCODER_CHANNELS[encoder], num_classes)
