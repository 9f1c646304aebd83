"""How much a compressed model changes: pixel agreement with the float model and mIoU on a labelled split.

Images and masks are read as evaluate.py reads them (segpipe.data, with the checkpoint's mask encoding:
class indices, an RGB palette or a label_map) and predicted through segpipe.predict.Predictor (the
checkpoint's eval size and normalisation, logits upsampled to the mask's size), so the mIoU here is the
one evaluate.py reports for the same model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
from torchvision import tv_tensors

from segpipe.data import DataError, MaskDecoder, SegmentationDataset, load_index
from segpipe.metrics import ConfusionMatrix
from segpipe.predict import Predictor
from segpipe.transforms import EvalTransform


def split_dataset(meta: dict, root: str | Path, split: str) -> SegmentationDataset:
    """The pairs of ROOT/SPLIT, decoded without transforms as the checkpoint's masks are encoded."""
    data = (meta.get("config") or {}).get("data") or {}
    try:
        index = load_index(str(root), split, data.get("cache_dir"))
        return SegmentationDataset(index, MaskDecoder.for_checkpoint(meta))
    except DataError as e:
        raise DataError(f"{e}. Here: pass --data-root pointing at a folder with {split}/NAME.jpg + "
                        f"NAME_mask.png (e.g. data/camvid)") from None


def labelled_images(meta: dict, root: str | Path, split: str = "valid",
                    limit: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first `limit` (uint8 3xHxW image, HxW class mask) pairs of a split, in name order."""
    dataset = split_dataset(meta, root, split)
    pairs = [dataset.load(i) for i in range(min(len(dataset), limit) if limit else len(dataset))]
    return [p[0].as_subclass(torch.Tensor) for p in pairs], [p[1].as_subclass(torch.Tensor) for p in pairs]


def calibration_images(meta: dict, root: str | Path, count: int) -> Iterator[torch.Tensor]:
    """Up to `count` training images, evenly spread over the split, each a normalised 1x3xHxW batch
    at the checkpoint's eval size (what the model sees when it predicts)."""
    dataset = split_dataset(meta, root, "train")
    transform = EvalTransform(meta.get("eval_size"), meta["mean"], meta["std"]).image_transform
    step = max(1, len(dataset) // max(1, count))
    for i in range(0, len(dataset), step)[:count]:
        image, _ = dataset.load(i)
        yield transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)[None]


def predict_classes(model: Callable, meta: dict, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Class maps (HxW, at each image's own size) of a model, through the Predictor."""
    predictor = Predictor(model, meta, "cpu", batch_size=1)
    return [predictor.predict(image) for image in images]


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
