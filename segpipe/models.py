"""build_model(name, num_classes, weights, weights_backbone, **options): one registry of segmentation networks.

REGISTRY maps a model name to a builder `builder(num_classes, weights, weights_backbone, **options)`; a builder's
own signature says which architecture options (model.KEY in the config) it reads, so an option it does not read is
refused, as segmentation_models_pytorch's create_model does. torchvision's models come from
torchvision.models.get_model, as its references build them. Weights, as torchvision separates them:
- weights: the whole model: "none", "coco" (COCO_WITH_VOC_LABELS_V1; classifier heads replaced for num_classes)
  or another name of the model's torchvision weights enum (e.g. "DEFAULT");
- weights_backbone: "none" or "imagenet" (one recipe per backbone: IMAGENET1K_V2 for every ResNet-50 here).
Weights in a local file are not the registry's business: segpipe.model_files loads them into the built model.
"""
from __future__ import annotations

import inspect
from typing import Callable
from urllib.error import URLError

import torch
import torch.nn.functional as nnf
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, get_model, get_model_weights

from segpipe.backbones import RESNETS, WeightsUnavailable
from segpipe.convhead import build_resnet50_convhead
from segpipe.unet import build_unet


class ModelError(ValueError):
    """A model name or weights option the user must fix."""


# The ImageNet recipe behind weights_backbone=imagenet, per torchvision model: one V2 recipe for every ResNet-50.
_IMAGENET = {"deeplabv3_resnet50": RESNETS["resnet50"][1], "fcn_resnet50": RESNETS["resnet50"][1],
             "deeplabv3_mobilenet_v3_large": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
             "lraspp_mobilenet_v3_large": MobileNet_V3_Large_Weights.IMAGENET1K_V1}


def _torchvision_model(name: str, num_classes: int, weights: str, weights_backbone: str,
                       aux_head: bool | None) -> nn.Module:
    """torchvision's segmentation model `name` through get_model, with named whole-model or backbone weights.

    aux_head None: the model has no auxiliary head; False: built with it (so random init and COCO weights are
    the same as with it), then dropped.
    """
    aux = {} if aux_head is None else {"aux_loss": True}
    if weights != "none":
        enum = _whole_model_weights(name, weights)
        model = _download(lambda: get_model(name, weights=enum, **aux), name, weights)
        _replace_classifiers(model, enum.meta["categories"], num_classes)
    else:
        if weights_backbone not in ("none", "imagenet"):
            raise ModelError(f"model.weights_backbone={weights_backbone!r} for {name}: use none, imagenet or a "
                             f"local file path")
        backbone = _IMAGENET[name] if weights_backbone == "imagenet" else None
        model = _download(lambda: get_model(name, weights=None, weights_backbone=backbone, num_classes=num_classes,
                                            **aux), name, weights_backbone)
    if aux_head is False:
        model.aux_classifier = None  # torchvision's forward skips it
    return model


def _whole_model_weights(name: str, weights: str):
    """The torchvision weights enum member named by model.weights ("coco" is COCO_WITH_VOC_LABELS_V1)."""
    enum = get_model_weights(name)
    member = "COCO_WITH_VOC_LABELS_V1" if weights == "coco" else weights
    try:
        return enum[member] if member != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(["none", "coco", "DEFAULT", *enum.__members__])
        raise ModelError(f"model.weights={weights!r} is not a weights name of {name}; choose one of {names}, or a "
                         f"local file path (ImageNet backbone weights are model.weights_backbone=imagenet)") from None


def deeplabv3_resnet50(num_classes: int, weights: str = "none", weights_backbone: str = "none",
                       aux_head: bool = True) -> nn.Module:
    """torchvision's DeepLabV3 with a ResNet-50 backbone (output stride 8); aux_head: the layer3 FCN head."""
    return _torchvision_model("deeplabv3_resnet50", num_classes, weights, weights_backbone, aux_head)


