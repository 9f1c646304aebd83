"""Torchvision ResNets as segmentation backbones: the one place model.weights becomes ResNet weights.

model.weights is none | imagenet | a local .pth file (torchvision's ImageNet state dict); a failed
download names the offline option instead of ending in a traceback.
"""
from __future__ import annotations

from pathlib import Path

import torch
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
