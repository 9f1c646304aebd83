"""A colour-coded copy of CamVid, to try the own-data path on real data whose masks are RGB:

    python tools/camvid_to_rgb.py ../shared/data/camvid /tmp/camvid_rgb
    python -m segpipe.discover /tmp/camvid_rgb --out /tmp/camvid_rgb.yaml    # then the train command it prints

Masks become RGB PNGs in configs/camvid.yaml's palette (12 colours: the 11 classes and black for void, id 11);
images are symlinked, not copied. OUT must not exist.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from segpipe.config import load_config  # noqa: E402
from segpipe.data import MASK_SUFFIX  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="CamVid in the project layout (train/ and valid/ with index masks)")
    parser.add_argument("out", help="new folder for the RGB-coded copy")
    args = parser.parse_args()
    src, out = Path(args.src).resolve(), Path(args.out)
    if out.exists():
        sys.exit(f"error: {out} exists; choose a new folder")
    data = load_config(REPO / "configs" / "camvid.yaml").data
    colours = np.zeros((256, 3), dtype=np.uint8)  # void (11) and anything unexpected: black
    colours[: len(data.palette)] = np.asarray(data.palette, dtype=np.uint8)
    for split in ("train", "valid"):
        (out / split).mkdir(parents=True)
        for mask_path in sorted((src / split).glob(f"*{MASK_SUFFIX}")):
            name = mask_path.name[: -len(MASK_SUFFIX)]
            image = next(p for p in (src / split).glob(f"{name}.*") if not p.name.endswith(MASK_SUFFIX))
            os.symlink(image, out / split / image.name)
            labels = np.asarray(Image.open(mask_path))
            Image.fromarray(colours[labels]).save(out / split / mask_path.name)
        print(f"{out / split}: {len(list((out / split).glob('*' + MASK_SUFFIX)))} pairs")


if __name__ == "__main__":
    main()