def deeplabv3_mobilenet_v3_large(num_classes: int, weights: str = "none", weights_backbone: str = "none",
                                 aux_head: bool = True) -> nn.Module:
    """torchvision's DeepLabV3 with a MobileNetV3-Large backbone; aux_head: its auxiliary FCN head."""
    return _torchvision_model("deeplabv3_mobilenet_v3_large", num_classes, weights, weights_backbone, aux_head)


def fcn_resnet50(num_classes: int, weights: str = "none", weights_backbone: str = "none",
                 aux_head: bool = True) -> nn.Module:
    """torchvision's FCN with a ResNet-50 backbone; aux_head: its auxiliary head."""
    return _torchvision_model("fcn_resnet50", num_classes, weights, weights_backbone, aux_head)


def lraspp_mobilenet_v3_large(num_classes: int, weights: str = "none", weights_backbone: str = "none") -> nn.Module:
    """torchvision's LR-ASPP with a MobileNetV3-Large backbone: the model for CPUs (no auxiliary head)."""
    return _torchvision_model("lraspp_mobilenet_v3_large", num_classes, weights, weights_backbone, None)


REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "deeplabv3_resnet50": deeplabv3_resnet50,
    "deeplabv3_mobilenet_v3_large": deeplabv3_mobilenet_v3_large,
    "fcn_resnet50": fcn_resnet50,
    "lraspp_mobilenet_v3_large": lraspp_mobilenet_v3_large,
    "unet": build_unet,  # the reference paper's baselines, built by their own modules
    "resnet50_convhead": build_resnet50_convhead,
}
MODEL_NAMES = sorted(REGISTRY)
_COMMON = ("num_classes", "weights", "weights_backbone")


def model_option_names(name: str) -> tuple[str, ...]:
    """The architecture options (model.KEY) that the builder of model `name` reads, from its signature."""
    return tuple(p for p in inspect.signature(REGISTRY[name]).parameters if p not in _COMMON)


# Every architecture option of some model; aux_head is set from model.aux_weight, not as a key of its own.
ARCHITECTURE_OPTIONS = tuple(sorted({o for n in REGISTRY for o in model_option_names(n)} - {"aux_head"}))


def build_model(name: str, num_classes: int, weights: str = "none", weights_backbone: str = "none",
                **options) -> nn.Module:
    """A segmentation model whose forward returns {"out": logits, ["aux": logits]} at input resolution.

    options: architecture options of that model's builder (e.g. output_stride=16); None values keep the defaults.
    """
    if name not in REGISTRY:
        raise ModelError(f"model.name={name!r} is not known; choose one of {', '.join(MODEL_NAMES)}")
    options = {k: v for k, v in options.items() if v is not None}
    readers = {o: [n for n in MODEL_NAMES if o in model_option_names(n)] for o in options}
    for key in options:
        if key not in model_option_names(name):
            where = f"applies to {', '.join(readers[key])}, not to {name}" if readers[key] else \
                f"is not an architecture option (known: {', '.join(ARCHITECTURE_OPTIONS)})"
            raise ModelError(f"model.{key} {where}; remove it (or set it to null)")
    try:
        return REGISTRY[name](num_classes, weights, weights_backbone, **options)
    except (ValueError, WeightsUnavailable) as e:  # a bad option value, or offline
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"{name}: {e}") from None


def model_options(model_config: object) -> dict:
    """The architecture options set in a ModelConfig (or its dict), for build_model and the checkpoint."""
    get = model_config.get if isinstance(model_config, dict) else lambda k: getattr(model_config, k, None)
    options = {k: get(k) for k in ARCHITECTURE_OPTIONS if get(k) is not None}
    # model.aux_weight=0: no auxiliary classifier (an unused head breaks DDP and costs compute).
    if get("aux_weight") == 0 and get("name") in REGISTRY and "aux_head" in model_option_names(get("name")):
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
            f"model.weights=none model.weights_backbone=none, or download the weights elsewhere and pass the file: "
            f"model.weights=/path/to/file.pth (whole model) or model.weights_backbone=/path/to/file.pth "
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
