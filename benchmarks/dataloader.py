"""Data loading throughput and worker memory: `python benchmarks/dataloader.py [--root ../shared/data/camvid]`.

Prints samples/s of the decode-only floor, the naive stock-v2 pipeline, and segpipe's train pipeline
(decode, scale, crop, flip, blur p=0.5, normalise) in one process, then the train loader with 0/1/2
workers; then the peak memory of the main process and 2 workers iterating 2,000 samples
(--memory-samples) over a 10,000-entry and a 1,000,000-entry file index.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.hardware import describe  # noqa: E402
from segpipe.config import load_config  # noqa: E402
from segpipe.data import FileIndex, MaskDecoder, SegmentationDataset, load_index  # noqa: E402
from segpipe.transforms import SIGMA, PIXEL_PARAMS, PixelOps, TrainAugment, train_transform  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def naive_transform(cfg) -> v2.Compose:
    """The same augmentations in the order people often write them: photometric on the full float image first."""
    h = 360
    return v2.Compose([
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.RandomApply([v2.GaussianBlur(cfg.blur_kernel, sigma=tuple(cfg.blur_sigma))], p=cfg.blur_prob),
        v2.RandomResize(int(cfg.scale_range[0] * h), int(cfg.scale_range[1] * h)),
        v2.RandomCrop(cfg.crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: cfg.ignore_index}),
        v2.RandomHorizontalFlip(cfg.hflip_prob),
        v2.Normalize(cfg.mean, cfg.std),
    ])


def per_sample_pass(dataset: Dataset, n: int, first: int) -> tuple[float, float]:
    """(samples/s, CPU ms per sample) of dataset[i] in this process over n samples, augmentation seeds from first."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        dataset[(i % len(dataset), first + i)]
    return n / (time.perf_counter() - start), (time.process_time() - cpu) / n * 1000


def loader_rate(dataset: Dataset, workers: int, n: int, batch_size: int = 8) -> float:
    """Samples/s of a DataLoader over the first n samples, after its workers have started."""
    loader = DataLoader(dataset, batch_size, sampler=[(i % len(dataset), i) for i in range(n + 2 * batch_size)],
                        num_workers=workers, persistent_workers=False)
    it = iter(loader)
    next(it), next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    count = sum(len(batch[0]) for batch in it)
    return count / (time.perf_counter() - start)


def stage_times(dataset: SegmentationDataset, cfg, n: int, repeats: int) -> dict[str, float]:
    """CPU ms per sample of each step of the train pipeline, measured alone (process time: other jobs on a
    shared machine barely change it), fastest of `repeats` passes over n samples."""
    pairs = [dataset.load(i) for i in range(n)]
    augment, whole = TrainAugment(cfg, pixels_on_device=True), train_transform(cfg)
    draws = [augment.draw(image.shape[-2:]) for image, _ in pairs]
    crops = [(augment.scale_crop(image, d), augment.scale_crop(mask, d)) for (image, mask), d in zip(pairs, draws)]
    pixel_ops = PixelOps(cfg.mean, cfg.std, cfg.blur_kernel)
    unblurred, blurred = torch.zeros(n, PIXEL_PARAMS), torch.zeros(n, PIXEL_PARAMS)
    blurred[:, SIGMA] = torch.empty(n).uniform_(*cfg.blur_sigma)

    def scale_crop(i: int) -> tuple:
        drawn = augment.draw(pairs[i][0].shape[-2:])
        return augment.scale_crop(pairs[i][0], drawn), augment.scale_crop(pairs[i][1], drawn)

    steps = {"decode image + mask": lambda i: dataset.load(i),
             "random scale + crop": scale_crop,
             "horizontal flip": lambda i: v2.RandomHorizontalFlip(cfg.hflip_prob)(*crops[i]),
             "to float + normalise": lambda i: pixel_ops(crops[i][0][None], unblurred[i:i + 1]),
             "Gaussian blur + to float + normalise": lambda i: pixel_ops(crops[i][0][None], blurred[i:i + 1]),
             f"whole transform (blur p={cfg.blur_prob})": lambda i: whole(*pairs[i])}
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.process_time()
            for i in range(n):
                step(i)
            best[name] = min(best[name], (time.process_time() - start) / n * 1000)
    return best


def device_step_ms(deferred: SegmentationDataset, cfg, n: int, repeats: int) -> float:
    """CPU ms per sample of PixelOps on batches of 8 (what the training step adds with augment_on=device)."""
    samples = [deferred[(i % len(deferred), i)] for i in range(n - n % 8 or 8)]
    batches = [(torch.stack([s[0] for s in samples[i:i + 8]]), torch.stack([s[2] for s in samples[i:i + 8]]))
               for i in range(0, len(samples), 8)]
    step = PixelOps.from_config(cfg)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for images, params in batches:
            step(images, params)
        best = min(best, (time.process_time() - start) / len(samples) * 1000)
    return best


