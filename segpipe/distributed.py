"""torchrun environment, device and precision choices (all in one place), rank helpers, the exact evaluation sampler."""
from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from segpipe.config import AMP_MODES, AUGMENT_ON


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: rank, world, device, and the precision it trains with."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # None = full fp32
    use_grad_scaler: bool  # fp16 on CUDA only
    channels_last: bool = False  # memory format of the model and its inputs
    augment_on_device: bool = False  # the pixel work on the uint8 batch in the training step, not the workers

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> torch.autocast:
        """The autocast context for forward passes (a no-op when amp_dtype is None)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """Move a batch of images in the model's memory format; async from pinned memory on CUDA."""
        return images.to(self.device, non_blocking=self.pin_memory, memory_format=self.memory_format)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"


def setup(device: Optional[str] = None, backend: Optional[str] = None, amp: str = "auto",
          channels_last: bool = False, timeout_s: float = 600.0, augment_on: str = "workers") -> Runtime:
    """Read RANK/LOCAL_RANK/WORLD_SIZE (torchrun) and join the process group; plain `python` is a world of one."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # training crops have one fixed size: pick the fastest kernels once
    if world_size > 1 and not dist.is_initialized():
        # A bounded timeout: if a peer dies mid-collective the survivors fail instead of hanging.
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"), timeout=timeout,
                                device_id=dev if dev.type == "cuda" else None, **restart_store(timeout))
    amp_dtype, scaler = resolve_amp(amp, dev)
    on_device = resolve_augment_on(augment_on, dev)
    return Runtime(rank, local_rank, world_size, dev, amp_dtype, scaler, channels_last, on_device)


def restart_store(timeout: datetime.timedelta) -> dict:
    """Under torchrun, init_process_group arguments with a store prefix of its own for each restart attempt.

    torchrun (torch 2.14) hands restarted workers the same agent store, where the first attempt's peer
    addresses are still written: a group restarted after a lost rank (--max-restarts) then fails to connect
    ("Connection refused"). Plain `python` and other launchers: no change.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    return dict(store=dist.PrefixStore(f"segpipe/attempt_{attempt}", store), rank=rank, world_size=world_size)


