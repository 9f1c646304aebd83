"""The shard descriptor (shards.json): which shards a data set has, their checksums, and where each member starts.

    {"format": "segpipe-shards", "version": 1,
     "splits": {"train": {"shards": [{"name": "train-000000.tar", "bytes": ..., "sha256": "...", "samples": ...,
                                      "members": [[KEY, IMAGE_EXT, IMAGE_OFFSET, IMAGE_BYTES,
                                                   MASK_OFFSET, MASK_BYTES, HEIGHT, WIDTH], ...]}, ...],
                          "samples": ..., "bytes": ...},
                "valid": {...}}}

Offsets are where a member's bytes start in its tar (after its 512-byte header); HEIGHT x WIDTH is the image as
displayed. Shards are named relative to the descriptor: they live in the same folder (or URL prefix).
"""
from __future__ import annotations

import json
from pathlib import Path

from segpipe.data import DataError
from segpipe.shards.store import is_remote, local_path, read_remote

DESCRIPTOR_NAME = "shards.json"
FORMAT = "segpipe-shards"
VERSION = 1
MEMBER_FIELDS = ("key", "image_ext", "image_offset", "image_bytes", "mask_offset", "mask_bytes", "height", "width")
MASK_EXT = "mask.png"


def is_descriptor(root: str) -> bool:
    """Whether data.root names a shard descriptor (a URL, or a .json path) rather than a folder."""
    return is_remote(root) or root.startswith("file://") or str(root).endswith(".json")


def read_descriptor(location: str) -> dict:
    """The parsed descriptor at a path or URL; DataError naming it when missing, unreadable or not a descriptor."""
    if is_remote(location):
        raw = read_remote(location)
    else:
        path = Path(local_path(location))
        if not path.is_file():
            raise DataError(f"shard descriptor {path} does not exist; write one with `python -m segpipe.shards write "
                            f"ROOT OUT` and set data.root=OUT/{DESCRIPTOR_NAME}")
        raw = path.read_bytes()
    try:
        descriptor = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{location} is not valid JSON ({e}); it is not a shard descriptor, or it was cut short: "
                        f"write the shards again") from None
    if not isinstance(descriptor, dict) or descriptor.get("format") != FORMAT:
        raise DataError(f"{location} is not a segpipe shard descriptor (no \"format\": \"{FORMAT}\"); write one with "
                        f"`python -m segpipe.shards write ROOT OUT`")
    if descriptor.get("version") != VERSION:
        raise DataError(f"{location} is a version {descriptor.get('version')} shard descriptor; this segpipe reads "
                        f"version {VERSION}: write the shards again with this version")
    return descriptor


def split_shards(descriptor: dict, location: str, split: str) -> list[dict]:
    """The shard entries of one split; DataError naming the splits there are when it is missing."""
    splits = descriptor.get("splits") or {}
    if split not in splits or not splits[split].get("shards"):
        raise DataError(f"{location} has no {split!r} split (it has: {', '.join(splits) or 'none'}); write the "
                        f"shards from a ROOT with ROOT/{split}/")
    return splits[split]["shards"]
