"""The index of one split of a shard set: the FileIndex interface (len, names, sources), reading members at offsets."""
from __future__ import annotations

import io
import os
from collections import OrderedDict
from typing import Optional

import numpy as np

from segpipe.config import parse_size
from segpipe.data import DataError, load_index
from segpipe.shards.descriptor import MASK_EXT, is_descriptor, read_descriptor, split_shards
from segpipe.shards.store import ShardInfo, ShardStore, human

HEADER = 512  # a tar member's header precedes its bytes: read with them, it confirms the offset names that member
MAX_OPEN = 16  # shard files a process keeps open (a shuffle window's worth)


class ShardIndex:
    """The samples of one split of a shard set, in descriptor order (shard by shard), as numpy arrays that forked
    loader workers share, like FileIndex. sources(i) reads the image and mask bytes of sample i from its shard
    (fetched into the local cache first when remote) with one positioned read each."""

    def __init__(self, location: str, split: str, shards: list[dict], store: ShardStore):
        self.split_dir = f"{location} [{split}]"  # what messages call the split
        self.store = store
        self.shards = [ShardInfo(s["name"], int(s["bytes"]), s["sha256"], int(s["samples"])) for s in shards]
        self.shard_sizes = [s.samples for s in self.shards]
        members = [m for s in shards for m in s["members"]]
        if any(len(s["members"]) != s["samples"] for s in shards) or not members:
            raise DataError(f"{location}: the {split} shards list other sample counts than members; write the "
                            f"shards again")
        self.names = np.array([m[0].encode() for m in members], dtype=np.bytes_)
        self.exts = np.array([m[1].encode() for m in members], dtype=np.bytes_)
        self.offsets = np.array([m[2:6] for m in members], dtype=np.int64)
        self.sizes = np.array([m[6:8] for m in members], dtype=np.int64)
        self.shard_of = np.repeat(np.arange(len(self.shards), dtype=np.int32), self.shard_sizes)
        self._files: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": OrderedDict()}  # descriptors of open files do not travel

    def image_size(self, i: int) -> tuple[int, int]:
        """(height, width) of image i as displayed, from the descriptor (no download)."""
        return int(self.sizes[i, 0]), int(self.sizes[i, 1])

    def image_name(self, i: int) -> str:
        """What messages call image i: SHARD: MEMBER (no download)."""
        return f"{self.store.where(self.shards[int(self.shard_of[i])].name)}: {self._image_member(i)}"

    def image_source(self, i: int) -> tuple[io.BytesIO, str]:
        """(the bytes of image i as a file object, the name errors give it: SHARD: MEMBER)."""
        return self._member(i, self._image_member(i), *self.offsets[i, :2])

    def _image_member(self, i: int) -> str:
        return f"{self.names[i].decode()}.{self.exts[i].decode()}"

    def mask_source(self, i: int) -> tuple[io.BytesIO, str]:
        """(the bytes of mask i as a file object, its name)."""
        return self._member(i, f"{self.names[i].decode()}.{MASK_EXT}", *self.offsets[i, 2:])

    def sources(self, i: int) -> tuple[tuple[io.BytesIO, str], tuple[io.BytesIO, str]]:
        """(image_source(i), mask_source(i)), the FileIndex interface read_image and read_mask take."""
        return self.image_source(i), self.mask_source(i)

    def _member(self, i: int, member: str, offset: int, size: int) -> tuple[io.BytesIO, str]:
        k = int(self.shard_of[i])
        where = f"{self.store.where(self.shards[k].name)}: {member}"
        data = os.pread(self._file(k), int(size) + HEADER, int(offset) - HEADER)
        if len(data) < size + HEADER:
            raise DataError(f"{where}: the shard ends before this member does (truncated); write or upload the "
                            f"shard again")
        if not _header_matches(data[:HEADER], member, int(size)):
            raise DataError(f"{where}: the shard holds another member at the descriptor's offset; the shard was "
                            f"rewritten after its shards.json: write (or upload) both again")
        return io.BytesIO(data[HEADER:]), where

    def _file(self, k: int) -> int:
        """An open file descriptor of shard k (positioned reads only, so forked workers never share an offset)."""
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are its own business
            self._files, self._pid = OrderedDict(), os.getpid()
        fd = self._files.get(k)
        if fd is not None:
            self._files.move_to_end(k)
            return fd
        shard = self.shards[k]
        path = self.store.path(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise DataError(f"{self.store.where(shard.name)}: cannot open the shard ({e.strerror}); check data.root "
                            f"and that every shard of the descriptor is there") from None
        size = os.fstat(fd).st_size
        if size != shard.bytes:
            os.close(fd)
            raise DataError(f"{self.store.where(shard.name)} is {size} bytes but shards.json lists {shard.bytes}: "
                            f"the shard is truncated or was rewritten; write (or copy) the shards again")
        self._files[k] = fd
        if len(self._files) > MAX_OPEN:
            os.close(self._files.popitem(last=False)[1])
        return fd


def _header_matches(header: bytes, member: str, size: int) -> bool:
    """Whether a tar header is that of `member` with `size` bytes (ustar name field: the name's first 100 bytes)."""
    name = header[:100].rstrip(b"\0")
    try:
        stored = int(header[124:136].rstrip(b"\0 ").decode() or "0", 8)
    except ValueError:
        return False
    wanted = member.encode()
    return stored == size and bool(name) and (name == wanted[:100] or wanted.endswith(b"/" + name))


def open_split(root: str, split: str, cache_dir: Optional[str] = None, cache_limit="20GB",
               window: int = 1) -> ShardIndex:
    """The index of one split of the shard set whose descriptor is at root (a path or URL); for remote shards,
    checks that the cache holds two shuffle windows of `window` shards."""
    store = ShardStore(root, cache_dir, parse_size(cache_limit))
    index = ShardIndex(root, split, split_shards(read_descriptor(root), root, split), store)
    check_cache_room(index, window)
    return index


def check_cache_room(index: ShardIndex, window: int) -> None:
    """Remote shards: the cache must hold two shuffle windows of the largest shards (the window being read and
    the next), else shards would be evicted while still being read."""
    if not index.store.remote:
        return
    largest = max(s.bytes for s in index.shards)
    needed = 2 * min(window, len(index.shards)) * largest
    if index.store.limit < needed:
        raise DataError(f"data.cache_limit={human(index.store.limit)} cannot hold two shuffle windows of {window} "
                        f"shards of up to {human(largest)} from {index.split_dir}; raise data.cache_limit to at "
                        f"least {human(needed)} or lower data.shuffle_window")


def open_index(root: str, split: str, cache_dir: Optional[str] = None, skip_unpaired: bool = False,
               cache_limit="20GB", window: int = 1):
    """The index of a split: of ROOT/SPLIT when root is a folder (a FileIndex), of SPLIT in the shard set when root
    is a shard descriptor's path or URL (a segpipe.shards.ShardIndex; `window` shards are shuffled together)."""
    if not is_descriptor(root):
        return load_index(root, split, cache_dir, skip_unpaired)
    return open_split(root, split, cache_dir, cache_limit, window)
