"""Training-loader throughput from a slow object store: `python benchmarks/remote_data.py [--delay-ms 20]`.

Serves CamVid (../shared/data/camvid; else a synthetic set) from a local HTTP server on 127.0.0.1 that waits
--delay-ms before answering each request, as an object store's round trip does, and prints the training loader's
samples/s (same transforms, same workers, each with its training sampler) reading: the local folder; the folder
over HTTP, one request per file (fsspec); the shards over HTTP with a cold cache (downloads included) and a warm
one. Shards are written first with --shard-size.
"""
import argparse
import io
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.hardware import describe  # noqa: E402
from benchmarks.shards import CAMVID, loader_rate, small_pairs, training_set  # noqa: E402
from benchmarks.slow_server import SlowServer  # noqa: E402
from segpipe.config import load_config, parse_size  # noqa: E402
from segpipe.data import FileIndex, SegmentationDataset  # noqa: E402
from segpipe.shards import write_shards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class HttpFolderIndex(FileIndex):
    """A folder's file index whose files are fetched over HTTP, one GET each (fsspec), as a folder on an object
    store would be read without shards."""

    url: str = ""

    def image_source(self, i: int):
        return self._fetch(self.paths(i)[0])

    def mask_source(self, i: int):
        return self._fetch(self.paths(i)[1])

    def _fetch(self, path: str):
        import fsspec
        url = self.url + "/" + Path(path).relative_to(Path(self.split_dir).parent).as_posix()
        return io.BytesIO(fsspec.filesystem("http").cat_file(url)), url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=str(CAMVID))
    parser.add_argument("--config", default=str(REPO / "configs" / "camvid.yaml"))
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", default="8MB")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="segpipe-remote-"))
    root = Path(args.root)
    if (root / "train").is_dir():
        cfg = load_config(args.config, [f"data.root={root}"]).data
    else:
        root = small_pairs(work / "pairs", 2000, size=128)
        cfg = load_config(None, ["data.classes=[a,b,c]", "data.crop_size=[96,96]"]).data
    out = work / "shards"
    write_shards(str(root), str(out), parse_size(args.shard_size), log=lambda *a: None)
    print(describe())
    print(f"# {root} train, {args.workers} workers, batch 8, crop {cfg.crop_size}; HTTP server on 127.0.0.1 with "
          f"{args.delay_ms:g} ms per request; shards of {args.shard_size}, data.shuffle_window=4; one pass of each "
          f"training sampler, worker start-up included")
    rows: dict[str, list[float]] = {}
    with SlowServer(root, delay_s=args.delay_ms / 1000) as folder_server, \
            SlowServer(out, delay_s=args.delay_ms / 1000) as shard_server:
        for round_ in range(args.rounds):  # interleaved: other jobs on a shared machine disturb every row alike
            dataset, sampler = training_set(str(root), cfg)
            rows.setdefault("local folder", []).append(loader_rate(dataset, sampler, args.workers))
            index = dataset.index
            remote = HttpFolderIndex(index.split_dir, index.names, index.exts, index.mask_suffixes,
                                     url=folder_server.url)
            rows.setdefault("folder over HTTP, a request per file", []).append(loader_rate(
                SegmentationDataset(remote, dataset.decoder, dataset.transform), sampler, args.workers))
            cache = work / f"cache{round_}"  # empty: the first pass downloads every shard
            for run in ("cold cache", "warm cache"):
                dataset, sampler = training_set(f"{shard_server.url}/shards.json", cfg, cache_dir=str(cache))
                rows.setdefault(f"shards over HTTP, {run}", []).append(loader_rate(dataset, sampler, args.workers))
        requests = sum(folder_server.requests.values()), sum(shard_server.requests.values())
    best = {name: max(rates) for name, rates in rows.items()}
    print("\n| source | samples/s | vs local folder |")
    print("|---|---:|---:|")
    for name, rate in best.items():
        print(f"| {name} | {rate:.1f} | {rate / best['local folder']:.2f}x |")
    print(f"\nbest of {args.rounds} interleaved rounds; HTTP requests: {requests[0]} for the per-file passes, "
          f"{requests[1]} for the shard passes (descriptor and shards)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
