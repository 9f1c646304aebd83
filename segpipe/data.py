"""The Dataset over ROOT/SPLIT/NAME.jpg + NAME_mask.png: a cached file index, mask decoding, lazy loading."""
from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset
from torchvision import tv_tensors

from segpipe.config import MASK_FORMATS

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
MASK_SUFFIX = "_mask.png"
INDEX_VERSION = 2
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I")  # grayscale PNGs with more than 8 bits per pixel
Source = Union[str, BinaryIO]  # a file's path, or its bytes as a file object (a member of a shard)


class DataError(ValueError):
    """A problem with the user's data, naming the file and the fix."""


@dataclass(frozen=True)
class FileIndex:
    """The pairs of one split, held as two numpy arrays so workers share them without copying.

    A Python list of millions of str is touched by reference counting in every forked worker,
    which copies its pages (pytorch/pytorch#13246); numpy fixed-width bytes are one buffer.
    """

    split_dir: str
    names: np.ndarray  # dtype S: NAME without extension, sorted
    exts: np.ndarray  # dtype S: the image's extension as the file is named (.jpg, .JPG, .jpeg, .png, ...)
    mask_suffixes: Optional[np.ndarray] = None  # dtype S: _mask.png as named (_mask.PNG ...); None: all MASK_SUFFIX

    def __len__(self) -> int:
        return len(self.names)

    def paths(self, i: int) -> tuple[str, str]:
        """The image and mask path of pair i."""
        stem = os.path.join(self.split_dir, self.names[i].decode())
        mask = MASK_SUFFIX if self.mask_suffixes is None else self.mask_suffixes[i].decode()
        return stem + self.exts[i].decode(), stem + mask

    def image_source(self, i: int) -> tuple[Source, str]:
        """(image i for read_image, the name errors give it): here its path twice (a ShardIndex gives bytes)."""
        path = self.paths(i)[0]
        return path, path

    def mask_source(self, i: int) -> tuple[Source, str]:
        """(mask i for read_mask, its name)."""
        path = self.paths(i)[1]
        return path, path

    def sources(self, i: int) -> tuple[tuple[Source, str], tuple[Source, str]]:
        """(image_source(i), mask_source(i))."""
        return self.image_source(i), self.mask_source(i)

    def image_size(self, i: int) -> tuple[int, int]:
        """The (height, width) of image i as displayed, from its header."""
        return image_size(self.paths(i)[0])


def index_path(split_dir: Path, cache_dir: Optional[str]) -> Path:
    """Where the index of split_dir is cached: next to the data if writable, else in a cache dir."""
    if cache_dir is None and os.access(split_dir.parent, os.W_OK):
        return split_dir.parent / f".segpipe-index-{split_dir.name}.npz"
    base = Path(cache_dir or os.environ.get("SEGPIPE_CACHE", Path.home() / ".cache" / "segpipe"))
    key = hashlib.sha1(str(split_dir.resolve()).encode()).hexdigest()[:16]
    return base / f"index-{split_dir.name}-{key}.npz"