def resolve_amp(mode: str, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
    """The autocast dtype for train.amp on this device, and whether a GradScaler is needed."""
    if mode not in AMP_MODES:
        raise ValueError(f"train.amp={mode!r}; choose one of {', '.join(AMP_MODES)}")
    if mode == "none":
        return None, False
    if device.type == "cuda":
        # Native bf16 needs compute capability 8.0 (Ampere); is_bf16_supported() also counts emulation.
        bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
        if mode == "fp16" or (mode == "auto" and not bf16):
            return torch.float16, True
        return torch.bfloat16, False
    if mode == "fp16":
        raise ValueError("train.amp=fp16 on CPU runs convolutions on a slow single-threaded fallback "
                         "(over 60x slower here); use train.amp=bf16 (if the CPU supports it) or none")
    cpu_bf16 = cpu_supports_bf16()
    if mode == "bf16" and not cpu_bf16:
        raise ValueError("train.amp=bf16: this CPU has no native bfloat16 (AVX512-BF16/AMX); use train.amp=none")
    return (torch.bfloat16, False) if cpu_bf16 else (None, False)


def resolve_augment_on(mode: str, device: torch.device) -> bool:
    """Whether data.augment_on puts the pixel work (blur, colour jitter, normalisation) on the training device."""
    if mode not in AUGMENT_ON:
        raise ValueError(f"data.augment_on={mode!r}; choose one of {', '.join(AUGMENT_ON)}")
    if mode == "auto":  # a GPU does the per-pixel work in microseconds; on a CPU it competes with the model
        return device.type == "cuda"
    return mode == "device"


def resolve_num_workers(value: int | str) -> int:
    """data.num_workers: a number as given, or for "auto" one loader process fewer than this process's share of
    the CPUs it may use (at most 4), so PyTorch never warns of more workers than CPUs."""
    if value != "auto":
        return int(value)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun: processes on this node
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus // max(1, local_world_size) - 1))


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: SIGTERM/SIGINT are for the training process, which saves before it exits.

    torchrun and SLURM signal the whole process group; a worker killed by them would fail the main process
    before it can save. Workers still end with their parent (the DataLoader watches it).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_loader_workers(*loaders) -> None:
    """End persistent DataLoader workers now, also when an error is on its way out.

    They ignore SIGTERM (ignore_stop_signals), so the terminate() that multiprocessing sends at exit to
    workers still alive (kept alive by the error's traceback) would leave the process waiting for them.
    DataLoader has no public call for this; _shutdown_workers is what its own __del__ runs.
    """
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def broadcast_object(obj, rt: "Runtime"):
    """Rank 0's obj on every rank (a path, a flag, a state dict); obj as is in a world of one."""
    if rt.world_size == 1:
        return obj
    box = [obj if rt.is_main else None]
    dist.broadcast_object_list(box, src=0, device=rt.device if rt.device.type == "cuda" else None)
    return box[0]


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over all ranks (used for stop flags every rank must agree on)."""
    return _all_reduce(values, device, dist.ReduceOp.MAX)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over all ranks (counts of work done by each)."""
    return _all_reduce(values, device, dist.ReduceOp.SUM)


def _all_reduce(values: list[float], device: torch.device, op) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()


class ShardSampler(Sampler[int]):
    """Every index exactly once across ranks, without the padding DistributedSampler adds.

    Rank r takes one contiguous block, positions [r * n // world, (r + 1) * n // world): blocks differ in
    length by at most one, which is fine for evaluation since no collective runs per batch (only one
    all_reduce of the confusion matrix), and neighbouring samples stay on one rank, so over tar shards each
    rank reads (and downloads) only its own part of the shards.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(self._block())

    def __len__(self) -> int:
        return len(self._block())

    def _block(self) -> range:
        n, r, w = self.num_samples, self.rank, self.world_size
        return range(r * n // w, (r + 1) * n // w)


class SeededSampler(Sampler):
    """This rank's share of an epoch's shuffled order, as (index, seed) pairs.

    The order is a function of (seed, epoch) only, as DistributedSampler's is, and rank r takes positions
    start + r, start + r + world, ...: after k global micro-batches the first k * batch * world positions are
    done whatever the world size, so `start` (global samples already trained this epoch) resumes on any
    number of processes with every sample trained once. Each rank gets whole optimizer steps
    (step_samples = batch_size * accum_steps per rank); a tail too short for one global step is left out,
    as drop_last does. The seed of each sample's augmentation depends only on (seed, epoch, index).
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, step_samples: int):
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.step_samples, self.epoch, self.start = seed, step_samples, 0, 0
        self.trace = os.environ.get("SEGPIPE_TRACE_SAMPLES")  # debugging: a folder to list the indices in

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def steps(self, start: int = 0) -> int:
        """Optimizer steps in this epoch from global position start."""
        return max(0, self.num_samples - start) // (self.world_size * self.step_samples)

    def order(self) -> list[int]:
        """This epoch's order of all samples (every rank computes the same)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)  # DistributedSampler's shuffle
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self):
        order = self.order()
        positions = range(self.start + self.rank, self.start + len(self) * self.world_size, self.world_size)
        indices = [order[p] for p in positions]
        for i in indices:
            if self.trace:  # what this rank's loader asked for (with num_workers=0: exactly what it trained)
                with open(Path(self.trace) / f"rank{self.rank}-{os.getpid()}.txt", "a") as f:
                    f.write(f"{self.epoch} {i}\n")
            yield i, (self.seed * 1_000_003 + self.epoch) * 10_000_019 + i

    def __len__(self) -> int:
        return self.steps(self.start) * self.step_samples


class ShardWindowSampler(SeededSampler):
    """SeededSampler over tar shards: the shard order is shuffled, and the samples inside each window of
    `window` consecutive shards (of that order) are shuffled together, so a node reads a few shards at a time.

    Shard k holds the samples sum(shard_sizes[:k]) ... in order. Everything else is SeededSampler's: the order is a
    function of (seed, epoch) only, rank r takes global positions r, r + world, ... (all ranks read the same window
    at once), every rank gets whole optimizer steps, the tail shorter than one global step is left out, and
    set_epoch(epoch, start=samples_done) resumes on any world size. A window covering every shard gives exactly
    SeededSampler's order (so shards and the same data as a folder train bitwise alike).
    """

    def __init__(self, shard_sizes: list[int], rank: int, world_size: int, seed: int, step_samples: int,
                 window: int):
        super().__init__(sum(shard_sizes), rank, world_size, seed, step_samples)
        self.shard_sizes, self.window = [int(n) for n in shard_sizes], window

    def order(self) -> list[int]:
        if self.window >= len(self.shard_sizes):
            return super().order()
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        starts = [0]
        for n in self.shard_sizes:
            starts.append(starts[-1] + n)
        shards = torch.randperm(len(self.shard_sizes), generator=g).tolist()
        order = []
        for w in range(0, len(shards), self.window):
            members = torch.cat([torch.arange(starts[k], starts[k + 1]) for k in shards[w:w + self.window]])
            order += members[torch.randperm(len(members), generator=g)].tolist()
        return order


def train_sampler(index, rank: int, world_size: int, seed: int, step_samples: int, window: int) -> SeededSampler:
    """The training sampler for an index: ShardWindowSampler for shards (an index with shard_sizes), else
    SeededSampler."""
    sizes = getattr(index, "shard_sizes", None)
    if sizes is None:
        return SeededSampler(len(index), rank, world_size, seed, step_samples)
    return ShardWindowSampler(sizes, rank, world_size, seed, step_samples, window)


def report_failure(message: str) -> None:
    """Print a process's fatal one-line error; under torchrun also hand it to the launcher, so its failure summary
    (printed last) names the error instead of "To enable traceback see ..." (torchelastic's error-file format)."""
    print(message, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
        except OSError:
            pass  # the launcher shows its generic line instead; the message is printed above
