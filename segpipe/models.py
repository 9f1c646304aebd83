"""build_model(name, num_classes, weights): one registry of segmentation networks, nothing clever."""
from __future__ import annotations

from typing import Callable
from urllib.error import URLError

import torch
import torch.nn.functional as nnf
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, segmentation as seg

from segpipe.backbones import RESNETS, WeightsUnavailable


class ModelError(ValueError):
    """A model name or weights option the user must fix."""


RESNET50_IMAGENET = RESNETS["resnet50"][1]  # one ImageNet recipe (V2) for every ResNet-50 model here
# name -> (torchvision builder, COCO weights, ImageNet backbone weights, has an auxiliary head)
_TORCHVISION = {
    "deeplabv3_resnet50": (seg.deeplabv3_resnet50, seg.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
                           RESNET50_IMAGENET, True),
    "deeplabv3_mobilenet_v3_large": (seg.deeplabv3_mobilenet_v3_large,
                                     seg.DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
                                     MobileNet_V3_Large_Weights.IMAGENET1K_V1, True),
    "lraspp_mobilenet_v3_large": (seg.lraspp_mobilenet_v3_large,
                                  seg.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
                                  MobileNet_V3_Large_Weights.IMAGENET1K_V1, False),
    "fcn_resnet50": (seg.fcn_resnet50, seg.FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
                     RESNET50_IMAGENET, True),
}


def _unet(num_classes: int, weights: str, encoder: str = "resnet50") -> nn.Module:
    from segpipe.unet import build_unet
    return build_unet(num_classes, weights, encoder)


def _resnet50_convhead(num_classes: int, weights: str, output_stride: int = 8, head_depth: int = 3,
                       head_width: int = 256) -> nn.Module:
    from segpipe.convhead import build_resnet50_convhead
    return build_resnet50_convhead(num_classes, weights, output_stride, head_depth, head_width)


# The reference paper's baselines, built by their own modules.
_OTHERS: dict[str, Callable[..., nn.Module]] = {"unet": _unet, "resnet50_convhead": _resnet50_convhead}
MODEL_NAMES = sorted(_TORCHVISION) + sorted(_OTHERS)
# Architecture options (model.KEY in the config) and the models that read them; null keeps the default.
OPTIONS = {"encoder": ("unet",), "output_stride": ("resnet50_convhead",), "head_depth": ("resnet50_convhead",),
           "head_width": ("resnet50_convhead",),
           # False: no auxiliary classifier (set from model.aux_weight=0: an unused head breaks DDP, costs compute)
           "aux_head": tuple(sorted(n for n, entry in _TORCHVISION.items() if entry[3]))}


def build_model(name: str, num_classes: int, weights: str = "none", options: dict | None = None) -> nn.Module:
    """A segmentation model whose forward returns {"out": logits, ["aux": logits]} at input resolution.

    weights: "none" (random init), "imagenet" (backbone only), "coco" (torchvision's COCO_WITH_VOC_LABELS_V1,
    classifier heads replaced for num_classes), or a path to a .pth state dict or segpipe checkpoint.
    options: architecture options of OPTIONS (e.g. {"output_stride": 16}); None values keep the defaults.
    """
    if name not in _TORCHVISION and name not in _OTHERS:
        raise ModelError(f"model.name={name!r} is not known; choose one of {', '.join(MODEL_NAMES)}")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    for key in options:
        if key not in OPTIONS:
            raise ModelError(f"model.{key} is not an architecture option; known: {', '.join(OPTIONS)}")
        if name not in OPTIONS[key]:
            raise ModelError(f"model.{key} applies to {', '.join(OPTIONS[key])}, not to {name}; "
                             f"remove it (or set it to null)")
    is_path = weights not in ("none", "imagenet", "coco")
    if name in _OTHERS:
        if weights == "coco":
            raise ModelError(f"model.weights=coco is not available for {name}; use none, imagenet or a .pth path")
        try:
            model = _OTHERS[name](num_classes, "none" if is_path else weights, **options)
        except (ValueError, WeightsUnavailable) as e:  # a bad option value, or offline
            raise ModelError(f"{name}: {e}") from None
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
    if options.get("aux_head") is False:
        model.aux_classifier = None  # torchvision's forward skips it; built first so COCO weights still load
    if is_path:
        load_pretrained(model, weights)
    return model


def model_options(model_config: object) -> dict:
    """The architecture options set in a ModelConfig (or its dict), for build_model and the checkpoint."""
    get = model_config.get if isinstance(model_config, dict) else lambda k: getattr(model_config, k, None)
    options = {k: get(k) for k in OPTIONS if get(k) is not None}
    if get("aux_weight") == 0 and get("name") in OPTIONS["aux_head"]:
        options["aux_head"] = False
    return options


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


def set_bn_momentum(model: nn.Module, momentum: float | None) -> None:
    """Give every BatchNorm layer this momentum (model.bn_momentum); None keeps the architecture's own."""
    if momentum is None:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def has_batchnorm_pooling(model: nn.Module) -> bool:
    """True for models whose ASPP image-pooling BatchNorm cannot train on a per-process batch of 1."""
    return any(type(m).__name__ == "ASPPPooling" for m in model.modules())


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Float logits bilinearly resized to size (h, w), as scoring at the mask's full resolution needs."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = nnf.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits
