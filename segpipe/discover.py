"""List the labels a data set's masks hold and print config lines that name them.

    python -m segpipe.discover ROOT [--mask-format index|rgb] [--ignore-index 255]

Reads up to --max-masks training masks once (the result is cached next to the file index) and prints
a `data:` block to paste into a config: class names class_0, class_1, ... in label order, to rename,
and for colour-coded masks the palette they were found with. train.py does the same discovery when
data.classes is null; this shows it before any training starts.
"""
from __future__ import annotations

import argparse
import sys

import yaml

from segpipe.data import DataError, discover_labels, load_index


def config_block(root: str, labels: list, mask_format: str, ignore_index: int) -> str:
    """The YAML `data:` section for the labels found."""
    if mask_format == "rgb":
        data = {"root": root, "mask_format": "rgb", "ignore_index": ignore_index,
                "classes": [f"class_{i}" for i in range(len(labels))], "palette": labels}
    else:
        data = {"root": root, "mask_format": "index", "ignore_index": ignore_index,
                "classes": [f"class_{i}" for i in range(max(labels) + 1)]}
    return yaml.safe_dump({"data": data}, default_flow_style=None, sort_keys=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m segpipe.discover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder holding train/NAME.jpg + NAME_mask.png")
    parser.add_argument("--mask-format", choices=("index", "rgb"), default="index")
    parser.add_argument("--ignore-index", type=int, default=255, help="index masks: the label that is not a class")
    parser.add_argument("--max-masks", type=int, default=500, help="masks read, spread evenly over the split")
    parser.add_argument("--cache-dir", help="where the file index goes if ROOT is read-only")
    args = parser.parse_args(argv)
    try:
        index = load_index(args.root, "train", args.cache_dir)
    except DataError as e:
        sys.exit(f"data error: {e}")
    labels = discover_labels(index, args.mask_format, args.ignore_index, args.max_masks)
    if not labels:
        sys.exit(f"the masks of {args.root}/train hold only the ignore label {args.ignore_index}: nothing to learn")
    what = "colours" if args.mask_format == "rgb" else "labels"
    print(f"# {len(labels)} {what} in {min(len(index), args.max_masks)} of {len(index)} training masks: {labels}")
    if args.mask_format == "index" and len(labels) != max(labels) + 1:
        missing = sorted(set(range(max(labels) + 1)) - set(labels))
        print(f"# labels {missing} occur in no mask read: they stay classes (with no pixels) so ids keep their "
              f"meaning; map them away with data.label_map if they are not classes")
    print("# rename the classes in this order, then: python train.py --config THIS_FILE")
    print(config_block(args.root, labels, args.mask_format, args.ignore_index), end="")


if __name__ == "__main__":
    main()
