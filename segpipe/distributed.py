"""torchrun environment, device and precision choices (all in one place), rank helpers, the exact evaluation sampler."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


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
    augment_on_device: bool = False  # blur + normalise the uint8 batch in the training step, not the workers

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
          channels_last: bool = False, timeout_s: float = 600.0, augment_on: str = "workers",
          color_jitter: float = 0.0) -> Runtime:
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
    if world_size > 1 and not dist.is_initialized():
        # A bounded timeout: if a peer dies mid-collective the survivors fail instead of hanging.
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"),
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    amp_dtype, scaler = resolve_amp(amp, dev)
    on_device = resolve_augment_on(augment_on, dev, color_jitter)
    return Runtime(rank, local_rank, world_size, dev, amp_dtype, scaler, channels_last, on_device)


def resolve_amp(mode: str, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
    """The autocast dtype for train.amp on this device, and whether a GradScaler is needed."""
    if mode not in ("auto", "bf16", "fp16", "none"):
        raise ValueError(f"train.amp={mode!r}; choose auto, bf16, fp16 or none")
    if mode == "none":
        return None, False
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
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


def resolve_augment_on(mode: str, device: torch.device, color_jitter: float) -> bool:
    """Whether data.augment_on puts blur + normalisation on the training device (True) or in the workers."""
    if mode not in ("auto", "workers", "device"):
        raise ValueError(f"data.augment_on={mode!r}; choose auto, workers or device")
    if mode == "device" and color_jitter > 0:
        raise ValueError("data.augment_on=device cannot apply data.color_jitter, which needs [0, 1] colours "
                         "before normalisation in the workers; set data.augment_on=workers (or auto)")
    if mode == "auto":  # a GPU does the per-pixel work in microseconds; on a CPU it competes with the model
        return device.type == "cuda" and color_jitter == 0
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


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over all ranks (used for stop flags every rank must agree on)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


class ShardSampler(Sampler[int]):
    """Every index exactly once across ranks, without the padding DistributedSampler adds.

    Rank r takes r, r + world, r + 2*world, ...: shards differ in length by at most one, which is fine
    for evaluation since no collective runs per batch (only one all_reduce of the confusion matrix).
    """

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


class SeededSampler(Sampler):
    """Wraps a sampler to yield (index, seed) pairs, so each sample's augmentation depends only on
    (train.seed, epoch, index): the same with any number of workers, and after a resume mid-epoch.
    `skip` drops the first indices of the epoch (the batches done before an interruption)."""

    def __init__(self, sampler, seed: int):
        self.sampler, self.seed, self.epoch, self.skip = sampler, seed, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        for n, i in enumerate(self.sampler):
            if n >= self.skip:
                yield int(i), (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i)

    def __len__(self) -> int:
        return len(self.sampler) - self.skip
