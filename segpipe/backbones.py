"""Torchvision ResNets as segmentation backbones: ImageNet weights, and the feature maps the heads read.

model.weights_backbone is none | imagenet (a local file is loaded by segpipe.model_files); a failed
download names the offline options instead of ending in a traceback.
"""
from __future__ import annotations

from pathlib import Path

import torch
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

# IMAGENET1K_V2 for ResNet-50 is torchvision's better recipe (80.9 vs 76.1 top-1);
# ResNet-18/34 only ship V1.
RESNETS = {
    "resnet18": (resnet18, ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (resnet34, ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (resnet50, ResNet50_Weights.IMAGENET1K_V2),
}


class WeightsUnavailable(RuntimeError):
    """ImageNet weights that could not be downloaded; the message names the offline options."""


def weights_download_error(arch: str, cause: BaseException) -> WeightsUnavailable:
    """Explain that the ImageNet weights of `arch` could not be fetched, and what to do instead."""
    enum = RESNETS[arch][1]
    file_name = Path(enum.url).name
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return WeightsUnavailable(
        f"could not download the ImageNet weights {enum} for {arch} from {enum.url} "
        f"({type(cause).__name__}: {cause}); this machine may be offline. Either train from "
        f"random init with model.weights_backbone=none, or fetch {file_name} on a machine with internet "
        f"and pass its path, model.weights_backbone=/path/to/{file_name} (copying it into {cache} also works)."
    )


def build_resnet(arch: str, weights_backbone: str = "none", **resnet_kwargs) -> ResNet:
    """A torchvision ResNet with weights_backbone "none" or "imagenet" (downloaded; offline: a clear error)."""
    if arch not in RESNETS:
        raise ValueError(f"unknown ResNet '{arch}'; choose one of {sorted(RESNETS)}")
    constructor, enum = RESNETS[arch]
    if weights_backbone not in ("none", "imagenet"):
        raise ValueError(f"model.weights_backbone={weights_backbone!r}: use none, imagenet or a local file path")
    if weights_backbone == "none":
        return constructor(weights=None, **resnet_kwargs)
    try:
        return constructor(weights=enum, **resnet_kwargs)
    except OSError as error:  # URLError, socket timeouts, DNS failures are all OSErrors
        raise weights_download_error(arch, error) from error


class ResNetFeatures(nn.ModuleDict):
    """A ResNet's stem and stages up to the last one asked for; forward returns those stages' outputs by name.

    What torchvision's private models._utils.IntermediateLayerGetter does, with the same module names (so state
    dicts are unchanged). Not torchvision.models.feature_extraction.create_feature_extractor: its FX graph inlines
    the Bottleneck blocks, which structured pruning and int8's ReLU untying (segpipe.compress) work on as modules.
    """

    def __init__(self, resnet: ResNet, return_layers: dict[str, str]):
        layers, wanted = {}, set(return_layers)
        for name, module in resnet.named_children():
            layers[name] = module
            wanted.discard(name)
            if not wanted:
                break
        if wanted:
            raise ValueError(f"{sorted(wanted)} are not stages of this ResNet")
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """The outputs of the requested stages, keyed by their new names."""
        out = {}
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out
