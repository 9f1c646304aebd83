"""Image in, class map out: a Predictor built from a checkpoint alone (preprocess, forward, resize back, TTA)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision import tv_tensors

from segpipe.checkpoint import FINISHED, CheckpointError, read_finished
from segpipe.data import DataError, read_image
from segpipe.model_files import load_model
from segpipe.models import resize_logits
from segpipe.transforms import EvalTransform

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]  # PIL image, uint8 (H, W, 3) array or (3, H, W) tensor


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The device to predict on: name (cpu, cuda, cuda:N), or CUDA if present when name is None."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def latest_checkpoint(runs_dir: str | Path = "runs") -> Optional[Path]:
    """The best.pt of the newest finished training run (runs/*/finished.json by mtime), or None.

    Raises CheckpointError when finished runs disagree on their class lists: which one is meant is then
    the user's choice, not the newest file's."""
    finished = []
    for best in Path(runs_dir).glob("*/best.pt"):
        record = read_finished(best.parent)
        if record is not None and best.is_file():
            finished.append((best.parent.joinpath(FINISHED).stat().st_mtime, best, record["classes"]))
    if not finished:
        return None
    if len({tuple(map(str, classes)) for _, _, classes in finished}) > 1:
        listing = "; ".join(f"{best} ({len(classes)} classes: {', '.join(map(str, classes[:4]))}"
                            f"{', ...' if len(classes) > 4 else ''})" for _, best, classes in sorted(finished)[-3:])
        raise CheckpointError(f"finished runs in {runs_dir}/ predict different classes ({listing}); "
                              f"pass --checkpoint PATH to choose one")
    return max(finished, key=lambda f: f[0])[1]


def checkpoint_or_latest(path: str | Path | None, runs_dir: str | Path = "runs") -> tuple[Path, bool]:
    """The given checkpoint, else the best.pt of the newest finished run; (path, whether it was picked for the user)."""
    if path is not None:
        return Path(path), False
    latest = latest_checkpoint(runs_dir)
    if latest is None:
        unfinished = sorted(Path(runs_dir).glob("*/best.pt"))
        if unfinished:
            raise CheckpointError(f"no --checkpoint given and no finished run in {runs_dir}/ ({unfinished[0]} "
                                  f"is still training or was stopped); pass --checkpoint {unfinished[0]} to use it")
        raise CheckpointError(f"no --checkpoint given and no finished run in {runs_dir}/. Train a model first "
                              "(`python train.py --config configs/synthetic.yaml`) or pass --checkpoint path/to/best.pt")
    return latest, True


TTA_SCALES = (0.75, 1.0, 1.25)  # infer.py/evaluate.py --tta: these input scales, each also mirrored


def open_predictor(checkpoint: str | None, device: torch.device | str | None, tta: bool = False,
                   scales: Optional[Sequence[float]] = None, window: Optional[str] = None,
                   batch_size: int = 4, trust_artefact: bool = False) -> tuple["Predictor", Path, bool]:
    """The Predictor of infer.py and evaluate.py from their flags: (predictor, checkpoint path, whether that path
    was picked for the user as the best.pt of the newest finished run). Raises CheckpointError or ValueError (a bad
    --window or --scales) with the message for the user."""
    path, picked = checkpoint_or_latest(checkpoint)
    scales = scales or (TTA_SCALES if tta else (1.0,))
    predictor = Predictor.from_file(path, device, flip=tta, scales=scales, window=window, batch_size=batch_size,
                                    trust_artefact=trust_artefact)
    return predictor, path, picked


def parse_window(value: Optional[str], meta: dict) -> Optional[tuple[int, int]]:
    """--window: None/"off" -> None, "auto" -> the training crop size stored in the checkpoint, "HxW" -> (H, W)."""
    if value is None or value == "off":
        return None
    if value == "auto":
        crop = (meta.get("config") or {}).get("data", {}).get("crop_size")
        if not crop:
            raise ValueError("--window auto: the checkpoint stores no training crop size; pass --window HxW")
        return int(crop[0]), int(crop[1])
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise ValueError(f"--window {value!r}: expected auto, off or HxW such as 512x512") from None
    if h < 8 or w < 8:
        raise ValueError(f"--window {value}: tiles must be at least 8x8 pixels")
    return h, w


class Predictor:
    """A model plus everything needed to turn an RGB image into a class map at the image's own size.

    Per image: resize to the checkpoint's eval size (if any) and normalise (segpipe.transforms.EvalTransform),
    forward, upsample the logits bilinearly to the original size, argmax. Options:
    flip: also predict the mirrored image; scales: input scales relative to the eval size (multi-scale TTA);
    with more than one view, softmax probabilities at the original size are averaged.
    window (h, w): inputs larger than this are predicted in overlapping tiles whose logits are averaged.
    batch_size: images of equal input size share a forward pass.
    """

    def __init__(self, model: nn.Module, meta: dict, device: torch.device | str | None = None, *,
                 flip: bool = False, scales: Sequence[float] = (1.0,), window: Optional[Sequence[int]] = None,
                 overlap: float = 1 / 3, batch_size: int = 4):
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive numbers, got {list(scales)}")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.device = resolve_device(device)
        if isinstance(model, nn.Module):  # compiled int8 artefacts are plain callables, already placed
            model = model.to(self.device).eval()
        self.model = model
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.num_classes: int = int(meta["num_classes"])
        self.ignore_index: int = int(meta["ignore_index"])
        self.eval_size = meta.get("eval_size")
        self.transform = EvalTransform(self.eval_size, meta["mean"], meta["std"])
        self.flip, self.scales, self.overlap = flip, tuple(float(s) for s in scales), overlap
        self.window = tuple(window) if window else None
        self.batch_size = max(1, batch_size)

    @classmethod
    def from_file(cls, path: str | Path, device: torch.device | str | None = None, trust_artefact: bool = False,
                  **options) -> "Predictor":
        """A Predictor from a checkpoint or compressed artefact (an int8 .pt2 only if trust_artefact); options as
        for __init__."""
        dev = resolve_device(device)
        model, meta = load_model(path, dev, trust_artefact=trust_artefact)
        if isinstance(options.get("window"), str):
            options["window"] = parse_window(options["window"], meta)
        return cls(model, meta, dev, **options)

    @property
    def palette(self) -> list:
        """One [r, g, b] per class: the checkpoint's, or visualize.default_palette when it stores none."""
        if self.meta.get("palette"):
            return [list(c) for c in self.meta["palette"]]
        from segpipe.visualize import default_palette
        return default_palette(self.num_classes)

    def predict(self, image: ImageLike) -> torch.Tensor:
        """Class indices (H, W), int64 on CPU, at the image's original size."""
        return self.predict_batch([image])[0]

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[ImageLike]) -> list[torch.Tensor]:
        """predict() for several images; those with the same input size go through the model together."""
        inputs = [self._prepare(image) for image in images]
        groups: dict[tuple, list[int]] = {}
        for i, (x, _) in enumerate(inputs):
            groups.setdefault(tuple(x.shape), []).append(i)
        preds: list = [None] * len(inputs)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                batch = torch.stack([inputs[i][0] for i in chunk])
                for i, pred in zip(chunk, self._predict_stacked(batch, [inputs[i][1] for i in chunk])):
                    preds[i] = pred.cpu()
        return preds

    def _prepare(self, image: ImageLike) -> tuple[torch.Tensor, tuple[int, int]]:
        """The normalised model input on the device, and the original (h, w)."""
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
            image = torch.from_numpy(image.copy()).permute(2, 0, 1)
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 (3, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
        size = (int(image.shape[1]), int(image.shape[2]))
        # uint8 travels to the device (4x less than float), resizing and normalising happen there.
        x = self.transform.image_transform(tv_tensors.Image(image.to(self.device)))
        return x.as_subclass(torch.Tensor), size

    def _predict_stacked(self, batch: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        views = [(s, f) for s in self.scales for f in ((False, True) if self.flip else (False,))]
        total: list = [None] * len(sizes)
        for scale, flip in views:
            x = batch
            if scale != 1.0:
                h, w = batch.shape[-2:]
                x = nnf.interpolate(batch, size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                    mode="bilinear", align_corners=False, antialias=scale < 1)
            logits = self._forward(x.flip(-1) if flip else x)
            if flip:
                logits = logits.flip(-1)
            for i, size in enumerate(sizes):
                scores = resize_logits(logits[i:i + 1], size)[0]
                if len(views) > 1:  # average probabilities, not logits: views disagree in scale
                    scores = scores.softmax(0)
                total[i] = scores if total[i] is None else total[i] + scores
        return [t.argmax(0) for t in total]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the size of x; in overlapping tiles when x is larger than the window."""
        h, w = x.shape[-2:]
        if self.window is None or (h <= self.window[0] and w <= self.window[1]):
            return self.model(x)["out"].float()
        th, tw = min(h, self.window[0]), min(w, self.window[1])
        total = torch.zeros(x.shape[0], self.num_classes, h, w, device=x.device)
        count = torch.zeros(1, 1, h, w, device=x.device)
        for top in _tile_starts(h, th, self.overlap):
            for left in _tile_starts(w, tw, self.overlap):
                tile = x[:, :, top:top + th, left:left + tw]
                total[:, :, top:top + th, left:left + tw] += resize_logits(self.model(tile)["out"], (th, tw))
                count[:, :, top:top + th, left:left + tw] += 1
        return total / count


class ImageFiles(Dataset):
    """The input images, decoded in loader workers: (position, image, None), or (position, None, error).

    images: a list of paths, or the index of a split of tar shards (segpipe.shards.ShardIndex), whose images are
    read at their offsets in the shards (fetched into the local cache first when remote)."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        """What messages call image i: its path, or SHARD: MEMBER."""
        if hasattr(self.images, "image_name"):
            return self.images.image_name(i)
        return str(self.images[i])

    def __getitem__(self, i: int):
        try:
            if hasattr(self.images, "image_source"):
                source, name = self.images.image_source(i)
                return i, read_image(source, name=name)[0], None
            return i, read_image(str(self.images[i]))[0], None
        except DataError as e:
            return i, None, str(e)


def _tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile offsets covering [0, length): stride tile*(1-overlap), the last tile flush with the end."""
    stride = max(1, int(tile * (1 - overlap)))
    starts = list(range(0, max(length - tile, 0) + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def class_shares(pred: torch.Tensor, num_classes: int) -> list[float]:
    """Fraction of the pixels of a class map that each class covers."""
    counts = torch.bincount(pred.flatten().long(), minlength=num_classes)[:num_classes].double()
    return (counts / max(1, pred.numel())).tolist()