def load_index(root: str, split: str, cache_dir: Optional[str] = None, skip_unpaired: bool = False) -> FileIndex:
    """The file index of ROOT/SPLIT, rescanning the folder only when it changed since the cached scan."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(
            f"{split_dir} does not exist. Expected ROOT/{split}/NAME.jpg with ROOT/{split}/NAME_mask.png; "
            f"set data.root to the folder holding train/ and valid/ (or try configs/synthetic.yaml)")
    cache = index_path(split_dir, cache_dir)
    mtime = split_dir.stat().st_mtime_ns  # changes whenever a file is added, removed or renamed
    if cache.is_file():
        try:
            with np.load(cache) as f:
                if int(f["version"]) == INDEX_VERSION and int(f["mtime_ns"]) == mtime:
                    return FileIndex(str(split_dir), f["names"], f["exts"], f["mask_suffixes"])
        except (OSError, ValueError, KeyError):
            pass  # a damaged (or older) cache is rebuilt below
    index = _scan(split_dir, skip_unpaired)
    _save_index(cache, index, mtime)
    return index


def _scan(split_dir: Path, skip_unpaired: bool) -> FileIndex:
    images: dict[str, str] = {}  # stem -> extension as named
    masks: dict[str, str] = {}  # stem -> mask suffix as named
    with os.scandir(split_dir) as entries:
        for entry in entries:
            name = entry.name
            try:
                name.encode()
            except UnicodeEncodeError:  # bytes that are not UTF-8, kept by Python as surrogates
                warnings.warn(f"{split_dir}: skipping {os.fsencode(name)!r}, whose name is not valid UTF-8; "
                              f"rename it (and its mask) to use it", stacklevel=3)
                continue
            if name.lower().endswith(MASK_SUFFIX):  # NAME_mask.PNG too: a mask, never an image
                masks[name[: -len(MASK_SUFFIX)]] = name[-len(MASK_SUFFIX):]
                continue
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTS:
                continue  # notes, thumbnails, .DS_Store: not ours
            if stem in images:
                raise DataError(f"{split_dir}: two images named {stem} ({images[stem]} and {ext}); "
                                f"keep one of them")
            images[stem] = ext
    unpaired = sorted(set(images) - set(masks))
    if unpaired:
        listing = ", ".join(f"{n}{images[n]}" for n in unpaired[:5])
        message = (f"{split_dir}: {len(unpaired)} image(s) have no {MASK_SUFFIX} mask, e.g. {listing}. "
                   f"Add the masks, or set data.skip_unpaired=true to train without these images")
        if not skip_unpaired:
            raise DataError(message)
        warnings.warn(message.split(". Add")[0] + "; skipping them (data.skip_unpaired=true)", stacklevel=3)
        for n in unpaired:
            del images[n]
    if not images:
        raise DataError(f"{split_dir} holds no image with a mask (NAME.jpg + NAME{MASK_SUFFIX}); "
                        f"check data.root")
    stems = sorted(images)
    return FileIndex(str(split_dir), np.array([s.encode() for s in stems], dtype=np.bytes_),
                     np.array([images[s].encode() for s in stems], dtype=np.bytes_),
                     np.array([masks[s].encode() for s in stems], dtype=np.bytes_))


def _save_index(cache: Path, index: FileIndex, mtime: int) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, names=index.names, exts=index.exts, mask_suffixes=index.mask_suffixes,
                 mtime_ns=np.int64(mtime), version=np.int64(INDEX_VERSION))
        os.replace(tmp, cache)  # atomic: concurrent ranks building the same index never see half a file
    except OSError as e:
        warnings.warn(f"could not cache the file index at {cache} ({e}); set data.cache_dir to a writable folder "
                      f"to avoid rescanning on every start", stacklevel=3)


class MaskDecoder:
    """Turns a mask file into class indices: index PNGs, RGB colour codes, or raw ids through a label map."""

    def __init__(self, num_classes: int, ignore_index: int, mask_format: str = "index",
                 palette: Optional[list] = None, palette_ignore: Optional[list] = None,
                 label_map: Optional[dict] = None):
        if mask_format not in MASK_FORMATS:
            raise DataError(f"data.mask_format={mask_format!r}; choose one of {', '.join(MASK_FORMATS)}")
        self.num_classes, self.ignore_index, self.mask_format = num_classes, ignore_index, mask_format
        self.dtype = np.uint8 if max(num_classes - 1, ignore_index) <= 255 else np.int32
        self.lut = None
        if label_map:
            unmapped = 2 ** 16 - 1  # marks raw ids the map does not name
            self.lut = np.full(2 ** 16, unmapped, dtype=np.int64)
            for raw, target in label_map.items():
                self.lut[int(raw)] = int(target)
            self.unmapped = unmapped
        if mask_format == "rgb":
            if not palette:
                raise DataError("data.mask_format=rgb needs data.palette: one [r, g, b] per class "
                                "(run `python -m segpipe.discover ROOT` to list the colours in your masks)")
            codes = [_rgb_code(c) for c in palette] + [_rgb_code(c) for c in (palette_ignore or [])]
            targets = list(range(len(palette))) + [ignore_index] * len(palette_ignore or [])
            order = np.argsort(codes)
            self.codes = np.asarray(codes, dtype=np.int64)[order]
            self.code_targets = np.asarray(targets, dtype=np.int64)[order]

    @classmethod
    def for_checkpoint(cls, meta: dict) -> "MaskDecoder":
        """The decoder a checkpoint was trained with: its classes and ignore_index, its config's mask encoding."""
        data = (meta.get("config") or {}).get("data") or {}
        return cls(int(meta["num_classes"]), int(meta["ignore_index"]), data.get("mask_format", "index"),
                   data.get("palette"), data.get("palette_ignore"), data.get("label_map"))

    def decode(self, mask: Image.Image, path: str) -> np.ndarray:
        """Class indices (H, W) of a mask image; raises DataError naming the file on any bad value."""
        if self.mask_format == "rgb":
            labels = self._decode_rgb(np.asarray(mask.convert("RGB")), path)
        else:
            if mask.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"{path}: mask mode {mask.mode} is not a class-index image (L or P); "
                                f"for colour-coded masks set data.mask_format=rgb and data.palette")
            labels = np.asarray(mask)
            if self.lut is not None:
                labels = self.lut[labels]
                if labels.max() == self.unmapped:
                    raw = np.unique(np.asarray(mask)[labels == self.unmapped])[:10].tolist()
                    raise DataError(f"{path}: raw mask ids {raw} are not in data.label_map; map them to a class "
                                    f"or to data.ignore_index ({self.ignore_index})")
        if labels.max(initial=0) >= self.num_classes:
            bad = np.unique(labels[(labels >= self.num_classes) & (labels != self.ignore_index)])
            if bad.size:
                raise DataError(
                    f"{path}: mask values {bad[:10].tolist()} are outside the {self.num_classes} classes "
                    f"(0..{self.num_classes - 1}) and are not data.ignore_index={self.ignore_index}; "
                    f"fix data.classes, data.ignore_index or data.label_map")
        return labels.astype(self.dtype, copy=False)

    def _decode_rgb(self, rgb: np.ndarray, path: str) -> np.ndarray:
        code = rgb_codes(rgb)
        pos = np.searchsorted(self.codes, code).clip(0, len(self.codes) - 1)
        known = self.codes[pos] == code
        if not known.all():
            r, g, b = rgb[~known][0].tolist()
            raise DataError(f"{path}: colour ({r}, {g}, {b}) is not in data.palette; add it as a class, "
                            f"or to data.palette_ignore to map it to ignore_index")
        return self.code_targets[pos]


