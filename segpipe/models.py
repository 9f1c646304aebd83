"""build_model(name, num_classes, weights): one registry of segmentation networks, nothing clever."""
from __future__ import annotations

from typing import Callable
from urllib.error import URLError

import torch
import torch.nn.functional as nnf
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, segmentation as seg


class ModelError(ValueError):
    """A model name or weights option the user must fix."""


# name -> (torchvision builder, COCO weights, ImageNet backbone weights, has an auxiliary head)
_TORCHVISION = {
    "deeplabv3_resnet50": (seg.deeplabv3_resnet50, seg.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
                           ResNet50_Weights.IMAGENET1K_V1, True),
    "deeplabv3_mobilenet_v3_large": (seg.deeplabv3_mobilenet_v3_large,
                                     seg.DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
                                     MobileNet_V3_Large_Weights.IMAGENET1K_V1, True),
    "lraspp_mobilenet_v3_large": (seg.lraspp_mobilenet_v3_large,
                                  seg.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
                                  MobileNet_V3_Large_Weights.IMAGENET1K_V1, False),
    "fcn_resnet50": (seg.fcn_resnet50, seg.FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
                     ResNet50_Weights.IMAGENET1K_V1, True),
}


def _unet(num_classes: int, weights: str) -> nn.Module:
    from segpipe.unet import build_unet
    return build_unet(num_classes, weights)


def _resnet50_convhead(num_classes: int, weights: str) -> nn.Module:
    from segpipe.convhead import build_resnet50_convhead
    return build_resnet50_convhead(num_classes, weights)


# The reference paper's baselines, built by their own modules.
_OTHERS: dict[str, Callable[[int, str], nn.Module]] = {"unet": _unet, "resnet50_convhead": _resnet50_convhead}
MODEL_NAMES = sorted(_TORCHVISION) + sorted(_OTHERS)


def build_model(name: str, num_classes: int, weights: str = "none") -> nn.Module:
    """A segmentation model whose forward returns {"out": logits, ["aux": logits]} at input resolution.

    weights: "none" (random init), "imagenet" (backbone only), "coco" (torchvision's COCO_WITH_VOC_LABELS_V1,
    classifier heads replaced for num_classes), or a path to a .pth state dict or segpipe checkpoint.
    """
    if name not in _TORCHVISION and name not in _OTHERS:
        raise ModelError(f"model.name={name!r} is not known; choose one of {', '.join(MODEL_NAMES)}")
    is_path = weights not in ("none", "imagenet", "coco")
    if name in _OTHERS:
        if weights == "coco":
            raise ModelError(f"model.weights=coco is not available for {name}; use none, imagenet or a .pth path")
        model = _OTHERS[name](num_classes, "none" if is_path else weights)
    else:
        builder, coco, imagenet, aux = _TORCHVISION[name]
        kwargs = {"aux_loss": aux} if aux else {}
        if weights == "coco":
            model = _download(lambda: builder(weights=coco, **kwargs), name, weights)
            _replace_classifiers(model, coco.meta["categories"], num_classes)
        else:
            backbone = imagenet if weights == "imagenet" else None
            model = _download(lambda: builder(weights=None, weights_backbone=backbone, num_classes=num_classes,
                                              **kwargs), name, weights)
    if is_path:
        load_pretrained(model, weights)
    return model


def _download(build: Callable[[], nn.Module], name: str, weights: str) -> nn.Module:
    try:
        return build()
    except (URLError, OSError, RuntimeError) as e:
        if weights == "none":
            raise
        raise ModelError(
            f"could not download the {weights} weights for {name} ({e}). Offline? Train from scratch with "
            f"model.weights=none, or download the weights elsewhere and pass model.weights=/path/to/file.pth "
            f"(torchvision caches them in ~/.cache/torch/hub/checkpoints)") from None


def _replace_classifiers(model: nn.Module, categories: list, num_classes: int) -> None:
    """Swap every head convolution that predicts the COCO/VOC categories for a fresh one with num_classes."""
    for head_name in ("classifier", "aux_classifier"):
        head = getattr(model, head_name, None)
        if head is None:
            continue
        for parent in head.modules():
            for child_name, child in parent.named_children():
                if isinstance(child, nn.Conv2d) and child.out_channels == len(categories):
                    setattr(parent, child_name, nn.Conv2d(child.in_channels, num_classes, child.kernel_size,
                                                          child.stride, child.padding, bias=child.bias is not None))


def load_pretrained(model: nn.Module, path: str) -> None:
    """Load matching tensors from a .pth file: a whole-model or backbone state dict, or a segpipe checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"model.weights={path}: no such file; use none, imagenet, coco or a .pth path") from None
    except Exception as e:
        raise ModelError(f"model.weights={path} is not a loadable state dict ({e})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    own = model.state_dict()
    if not any(k in own for k in state) and any(f"backbone.{k}" in own for k in state):
        state = {f"backbone.{k}": v for k, v in state.items()}  # a bare ImageNet backbone file
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ModelError(f"model.weights={path}: none of its tensors fit {type(model).__name__}; "
                         f"is it for another architecture?")
    model.load_state_dict(matched, strict=False)
    skipped = len(own) - len(matched)
    print(f"loaded {len(matched)} tensors from {path}; {skipped} left at their initial values (e.g. new heads)")


def has_batchnorm_pooling(model: nn.Module) -> bool:
    """True for models whose ASPP image-pooling BatchNorm cannot train on a per-process batch of 1."""
    return any(type(m).__name__ == "ASPPPooling" for m in model.modules())


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Float logits bilinearly resized to size (h, w), as scoring at the mask's full resolution needs."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = nnf.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits
