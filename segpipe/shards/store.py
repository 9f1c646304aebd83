"""Where shards are read from: next to a local descriptor, or a local cache of remote ones (fsspec), LRU-evicted."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from segpipe.data import DataError

REMOTE_SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://")
PIP = "pip install 'segpipe[shards]' (fsspec, aiohttp; add s3fs for s3://, gcsfs for gs://)"
CHUNK = 1 << 20
TIMEOUT_S = 60.0  # no byte for this long from the server: the attempt fails
ATTEMPTS = 4
CACHE_LOCK = ".segpipe-cache.lock"


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the descriptor lists it."""

    name: str
    bytes: int
    sha256: str
    samples: int


def is_remote(location: str) -> bool:
    """True for object-store and web URLs (read through fsspec), False for local paths and file:// URLs."""
    return location.startswith(REMOTE_SCHEMES)


def local_path(location: str) -> str:
    """A local location as a path (file:// removed)."""
    return location[len("file://"):] if location.startswith("file://") else location


def sibling(location: str, name: str) -> str:
    """The location of file `name` in the folder (or URL prefix) holding `location`."""
    if is_remote(location):
        return location.rsplit("/", 1)[0] + "/" + name
    return str(Path(local_path(location)).parent / name)


def filesystem(url: str, timeout_s: float):
    """(fsspec filesystem, path) for a URL, with connect and read timeouts; DataError naming the pip command
    when fsspec (or the protocol's package) is missing."""
    try:
        import fsspec
        fs, path = fsspec.core.url_to_fs(url, **connection_options(url, timeout_s))
    except ImportError as e:
        raise DataError(f"{url}: reading remote shards needs a package that is not installed ({e}); {PIP}") from None
    if url.startswith("s3://"):
        fs.retries = 1  # with_retries is the one retry loop: s3fs's 5 x botocore's 5 made a stall last 25 tries
    return fs, path


def connection_options(url: str, timeout_s: float) -> dict:
    """The filesystem options under which a stalled connection fails after timeout_s (no total limit: a large
    shard takes long). Endpoints other than the cloud's: AWS_ENDPOINT_URL (s3fs, e.g. MinIO) and
    STORAGE_EMULATOR_HOST (gcsfs)."""
    if url.startswith("s3://"):  # botocore's timeouts, and no retries of its own
        return {"config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                                  "retries": {"total_max_attempts": 1}}}
    import aiohttp
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
    if url.startswith(("gs://", "gcs://")):
        return {"requests_timeout": timeout}
    return {"client_kwargs": {"timeout": timeout}}  # fsspec's HTTP filesystem


def attempts_for(url: str) -> int:
    """How many times the store tries a download: ATTEMPTS, but once for gs://, since gcsfs retries each request
    6 times with backoff itself (fixed in gcsfs, not settable per filesystem)."""
    return 1 if url.startswith(("gs://", "gcs://")) else ATTEMPTS


def with_retries(url: str, attempts: int, action: Callable[[], object]):
    """action() until it succeeds, at most `attempts` times with growing pauses; a missing file, a full disk or a
    DataError ends it at once. Raises one DataError naming the URL."""
    last = "no attempt"
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(4.0, 0.25 * 2 ** attempt))
        try:
            return action()
        except FileNotFoundError:
            raise DataError(f"{url} does not exist on the server (404 / no such key); upload the shards together "
                            f"with their shards.json, or fix data.root") from None
        except DataError:
            raise
        except TimeoutError:  # asyncio's and fsspec's too
            last = "timed out: the server sent nothing for too long"
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise
            last = f"{type(e).__name__}: {e}"
        except Exception as e:  # aiohttp/asyncio timeouts, HTTP 5xx, a checksum mismatch: worth another try
            last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    raise DataError(f"{url}: download failed {attempts} times (last: {last}); check that the server is "
                    f"reachable and holds the shards of this descriptor") from None


def read_remote(url: str) -> bytes:
    """The bytes of a small remote file (a descriptor), with retries and bounded timeouts."""
    fs, path = filesystem(url, TIMEOUT_S)
    return with_retries(url, attempts_for(url), lambda: fs.cat_file(path))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on a file (blocking), shared by every process of this machine; released if we die."""
    import fcntl
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ShardStore:
    """Local paths of a descriptor's shards: beside it when local; for a remote descriptor, copies in a cache folder
    (whole-shard downloads with retries, checked against the sha256, written atomically, least recently used
    evicted beyond `limit` bytes). Several loader workers and ranks of one node share a cache through file locks."""

    def __init__(self, location: str, cache_dir: Optional[str] = None, limit: int = 20 * 10 ** 9,
                 timeout_s: Optional[float] = None, attempts: Optional[int] = None):
        self.location, self.remote = location, is_remote(location)
        base = Path(cache_dir or os.environ.get("SEGPIPE_CACHE", Path.home() / ".cache" / "segpipe"))
        self.cache_dir = base / "shards"
        self.limit, self.timeout_s, self.attempts = limit, timeout_s or TIMEOUT_S, attempts or attempts_for(location)

    def where(self, name: str) -> str:
        """The shard's URL or path, as errors name it."""
        return sibling(self.location, name)

    def path(self, shard: ShardInfo) -> str:
        """A local file holding the shard (downloaded into the cache first if remote and not cached yet)."""
        if not self.remote:
            return self.where(shard.name)
        cached = self.cache_dir / f"{shard.sha256[:16]}-{shard.name}"
        if self._touch(cached):
            return str(cached)
        url = self.where(shard.name)
        if shard.bytes > self.limit:
            raise DataError(f"{url} is {human(shard.bytes)}, more than data.cache_limit={human(self.limit)} of "
                            f"local cache; raise data.cache_limit")
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create the shard cache {self.cache_dir} ({e}); set data.cache_dir to a "
                            f"writable folder") from None
        with locked(cached.with_name(cached.name + ".lock")):  # one download per shard on this machine
            if self._touch(cached):  # another process fetched it while we waited
                return str(cached)
            partial = cached.with_name(f"{cached.name}.partial-{os.getpid()}")
            try:
                with locked(self.cache_dir / CACHE_LOCK):
                    self._make_room(shard.bytes, url)
                    reserve(partial, shard.bytes)  # counted by _make_room of the other processes from now on
                with_retries(url, self.attempts, lambda: self._download(url, partial, shard))
                os.replace(partial, cached)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise DataError(f"cannot write {url} into the cache {self.cache_dir} ({e}); set data.cache_dir "
                                    f"to a writable folder") from None
                raise DataError(f"no space left on the disk of the shard cache {self.cache_dir} while caching {url}; "
                                f"free space, lower data.cache_limit or set data.cache_dir to a larger disk") from None
            finally:
                partial.unlink(missing_ok=True)
        return str(cached)

    @staticmethod
    def _touch(path: Path) -> bool:
        """Mark a cached shard as just used (its mtime orders the eviction); False if it is not cached."""
        try:
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    def _make_room(self, needed: int, url: str) -> None:
        """Evict the least recently used cached shards until `needed` more bytes fit the limit and the disk."""
        entries = []
        for entry in os.scandir(self.cache_dir):
            if entry.name.endswith(".tar") or ".tar.partial-" in entry.name:
                st = entry.stat()
                entries.append((st.st_mtime, st.st_size, entry.path, entry.name.endswith(".tar")))
        used = sum(size for _, size, _, _ in entries)
        for _, size, path, evictable in sorted(entries):
            if used + needed <= self.limit:
                break
            if evictable:  # a shard open in another process stays readable there until it closes it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                used -= size
        free = shutil.disk_usage(self.cache_dir).free
        if needed > free:
            raise DataError(f"the disk of the shard cache {self.cache_dir} has {human(free)} free but {url} "
                            f"needs {human(needed)}; free space or set data.cache_dir to a larger disk")

    def _download(self, url: str, partial: Path, shard: ShardInfo) -> None:
        """One attempt: stream the shard into `partial`, hashing as it goes; raise if it is not the listed one."""
        fs, path = filesystem(url, self.timeout_s)
        digest, size = hashlib.sha256(), 0
        # Over HTTP one streaming GET: block_size=0 streams, the known size saves fsspec's request for it.
        options = {"block_size": 0, "size": shard.bytes} if url.startswith(("http://", "https://")) else {}
        with fs.open(path, "rb", **options) as src, open(partial, "r+b") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
            dst.truncate(size)
        if size != shard.bytes or digest.hexdigest() != shard.sha256:
            raise ChecksumError(f"checksum mismatch: got {size} bytes with sha256 {digest.hexdigest()[:16]}..., the "
                                f"descriptor lists {shard.bytes} bytes with sha256 {shard.sha256[:16]}... (a changed "
                                f"or truncated shard: upload the shards and their shards.json together)")


def human(size: int) -> str:
    """A byte count as people read it: 512 bytes, 3.2 MB, 1.5 GB."""
    for unit, scale in (("GB", 10 ** 9), ("MB", 10 ** 6)):
        if size >= scale / 10:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


class ChecksumError(Exception):
    """A downloaded shard is not the one the descriptor lists (retried, then reported)."""


def reserve(path: Path, size: int) -> None:
    """Create `path` with `size` bytes allocated, so a full disk shows now and the cache counts it."""
    with open(path, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise
            f.truncate(size)  # a file system without fallocate: a sparse file still counts in the cache
        except AttributeError:  # macOS
            f.truncate(size)