def _rgb_code(c) -> int:
    r, g, b = (int(v) for v in c)
    return (r << 16) | (g << 8) | b


def rgb_codes(rgb: np.ndarray) -> np.ndarray:
    """One int per pixel for (H, W, 3) colours: (r << 16) | (g << 8) | b, the key palettes are looked up by."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def read_image(path: Source, min_size: Optional[tuple[int, int]] = None,
               name: Optional[str] = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an RGB image as viewers show it; JPEGs decode at a reduced DCT scale when min_size (h, w) is at most half.

    The EXIF orientation is applied (cameras store portrait photos sideways and flag them; annotation tools
    draw masks on the turned view), and 16-bit grayscale is scaled to 8 bits. Returns the image and its
    full-resolution (width, height) as displayed, which its mask must match. path may be a file object, then
    errors name it by `name`.
    """
    with _image_errors(name or path):
        img = Image.open(path)
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        swaps = orientation in SWAPPING_ORIENTATIONS
        stored = img.size[::-1] if swaps else img.size
        if min_size is not None and img.format == "JPEG":
            h, w = min_size
            if 2 * h <= stored[1] and 2 * w <= stored[0]:
                # draft works on the file's pixel grid, before the turn: ask for (h, w) when the turn swaps them
                img.draft("RGB", (h, w) if swaps else (w, h))  # the largest 1/2, 1/4, 1/8 scale staying >= it
        img.load()  # the full decode, so truncation shows up here
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        if img.mode in SIXTEEN_BIT_MODES:
            img = _to_8_bits(img)
        if img.mode != "RGB":
            img = img.convert("RGB")  # (convert on an RGB image would be a needless copy)
    return img, stored


def image_size(path: Source, name: Optional[str] = None) -> tuple[int, int]:
    """The (height, width) of an image as read_image shows it (EXIF orientation applied), from its header alone."""
    with _image_errors(name or path), Image.open(path) as img:
        swaps = img.getexif().get(ExifTags.Base.Orientation, 1) in SWAPPING_ORIENTATIONS
        return (img.width, img.height) if swaps else (img.height, img.width)


@contextlib.contextmanager
def _image_errors(path: str) -> Iterator[None]:
    """Turn Pillow's errors for an unreadable image into a DataError naming the file and the fix."""
    try:
        yield
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: {e}. If the image is genuine, raise PIL.Image.MAX_IMAGE_PIXELS "
                        f"or downscale the file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode the image ({e}). Re-export or remove the file "
                        f"(and its mask); the index notices the change") from None


def _to_8_bits(img: Image.Image) -> Image.Image:
    """A 16-bit grayscale image scaled to 8-bit "L": Pillow's own convert clips at 255, turning it white."""
    values = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))


