"""Pack a folder data set into tar shards and describe them (shards.json): atomic, resumable, memory flat.

Each shard is written to a temporary file, checked and described, then renamed into place; its description goes
to OUT/.segpipe-progress/ (atomically too), which marks it finished: a killed run continues after the last
finished shard and never rewrites one. shards.json is assembled from those descriptions at the end.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterator

from segpipe.data import IMAGE_EXTS, DataError, FileIndex, check_pair, image_size, load_index
from segpipe.shards.descriptor import DESCRIPTOR_NAME, FORMAT, MASK_EXT, VERSION

PROGRESS = ".segpipe-progress"
LOCK = ".segpipe-write.lock"
SHARD_NAME = re.compile(r"(?P<split>.+)-(?P<number>\d{6})\.tar")


def write_shards(root: str, out: str, shard_bytes: int, splits: tuple = ("train", "valid"),
                 skip_unpaired: bool = False, log: Callable = print) -> Path:
    """Pack ROOT/SPLIT/NAME.jpg + NAME_mask.png of each split into OUT/SPLIT-NNNNNN.tar (NAME.jpg + NAME.mask.png
    members, original bytes) of about shard_bytes each, checking every pair as training would; returns
    OUT/shards.json."""
    out_dir = Path(out)
    with writer_lock(out_dir):
        for split in splits:
            index = load_index(root, split, skip_unpaired=skip_unpaired)
            write_split(index, split, out_dir, shard_bytes, log)
        return write_descriptor(out_dir, splits)


def index_shards(folder: str, log: Callable = print) -> Path:
    """Describe tars already in FOLDER (SPLIT-NNNNNN.tar with NAME.jpg + NAME.mask.png members, e.g. written by
    WebDataset tools) into FOLDER/shards.json."""
    out_dir = Path(folder)
    with writer_lock(out_dir):
        found: dict[str, list[str]] = {}
        for path in sorted(out_dir.glob("*.tar")):
            match = SHARD_NAME.fullmatch(path.name)
            if match:
                found.setdefault(match["split"], []).append(path.name)
        if not found:
            raise DataError(f"{out_dir} holds no SPLIT-NNNNNN.tar shards (e.g. train-000000.tar)")
        for split, names in found.items():
            for name in names:
                if not _finished(out_dir, name):
                    _save_record(out_dir, describe_shard(out_dir / name, name))
                    log(f"described {name}")
        return write_descriptor(out_dir, tuple(found))


@contextlib.contextmanager
def writer_lock(out_dir: Path) -> Iterator[None]:
    """One writer per output folder; what a killed writer left half-written is removed."""
    import fcntl
    try:
        (out_dir / PROGRESS).mkdir(parents=True, exist_ok=True)
        f = open(out_dir / LOCK, "a")
    except OSError as e:
        raise DataError(f"cannot write shards to {out_dir} ({e.strerror}); choose a writable folder") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another `python -m segpipe.shards` is writing to {out_dir}; wait for it to end") from None
        for stale in [*out_dir.glob(".*.partial"), *(out_dir / PROGRESS).glob(".*.partial")]:
            stale.unlink()
        yield


def write_split(index: FileIndex, split: str, out_dir: Path, shard_bytes: int, log: Callable) -> None:
    """The shards of one split, from the first one not finished yet."""
    number, position = 0, 0
    while _finished(out_dir, f"{split}-{number:06d}.tar"):  # a previous run's: check it holds what we would write
        name = f"{split}-{number:06d}.tar"
        keys = [m[0] for m in json.loads(_record_path(out_dir, name).read_text())["members"]]
        if keys != [n.decode() for n in index.names[position:position + len(keys)]]:
            raise DataError(f"{out_dir / name} (finished earlier) holds other samples than {index.split_dir} now: "
                            f"the data changed since; write the shards into a new folder")
        number, position = number + 1, position + len(keys)
    while position < len(index):
        name = f"{split}-{number:06d}.tar"
        partial = out_dir / f".{name}.partial"
        position = pack_shard(index, position, partial, shard_bytes)
        record = describe_shard(partial, name)
        os.replace(partial, out_dir / name)
        _save_record(out_dir, record)
        log(f"wrote {out_dir / name}: {record['samples']} samples, {record['bytes'] / 1e6:.1f} MB "
            f"({position}/{len(index)} of {split})")
        number += 1


def pack_shard(index: FileIndex, position: int, path: Path, shard_bytes: int) -> int:
    """Write pairs from `position` into the tar at path until it reaches shard_bytes; the next position."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        while position < len(index) and (f.tell() == 0 or f.tell() < shard_bytes):
            (image, image_name), (mask, mask_name) = index.sources(position)
            check_pair(image, mask, image_name, mask_name)  # corrupt image, unreadable mask, other sizes: stop here
            key = index.names[position].decode()
            for source, member in ((image, f"{key}{os.path.splitext(image)[1].lower()}"), (mask, f"{key}.{MASK_EXT}")):
                with open(source, "rb") as data:
                    info = tarfile.TarInfo(member)
                    st = os.fstat(data.fileno())
                    info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o644
                    tar.addfile(info, data)
            position += 1
        f.flush()
        os.fsync(f.fileno())
    return position


