"""Shard writing and reading: `python benchmarks/shards.py [--root ../shared/data/camvid] [--pairs 100000]`.

Prints the time, MB/s and peak RSS of `python -m segpipe.shards write` for CamVid (if present) and for synthetic
sets of small 32x32 pairs (10,000 and --pairs; the largest also with 32MB shards), then reading CamVid (or the
first set) from local shards and from the local folder: the training loader's samples/s (same transforms, same
workers, each with its training sampler) and the CPU time of reading + decoding a sample in one process.
--work-dir keeps the generated sets for another run.
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.hardware import describe  # noqa: E402
from segpipe.config import load_config  # noqa: E402
from segpipe.data import MaskDecoder, SegmentationDataset  # noqa: E402
from segpipe.shards import open_index  # noqa: E402
from segpipe.distributed import train_sampler  # noqa: E402
from segpipe.transforms import train_transform  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "data" / "camvid"


def small_pairs(root: Path, n: int, size: int = 32, templates: int = 64) -> Path:
    """n train pairs (plus a few valid) of size x size: `templates` distinct encoded pairs, their bytes reused."""
    done = root / ".complete"
    if done.is_file():  # made by an earlier run with --work-dir
        return root
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(templates):
        mask = np.kron(rng.integers(0, 3, (size // 8, size // 8)), np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
        image, png = _encode(Image.fromarray(np.stack([mask * 80, 255 - mask * 60, mask * 40], -1)), "JPEG"), \
            _encode(Image.fromarray(mask, mode="L"), "PNG")
        encoded.append((image, png))
    for split, count in (("train", n), ("valid", min(n, 100))):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, png = encoded[i % templates]
            (folder / f"s{i:07d}.jpg").write_bytes(image)
            (folder / f"s{i:07d}_mask.png").write_bytes(png)
    done.touch()
    return root


def _encode(img: Image.Image, fmt: str) -> bytes:
    import io
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


# The writer in a process of its own, reporting its RSS once segpipe is imported and its peak at the end.
WRITER = """
import resource, runpy, sys
import segpipe.shards.write
def kb(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
start = kb("VmRSS:")
sys.argv = ["segpipe.shards", *sys.argv[1:]]
try:
    runpy.run_module("segpipe.shards", run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
print("RSS", start, kb("VmHWM:"), file=sys.stderr)
"""


def write_shards(root: Path, out: Path, shard_size: str) -> dict:
    """Run `python -m segpipe.shards write`: seconds it reports, MB written, RSS after imports and peak RSS in MB."""
    result = subprocess.run([sys.executable, "-c", WRITER, "write", str(root), str(out), "--shard-size", shard_size],
                            check=True, cwd=REPO, capture_output=True, text=True)
    seconds = float(result.stdout.rsplit(" in ", 1)[1].split(" s;")[0])  # its own clock: without Python's start-up
    start, peak = (int(v) / 1024 for v in result.stderr.split("RSS ")[-1].split())
    megabytes = sum(p.stat().st_size for p in out.glob("*.tar")) / 1e6
    return {"seconds": seconds, "mb": megabytes, "start_mb": start, "peak_mb": peak}


def loader_rate(dataset, sampler: Sampler, workers: int, batch_size: int = 8) -> float:
    """Samples/s of a training DataLoader over one pass of the sampler, worker start-up included."""
    loader = DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=True)
    tic = time.perf_counter()
    count = sum(len(images) for images, _ in loader)
    return count / (time.perf_counter() - tic)


def load_ms(dataset, sampler: Sampler, repeats: int = 3) -> float:
    """CPU ms per sample of reading and decoding (dataset.load, no transform) in this process, in the sampler's
    order; the fastest of `repeats` passes (process time: other jobs barely change it)."""
    order = [i for i, _ in sampler]
    best = float("inf")
    for _ in range(repeats):
        tic = time.process_time()
        for i in order:
            dataset.load(i)
        best = min(best, (time.process_time() - tic) / len(order) * 1000)
    return best


def training_set(root: str, cfg, shuffle_window: int = 4, cache_dir=None):
    """(dataset with the training transform, the training sampler of one process) of a folder or descriptor."""
    index = open_index(root, "train", cache_dir, cache_limit="2GB", window=shuffle_window)
    decoder = MaskDecoder(len(cfg.classes), cfg.ignore_index, cfg.mask_format, cfg.palette, cfg.palette_ignore,
                          cfg.label_map)
    sampler = train_sampler(index, 0, 1, seed=0, step_samples=8, window=shuffle_window)
    return SegmentationDataset(index, decoder, train_transform(cfg)), sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=str(CAMVID))
    parser.add_argument("--config", default=str(REPO / "configs" / "camvid.yaml"))
    parser.add_argument("--pairs", type=int, default=100_000, help="small synthetic pairs to write")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work-dir", help="where the data sets and shards go (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="segpipe-shards-"))
    print(describe())
    print(f"# work folder {work}; each write is `python -m segpipe.shards write` in its own process")

    print("\n| data set | pairs | shard size | shards MB | seconds | MB/s | pairs/s | RSS after imports MB | "
          "peak RSS MB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    sets = []
    if (Path(args.root) / "train").is_dir():
        sets.append(("CamVid", Path(args.root), "256MB"))
    for n in sorted({10_000, args.pairs}):
        sets.append(("synthetic 32x32", small_pairs(work / f"pairs{n}", n), "256MB"))
    # Memory follows the samples in one shard (its member list is held while it is described), not the set:
    sets.append(("synthetic 32x32", sets[-1][1], "32MB"))
    for name, root, shard_size in sets:
        out = work / f"shards-{root.name}-{shard_size}"
        shutil.rmtree(out, ignore_errors=True)
        r = write_shards(root, out, shard_size)
        pairs = sum(1 for _ in (root / "train").glob("*_mask.png")) + sum(1 for _ in (root / "valid").glob("*_mask.png"))
        print(f"| {name} | {pairs:,} | {shard_size} | {r['mb']:.1f} | {r['seconds']:.1f} | {r['mb'] / r['seconds']:.1f} | "
              f"{pairs / r['seconds']:.0f} | {r['start_mb']:.0f} | {r['peak_mb']:.0f} |")

    name, root = sets[0][0], sets[0][1]
    cfg = load_config(args.config, [f"data.root={root}"]).data if name == "CamVid" else \
        load_config(None, ["data.classes=[a,b,c]", "data.crop_size=[32,32]"]).data
    out = work / f"shards-{root.name}-{sets[0][2]}"
    print(f"\n# reading {name} train ({args.workers} workers, batch 8, crop {cfg.crop_size}): one pass of each "
          f"training sampler, worker start-up included; shards with data.shuffle_window=4")
    print("\n| source | loader samples/s | vs folder | read + decode, CPU ms/sample |")
    print("|---|---:|---:|---:|")
    rates, cpu = {}, {}
    for _ in range(2):  # interleaved, twice: other jobs on a shared machine disturb both alike
        for source, location in (("local folder", str(root)), ("local shards", str(out / "shards.json"))):
            rates.setdefault(source, []).append(loader_rate(*training_set(location, cfg), args.workers))
    for source, location in (("local folder", str(root)), ("local shards", str(out / "shards.json"))):
        cpu[source] = load_ms(*training_set(location, cfg))
    for source, values in rates.items():
        best = max(values)
        print(f"| {source} | {best:.1f} | {best / max(rates['local folder']):.2f}x | {cpu[source]:.2f} |")


if __name__ == "__main__":
    main()
