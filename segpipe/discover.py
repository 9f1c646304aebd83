"""Find what a data set's masks encode and write a complete config to train on it.

    python -m segpipe.discover ROOT [--out my.yaml] [--force]

Reads up to --max-masks training masks (spread evenly over ROOT/train), detects the encoding from the
PNG mode (L, P, I;16, I: class indices; RGB, RGBA: colour codes), lists the labels that cover enough of
the data to be classes, flags the likely void label (id 255, a black or white colour) and reports rare
labels (a few stray pixels or a single mask) apart instead of naming classes after them. It stops with a
message when the masks cannot be class maps (more than MAX_CLASSES labels: photos, noise, resized or
JPEG-compressed masks). The config it prints (or writes to --out) holds the data block, with class names
to rename, and a model and training recipe that fit this machine. train.py runs the same detection when
data.classes is null.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from PIL import Image

from segpipe.data import DataError, FileIndex, rgb_codes
from segpipe.shards import is_descriptor, open_index
from segpipe.shards.store import is_remote, local_path

MAX_CLASSES = 64  # more labels than this in a survey are not a class list anyone annotated
RARE_PIXEL_SHARE = 1e-4  # below this share of the pixels read, a label is reported as rare, not made a class
MAX_RARE = 256  # more rare labels than this: blended edges (resized or JPEG masks) or noise, not stray values
INDEX_MODES = ("1", "L", "P", "I;16", "I")
RGB_MODES = ("RGB", "RGBA")
VOID_COLOURS = ([0, 0, 0], [255, 255, 255])  # black first: the usual void/unlabelled colour


@dataclass
class Discovery:
    """What the masks encode: classes in class order, the void label, and labels too rare to be classes."""

    mask_format: str  # index | rgb
    classes: list  # index: label ids (a class per id 0..max); rgb: [r, g, b] per class
    void: Optional[object] = None  # the label read as void (an id or a colour), or None
    void_reason: str = ""
    rare: list = field(default_factory=list)  # (label, pixels, masks) of labels reported apart, mapped to void
    share: dict = field(default_factory=dict)  # label key -> (pixel share, masks holding it)
    masks_read: int = 0
    masks_total: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.mask_format == "rgb" else max(self.classes) + 1

    def data_block(self, root: str) -> dict:
        """The config's data section: classes named class_0..., and how each raw label maps to them."""
        names = [f"class_{i}" for i in range(self.num_classes)]
        rare = [label for label, _, _ in self.rare]
        if self.mask_format == "rgb":
            ignore = ([self.void] if self.void is not None else []) + rare
            return {"root": root, "mask_format": "rgb", "classes": names, "palette": self.classes,
                    "palette_ignore": ignore or None, "ignore_index": 255}
        ignore_index = self.void if self.void is not None else 255
        block = {"root": root, "mask_format": "index", "classes": names, "ignore_index": ignore_index}
        if rare:  # stray ids map to void explicitly, so the masks decode without renumbering the classes
            block["label_map"] = {i: i for i in range(self.num_classes)} | {r: ignore_index for r in rare} \
                | {ignore_index: ignore_index}
        return block

    def summary(self) -> list[str]:
        """Human-readable lines: what was read, the classes, the void label, the rare labels."""
        kind = "colour-coded (RGB)" if self.mask_format == "rgb" else "class-index"
        lines = [f"{self.masks_read} of {self.masks_total} training masks read: {kind} masks, "
                 f"{self.num_classes} classes"]
        if self.void is not None:
            key = "data.palette_ignore" if self.mask_format == "rgb" else "data.ignore_index"
            lines.append(f"void (not a class): {_show(self.void)}, {self.void_reason}; set as {key}")
        if self.rare:
            listing = ", ".join(f"{_show(label)} ({pixels} px in {masks} mask{'s' * (masks > 1)})"
                                for label, pixels, masks in self.rare[:8])
            more = f" and {len(self.rare) - 8} more" if len(self.rare) > 8 else ""
            lines.append(f"rare labels, mapped to void rather than named as classes: {listing}{more}; "
                         f"fix those masks, or make them classes if they are real")
        if self.mask_format == "index":
            missing = sorted(set(range(self.num_classes)) - set(self.classes))
            if missing:
                lines.append(f"ids {missing} occur in no mask read: they stay (empty) classes so ids keep "
                             f"their meaning; data.label_map can renumber them")
        return lines


def _show(label) -> str:
    return f"({label[0]}, {label[1]}, {label[2]})" if isinstance(label, list) else str(label)


def _key(label) -> str:
    return ",".join(map(str, label)) if isinstance(label, list) else str(label)