def describe_shard(path: Path, name: str) -> dict:
    """The descriptor entry of a tar: size, sha256 and its samples' member offsets (NAME.jpg/.jpeg/.png image,
    NAME.mask.png mask) and image sizes; DataError naming the shard and the sample when one lacks its mask."""
    images: dict[str, tuple] = {}  # key -> (ext, offset, size, height, width)
    masks: dict[str, tuple] = {}  # key -> (offset, size)
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                stem, ext = os.path.splitext(info.name)
                if info.name.endswith("." + MASK_EXT):
                    masks[info.name[:-len(MASK_EXT) - 1]] = (info.offset_data, info.size)
                elif ext.lower() in IMAGE_EXTS:
                    height, width = image_size(tar.extractfile(info), f"{name}: {info.name}")
                    images[stem] = (ext[1:], info.offset_data, info.size, height, width)
                    order.append(stem)
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{name}: not a readable tar file ({e}); write the shard again") from None
    for kind, missing in (("mask", [k for k in order if k not in masks]), ("image", sorted(set(masks) - set(images)))):
        if missing:
            wanted = f"{missing[0]}.{MASK_EXT}" if kind == "mask" else f"{missing[0]}.jpg"
            raise DataError(f"{name}: {len(missing)} sample(s) have no {kind}, e.g. {missing[0]} (no {wanted} "
                            f"member); every sample needs NAME.jpg (or .png) and NAME.{MASK_EXT}")
    members = [[k, images[k][0], images[k][1], images[k][2], *masks[k], images[k][3], images[k][4]] for k in order]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    sha256 = digest.hexdigest()
    return {"name": name, "bytes": path.stat().st_size, "sha256": sha256, "samples": len(members), "members": members}


def write_descriptor(out_dir: Path, splits: tuple) -> Path:
    """OUT/shards.json from the finished shards' records, streamed (one shard's record in memory at a time)."""
    target, partial = out_dir / DESCRIPTOR_NAME, out_dir / f".{DESCRIPTOR_NAME}.partial"
    with open(partial, "w") as f:
        f.write(f'{{"format": "{FORMAT}", "version": {VERSION}, "splits": {{')
        for s, split in enumerate(splits):
            f.write(f'{", " * bool(s)}"{split}": {{"shards": [')
            samples = size = number = 0
            while _finished(out_dir, f"{split}-{number:06d}.tar"):
                text = _record_path(out_dir, f"{split}-{number:06d}.tar").read_text()
                head = _record_head(out_dir, f"{split}-{number:06d}.tar")
                samples, size = samples + head["samples"], size + head["bytes"]
                f.write(", " * bool(number) + text)
                number += 1
            f.write(f'], "samples": {samples}, "bytes": {size}}}')
        f.write("}}\n")
    os.replace(partial, target)
    return target


def _record_path(out_dir: Path, name: str) -> Path:
    return out_dir / PROGRESS / f"{name}.json"


def _finished(out_dir: Path, name: str) -> bool:
    """A shard is finished when its record exists and the tar has the recorded size."""
    record, shard = _record_path(out_dir, name), out_dir / name
    if not (record.is_file() and shard.is_file()):
        return False
    return _record_head(out_dir, name)["bytes"] == shard.stat().st_size


def _record_head(out_dir: Path, name: str) -> dict:
    """A record's fields before its members (name, bytes, sha256, samples), without parsing the members."""
    with open(_record_path(out_dir, name)) as f:
        text = f.read(1024)
    return json.loads(text[:text.index(',"members":')] + "}")


def _save_record(out_dir: Path, record: dict) -> None:
    path = _record_path(out_dir, record["name"])
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(record, separators=(",", ":")))
    os.replace(partial, path)