class MemoryProbe(Dataset):
    """Wraps a dataset; each sample also reports the peak RSS and private memory of the process that made it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.dataset[i]
        return torch.tensor([os.getpid(), *memory_mb()])


def memory_mb() -> tuple[float, float]:
    """(peak RSS, current private memory) of this process in MB, from /proc."""
    peak = private = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1]) / 1024
    return peak, private


def index_of_size(real: FileIndex, size: int) -> FileIndex:
    """A file index of `size` entries cycling over the real files (same name lengths as a real data set)."""
    reps = -(-size // len(real))
    return FileIndex(real.split_dir, np.tile(real.names, reps)[:size], np.tile(real.exts, reps)[:size])


def worker_memory(dataset: SegmentationDataset, samples: int) -> tuple[float, float, float]:
    """Peak RSS of the main process, max peak RSS and max private memory of 2 workers, in MB."""
    loader = DataLoader(MemoryProbe(dataset), batch_size=8, num_workers=2,
                        sampler=torch.randperm(len(dataset))[:samples].tolist())
    worker_peak, worker_private = {}, {}
    for batch in loader:
        for pid, peak, private in batch.tolist():
            worker_peak[pid] = max(worker_peak.get(pid, 0), peak)
            worker_private[pid] = max(worker_private.get(pid, 0), private)
    return memory_mb()[0], max(worker_peak.values()), max(worker_private.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--config", default=str(REPO / "configs" / "camvid.yaml"))
    parser.add_argument("--samples", type=int, default=80, help="samples per timed pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-samples", type=int, default=2000, help="samples the 2 workers iterate per index")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per worker is how the loader runs
    cfg = load_config(args.config, [f"data.root={args.root}"]).data
    index = load_index(cfg.root, "train", cfg.cache_dir)
    decoder = MaskDecoder(len(cfg.classes), cfg.ignore_index, cfg.mask_format, cfg.palette, cfg.palette_ignore,
                          cfg.label_map)
    floor = SegmentationDataset(index, decoder, None)
    naive = SegmentationDataset(index, decoder, naive_transform(cfg))
    ours = SegmentationDataset(index, decoder, train_transform(cfg))
    deferred = SegmentationDataset(index, decoder, train_transform(cfg, pixels_on_device=True))

    print(describe())
    print(f"# {cfg.root}, crop {cfg.crop_size}, scale {cfg.scale_range}, blur p={cfg.blur_prob}, 1 thread per process")
    pipelines = {"decode only (floor)": floor, "naive stock v2 (full image)": naive, "segpipe train pipeline": ours,
                 "segpipe, workers' part with data.augment_on=device": deferred}
    for ds in pipelines.values():
        per_sample_pass(ds, 5, 0)  # warm-up
    # Round-robin, so load from other processes hits all pipelines alike.
    passes = {name: [] for name in pipelines}
    for r in range(args.repeats):
        for name, ds in pipelines.items():
            passes[name].append(per_sample_pass(ds, args.samples, r * args.samples))
    rates = {name: statistics.median(p[0] for p in ps) for name, ps in passes.items()}
    cpu = {name: statistics.median(p[1] for p in ps) for name, ps in passes.items()}
    print("\n| pipeline, one process | samples/s | ms/sample | vs floor | CPU ms/sample |")
    print("|---|---:|---:|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {1000 / rate:.2f} | {rate / rates['decode only (floor)']:.2f}x | "
              f"{cpu[name]:.2f} |")
    stock, segpipe = "naive stock v2 (full image)", "segpipe train pipeline"
    print(f"\nsegpipe vs naive: {rates[segpipe] / rates[stock]:.2f}x by samples/s, "
          f"{cpu[stock] / cpu[segpipe]:.2f}x by CPU time (CPU time is what other jobs on a shared machine disturb least)")

    print(f"pixel work (blur p={cfg.blur_prob}, normalise) of batches of 8 in the training step "
          f"(data.augment_on=device), on this CPU: {device_step_ms(deferred, cfg, args.samples, args.repeats):.2f} "
          f"CPU ms/sample")

    print("\n| step, one process | CPU ms/sample |")
    print("|---|---:|")
    for name, ms in stage_times(floor, cfg, args.samples, args.repeats).items():
        print(f"| {name} | {ms:.2f} |")

    print("\n| train loader (batch 8) | samples/s |")
    print("|---|---:|")
    for workers in (0, 1, 2):
        print(f"| {workers} workers | {loader_rate(ours, workers, 2 * args.samples):.1f} |")

    print("\n| file index entries | main peak RSS MB | worker peak RSS MB | worker private MB |")
    print("|---:|---:|---:|---:|")
    for size in (10_000, 1_000_000):
        big = SegmentationDataset(index_of_size(index, size), decoder, train_transform(cfg))
        main_peak, peak, private = worker_memory(big, args.memory_samples)
        print(f"| {size:,} | {main_peak:.0f} | {peak:.0f} | {private:.0f} |")


if __name__ == "__main__":
    main()