def survey(index: FileIndex, max_masks: int = 500) -> dict:
    """Per label (an id, or an RGB code): pixels and masks holding it, over up to max_masks masks spread over
    the split (read every time: a cache keyed on the folder would miss a mask fixed in place). Raises
    DataError for unreadable masks and mixed encodings."""
    picks = np.unique(np.linspace(0, len(index) - 1, min(max_masks, len(index))).astype(int))
    pixels: dict[int, int] = {}
    masks: dict[int, int] = {}
    kinds: dict[str, str] = {}  # mask_format -> first file read with it
    read = 0
    for read, i in enumerate(picks, 1):
        mask, name = index.mask_source(int(i))
        labels = _read_labels(mask, name, kinds)
        values, counts = np.unique(labels, return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            pixels[v] = pixels.get(v, 0) + c
            masks[v] = masks.get(v, 0) + 1
        if len(pixels) > 4 * (MAX_CLASSES + MAX_RARE):
            break  # already too many labels to be class maps: reading on only costs time and memory
    return {"mask_format": next(iter(kinds)), "pixels": pixels, "masks": masks, "masks_read": read,
            "masks_total": len(index), "example": next(iter(kinds.values()))}


def _read_labels(source, path: str, kinds: dict) -> np.ndarray:
    """The raw labels of one mask (ids, or 24-bit RGB codes), checking its mode against the masks before it;
    source is its path or its bytes as a file object, path the name errors give it."""
    try:
        with Image.open(source) as mask:
            mask.load()
            mode = mask.mode
            if mode in RGB_MODES:
                labels = rgb_codes(np.asarray(mask.convert("RGB")))  # the decoder's colour codes
            elif mode in INDEX_MODES:
                labels = np.asarray(mask).astype(np.int64)
            else:
                raise DataError(f"{path}: mask mode {mode} is neither class indices (L, P, I;16) nor colours "
                                f"(RGB); re-export the mask as one of those")
    except FileNotFoundError:
        raise DataError(f"{path} is missing; restore the mask or remove its image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode the mask ({e}); re-export or remove it") from None
    kind = "rgb" if mode in RGB_MODES else "index"
    if kinds and kind not in kinds:
        (other, example), = kinds.items()
        raise DataError(f"masks mix encodings: {example} holds class {'colours' if other == 'rgb' else 'indices'} "
                        f"but {path} (mode {mode}) holds {'colours' if kind == 'rgb' else 'indices'}; "
                        f"convert them all to one encoding")
    kinds.setdefault(kind, path)
    return labels


def detect(index: FileIndex, max_masks: int = 500, ignore_index: Optional[int] = None) -> Discovery:
    """Classes, void and rare labels of a split's masks; DataError when they cannot be class maps.

    ignore_index: an id the user already declared void (index masks); None lets detection flag one.
    """
    s = survey(index, max_masks)
    fmt = s["mask_format"]
    pixels, masks = s["pixels"], s["masks"]
    total = sum(pixels.values())
    read = s["masks_read"]
    # Rare: a tiny share of the pixels, or a single mask among many (a stray value, an annotation slip).
    rare = sorted((k for k in pixels if pixels[k] < RARE_PIXEL_SHARE * total
                   or (masks[k] == 1 and read >= 20 and pixels[k] < 1e-3 * total)),
                  key=lambda k: pixels[k])
    common = sorted(set(pixels) - set(rare))
    where = f"{s['masks_read']} masks of {index.split_dir} (e.g. {s['example']})"
    if len(common) > MAX_CLASSES:
        raise DataError(f"{len(common)} distinct {'colours' if fmt == 'rgb' else 'values'} each cover at least "
                        f"{100 * RARE_PIXEL_SHARE:g}% of the pixels in {where}: more than {MAX_CLASSES} classes, so "
                        f"these are not class maps (photos or noise?). Masks must hold one class id (or colour) "
                        f"per pixel, saved as PNG without resizing blur")
    if len(rare) > MAX_RARE:
        raise DataError(f"{len(rare)} distinct rare {'colours' if fmt == 'rgb' else 'values'} (a few pixels each) "
                        f"in {where}: blended edges from resizing with interpolation, JPEG compression or "
                        f"noise. Re-export the masks as PNG, resized with nearest-neighbour")
    void, reason = None, ""
    if fmt == "rgb":
        colours = {k: [k >> 16, (k >> 8) & 255, k & 255] for k in pixels}
        for candidate in VOID_COLOURS:
            code = (candidate[0] << 16) | (candidate[1] << 8) | candidate[2]
            if code in common and len(common) >= 3:  # with two colours black is background, not void
                void, reason = candidate, f"{'black' if candidate == [0, 0, 0] else 'white'}, " \
                                          f"{100 * pixels[code] / total:.1f}% of pixels"
                common.remove(code)
                break
        classes = [colours[k] for k in common]
        share = {_key(colours[k]): (pixels[k] / total, masks[k]) for k in pixels}
        rare_list = [(colours[k], pixels[k], masks[k]) for k in rare]
    else:
        declared = ignore_index if ignore_index is not None else 255
        if declared in pixels:
            void = declared
            reason = (f"{'data.ignore_index' if ignore_index is not None else 'the usual void id'}, "
                      f"{100 * pixels[declared] / total:.1f}% of pixels")
            if declared in common:
                common.remove(declared)
            if declared in rare:
                rare.remove(declared)
        if not common:
            raise DataError(f"the masks hold no class label besides void ({void}) in {where}: nothing to learn")
        if max(common) + 1 > MAX_CLASSES:
            raise DataError(f"label ids up to {max(common)} in {where} would make {max(common) + 1} classes "
                            f"(more than {MAX_CLASSES}); map the ids to 0..N-1 with data.label_map")
        if void is None and ignore_index is None and rare:
            void = 255  # rare ids need a target that is not a class
        classes = common
        share = {_key(k): (pixels[k] / total, masks[k]) for k in pixels}
        rare_list = [(k, pixels[k], masks[k]) for k in rare]
    if len(classes) < 1:
        raise DataError(f"the masks hold no class label besides void in {where}: nothing to learn")
    if void is not None and not reason:
        reason = "the target of the rare labels"
    return Discovery(fmt, classes, void, reason, rare_list, share, s["masks_read"], s["masks_total"])


def apply_discovery(data_cfg, index: FileIndex) -> str:
    """Fill a DataConfig whose classes are null from the training masks (train.py's path); returns the
    warning to show. The detected encoding wins over data.mask_format; data.ignore_index is taken as void."""
    if data_cfg.palette and data_cfg.mask_format == "rgb":  # colours given, names not: name them in order
        data_cfg.classes = [f"class_{i}" for i in range(len(data_cfg.palette))]
        return f"warning: data.classes is not set; naming the {len(data_cfg.classes)} colours of data.palette " \
               f"class_0..class_{len(data_cfg.classes) - 1}"
    found = detect(index, ignore_index=data_cfg.ignore_index)
    block = found.data_block(data_cfg.root)
    for key in ("mask_format", "classes", "palette", "palette_ignore", "ignore_index", "label_map"):
        if key in block:
            setattr(data_cfg, key, block[key])
    void = f", void {_show(found.void)}" if found.void is not None else ""
    rare = f", {len(found.rare)} rare label(s) mapped to void" if found.rare else ""
    return (f"warning: data.classes is not set: {found.summary()[0]}{void}{rare}, named "
            f"class_0..class_{found.num_classes - 1}.\n"
            f"  Name them: `python -m segpipe.discover {data_cfg.root} --out my.yaml` writes a config to edit.")


def typical_image_size(index: FileIndex, samples: int = 20) -> tuple[int, int]:
    """The median (height, width) of up to `samples` training images as displayed, read from their headers."""
    picks = np.unique(np.linspace(0, len(index) - 1, min(samples, len(index))).astype(int))
    sizes = [index.image_size(int(i)) for i in picks]  # shards: from the descriptor, no download
    h, w = np.median(np.asarray(sizes), axis=0)
    return int(h), int(w)


def clamp_crop(data_cfg, index: FileIndex) -> str:
    """Shrink data.crop_size to the training size (data.train_size, else the typical image size) where it is
    larger: padding a crop to mostly ignore pixels only wastes steps. Returns the note to show, or ""."""
    base = tuple(data_cfg.train_size) if data_cfg.train_size else typical_image_size(index)
    crop = [min(c, b) for c, b in zip(data_cfg.crop_size, base)]
    if crop == list(data_cfg.crop_size):
        return ""
    old, data_cfg.crop_size = list(data_cfg.crop_size), crop
    return f"note: data.crop_size {old} is larger than the {base[0]}x{base[1]} training images; using {crop}"


def recipe(image_size: tuple[int, int], num_train: int, cuda: bool) -> dict:
    """model, train and size settings that fit the machine: a light, short CPU run or the GPU default."""
    h, w = image_size
    if cuda:
        crop = [min(512, h), min(512, w)]
        return {"data": {"crop_size": crop, "num_workers": "auto"},
                "model": {"name": "deeplabv3_resnet50", "weights": "none"},
                "train": {"epochs": 50, "batch_size": 8, "optimizer": "sgd", "lr": 0.01, "loss": "ce",
                          "amp": "auto"}}
    # CPU: LR-ASPP MobileNetV3 with the long side at about 192 px (JPEGs decode at a reduced scale for free)
    # and about 240 optimizer steps, validated 2-3 times: CamVid reaches about 40% mIoU in 5 epochs, a few
    # minutes on 2 idle cores (BatchNorm momentum 0.1 keeps such short runs from collapsing).
    scale = min(1.0, 192 / max(h, w))
    size = [max(32, round(h * scale)), max(32, round(w * scale))]
    batch = 8
    steps_per_epoch = max(1, num_train // batch)
    epochs = int(min(100, max(2, round(240 / steps_per_epoch))))
    return {"data": {"train_size": size, "crop_size": size, "eval_size": size, "scale_range": [0.75, 1.5],
                     "color_jitter": 0.2, "num_workers": "auto"},
            "model": {"name": "lraspp_mobilenet_v3_large", "weights": "none"},
            "train": {"epochs": epochs, "batch_size": batch, "optimizer": "adamw", "lr": 0.003,
                      "weight_decay": 0.0001, "warmup_steps": 50, "loss": "ce", "class_weights": "median_freq",
                      "amp": "none", "log_every": 20, "val_every": max(1, epochs // 2)}}


def data_set_name(root: str) -> str:
    """What the run folder is named after: the data folder, or the folder (URL prefix) holding a shard descriptor."""
    if is_descriptor(root):
        parent = root.rstrip("/").rsplit("/", 1)[0] if is_remote(root) else str(Path(local_path(root)).resolve().parent)
        return parent.rsplit("/", 1)[-1] or "data"
    return Path(root).resolve().name or "data"


def config_text(root: str, found: Discovery, image_size: tuple[int, int], num_train: int, cuda: bool) -> str:
    """The whole config file: comments on what was found, then data, model, train and output_dir."""
    fitted = recipe(image_size, num_train, cuda)
    data = found.data_block(root) | fitted["data"]
    name = data_set_name(root)
    config = {"data": data, "model": fitted["model"], "train": fitted["train"],
              "output_dir": f"runs/{name}-{fitted['model']['name']}"}
    machine = "a CUDA GPU" if cuda else "this CPU (no GPU found)"
    head = [f"# Written by `python -m segpipe.discover {root}`.", *(f"# {line}" for line in found.summary()),
            "# Rename the classes below (keep their order):"]
    for i, label in enumerate(found.classes if found.mask_format == "rgb" else range(found.num_classes)):
        pct, in_masks = found.share.get(_key(label), (0.0, 0))
        what = f"colour {_show(label)}" if found.mask_format == "rgb" else f"id {label}"
        head.append(f"#   class_{i}: {what}, {100 * pct:.2f}% of pixels, in {in_masks} of {found.masks_read} masks")
    head.append(f"# Recipe fitted to {machine}, images about {image_size[1]}x{image_size[0]}"
                + ("." if cuda else "; a short run: raise train.epochs for a better model when time allows."))
    body = yaml.dump(config, Dumper=_ConfigDumper, sort_keys=False, width=110)
    return "\n".join(head) + "\n" + body


class _ConfigDumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line ([r, g, b]), no anchors: the config reads like the ones in configs/."""

    def ignore_aliases(self, data) -> bool:
        return True


_ConfigDumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def has_cuda() -> bool:
    """Whether this machine can train on a CUDA GPU (the recipe's one device question)."""
    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m segpipe.discover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder holding train/NAME.jpg + NAME_mask.png (and valid/), or a shard "
                                     "descriptor (OUT/shards.json or its URL)")
    parser.add_argument("--out", help="write the config to this file (default: print it)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    parser.add_argument("--ignore-index", type=int, help="index masks: the id that is void (default: 255 if present)")
    parser.add_argument("--max-masks", type=int, default=500, help="masks read, spread evenly over the split")
    parser.add_argument("--cache-dir", help="where the file index goes if ROOT is read-only (and remote shards)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else None
    if out is not None:  # checked before the work, so a bad path costs nothing
        if out.exists() and not args.force:
            sys.exit(f"error: {out} exists; pass --force to replace it or choose another --out")
        if out.is_dir() or not out.parent.is_dir():
            sys.exit(f"error: --out {out} must be a file in an existing folder")
    if args.max_masks < 1:
        sys.exit(f"error: --max-masks must be 1 or more, got {args.max_masks}")
    try:
        index = open_index(args.root, "train", args.cache_dir)  # a folder, or a shard descriptor's path or URL
        found = detect(index, args.max_masks, args.ignore_index)
        size = typical_image_size(index)
    except DataError as e:
        sys.exit(f"data error: {e}")
    text = config_text(args.root, found, size, len(index), has_cuda())
    if out is None:
        print(text, end="")
        print("# next: save this as a file (or use --out FILE), rename the classes, then "
              "python train.py --config FILE")
        return
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)  # atomic: never half a config
    output_dir = yaml.safe_load(text)["output_dir"]
    for line in found.summary():
        print(line)
    print(f"wrote {out}; rename the classes in it, then:\n"
          f"  python train.py --config {out}\n"
          f"  python evaluate.py {output_dir}/best.pt\n"
          f"  python infer.py IMAGES --checkpoint {output_dir}/best.pt")


if __name__ == "__main__":
    main()