def worker_message(error: Exception) -> str:
    """The user's line of an error raised in a DataLoader worker, without the worker traceback PyTorch appends."""
    text = str(error).strip()
    if "Original Traceback" in text:  # "Caught DataError in DataLoader worker process 0. Original Traceback ..."
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def open_mask(path: Source, name: Optional[str] = None) -> Image.Image:
    """A mask file decoded as stored (no class check); DataError naming it when missing or unreadable."""
    name = name or path
    try:
        mask = Image.open(path)
        mask.load()
    except FileNotFoundError:
        raise DataError(f"{name} is missing; the file index is stale or the mask was removed. "
                        f"Restore the mask or remove its image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{name}: cannot decode the mask ({e}); re-export or remove it") from None
    return mask


def read_mask(path: Source, decoder: MaskDecoder, name: Optional[str] = None) -> np.ndarray:
    """Decode and validate a mask file into class indices."""
    return decoder.decode(open_mask(path, name), name or path)


def check_same_size(stored: tuple[int, int], mask_hw: tuple[int, int], image_name: str, mask_name: str) -> None:
    """An image (width, height as displayed) and its mask (height, width) must be the same size."""
    if mask_hw != (stored[1], stored[0]):
        raise DataError(f"{image_name} is {stored[0]}x{stored[1]} but its mask {mask_name} is "
                        f"{mask_hw[1]}x{mask_hw[0]}; they must be the same size")


def check_pair(image: Source, mask: Source, image_name: str, mask_name: str) -> tuple[int, int]:
    """Decode an image and its mask fully, as training will, and check their sizes agree; the (height, width)."""
    _, stored = read_image(image, name=image_name)
    raw = open_mask(mask, mask_name)
    check_same_size(stored, (raw.height, raw.width), image_name, mask_name)
    return stored[1], stored[0]


def load_pair(image: Source, mask: Source, decoder: MaskDecoder, decode_size: Optional[tuple[int, int]] = None,
              image_name: Optional[str] = None, mask_name: Optional[str] = None
              ) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """An image and its mask decoded and checked into tensors (the JPEG at a reduced scale when decode_size allows)."""
    image_name, mask_name = image_name or image, mask_name or mask
    img, stored = read_image(image, decode_size, image_name)
    labels = read_mask(mask, decoder, mask_name)
    check_same_size(stored, labels.shape, image_name, mask_name)
    if img.size != stored:  # decoded at a reduced DCT scale: bring the mask along
        labels = np.asarray(Image.fromarray(labels).resize(img.size, Image.NEAREST))
    tensor = tv_tensors.Image(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    return tensor, tv_tensors.Mask(torch.from_numpy(np.array(labels)))  # a writable copy


class SegmentationDataset(Dataset):
    """Pairs of one split, decoded lazily in __getitem__ into (tv_tensors.Image uint8, tv_tensors.Mask).

    index: a FileIndex (a folder) or a segpipe.shards.ShardIndex (tar shards, local or remote): anything with
    len, names and sources(i).
    """

    def __init__(self, index: FileIndex, decoder: MaskDecoder, transform=None,
                 decode_size: Optional[tuple[int, int]] = None):
        self.index, self.decoder, self.transform, self.decode_size = index, decoder, transform, decode_size

    def __len__(self) -> int:
        return len(self.index)

    def load(self, i: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """Pair i, decoded and checked, before any transform."""
        (image, image_name), (mask, mask_name) = self.index.sources(i)
        return load_pair(image, mask, self.decoder, self.decode_size, image_name, mask_name)

    def __getitem__(self, item):
        # A (index, seed) pair fixes the augmentation of this sample whatever the worker or resume point.
        i, seed = item if isinstance(item, tuple) else (item, None)
        image, mask = self.load(i)
        if self.transform is None:
            return image, mask
        if seed is None:
            return self.transform(image, mask)
        # The CPU generator alone: torch.manual_seed would also (lazily) seed every accelerator, ~50x slower.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.transform(image, mask)
        finally:
            generator.set_state(state)


def class_pixel_stats(index: FileIndex, decoder: MaskDecoder, max_masks: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Per class: pixel count, and pixel count of the masks containing it (for median-frequency weights)."""
    counts = np.zeros(decoder.num_classes, dtype=np.int64)
    present = np.zeros(decoder.num_classes, dtype=np.int64)
    picks = np.unique(np.linspace(0, len(index) - 1, min(max_masks, len(index))).astype(int))
    for i in picks:
        mask, name = index.mask_source(int(i))
        labels = read_mask(mask, decoder, name).ravel()
        c = np.bincount(labels[labels != decoder.ignore_index], minlength=decoder.num_classes)[:decoder.num_classes]
        counts += c
        present += np.where(c > 0, c.sum(), 0)
    return counts, present
