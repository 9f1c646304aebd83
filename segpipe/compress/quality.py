"""How much a compressed model changes: pixel agreement with the float model and mIoU on a labelled split.

Reads the project's folder layout (ROOT/SPLIT/NAME.jpg + NAME_mask.png, masks holding class indices)
directly and at the stored size, so calibration and comparisons need no training pipeline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from segpipe.data import DataError, load_index
from segpipe.metrics import ConfusionMatrix

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MASK_SUFFIX = "_mask.png"


def image_paths(root: str | Path, split: str, limit: int | None = None) -> list[Path]:
    """The first `limit` images of ROOT/SPLIT that have a mask, in name order (through the cached file index)."""
    try:
        index = load_index(str(root), split)
    except DataError as e:
        raise FileNotFoundError(f"{e}; pass --data-root pointing at a folder with {split}/NAME.jpg + "
                                f"NAME_mask.png (e.g. ../shared/data/camvid)") from None
    count = min(len(index), limit) if limit else len(index)
    return [Path(index.paths(i)[0]) for i in range(count)]


def load_image(path: Path, mean=IMAGENET_MEAN, std=IMAGENET_STD,
               size: tuple[int, int] | None = None) -> torch.Tensor:
    """A normalised 1x3xHxW float batch of one image, optionally resized to size (h, w)."""
    img = Image.open(path).convert("RGB")
    if size is not None and (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0)


def load_mask(image_path: Path) -> torch.Tensor | None:
    """The HxW class-index mask next to an image, or None if it has none."""
    mask = image_path.with_name(image_path.stem + MASK_SUFFIX)
    return torch.from_numpy(np.array(Image.open(mask))).long() if mask.is_file() else None


def calibration_images(root: str | Path, count: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       size: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
    """Up to `count` training images, evenly spread over the split, one normalised batch each."""
    paths = image_paths(root, "train")
    step = max(1, len(paths) // max(1, count))
    for path in paths[::step][:count]:
        yield load_image(path, mean, std, size)


@torch.no_grad()
def predict_classes(model: Callable, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Argmax class maps (uint8, HxW) of a model on each image."""
    return [model(x)["out"].argmax(1)[0].to(torch.uint8) for x in images]


def pixel_agreement(preds: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Share of pixels where two sets of class maps agree."""
    same = sum(int((p == r).sum()) for p, r in zip(preds, reference))
    return same / max(1, sum(r.numel() for r in reference))


def mean_iou(preds: list[torch.Tensor], masks: list[torch.Tensor], num_classes: int, ignore_index: int) -> float:
    """mIoU over classes present in truth or prediction (segpipe.metrics' definition)."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    for p, m in zip(preds, masks):
        cm.update(target=m, pred=p)
    return cm.compute()["miou"]
