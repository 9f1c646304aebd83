"""One line on the machine a benchmark ran on: CPU model, the instruction sets that decide its fast paths, GPUs, load."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# The CPU features that change which precision and kernels are fast (bf16 is ~10x slower without native support).
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's marketing name and which of FLAGS it has, from /proc/cpuinfo (platform.processor() as fallback)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return name, [f for f in FLAGS if f in flags]


def describe() -> str:
    """CPU, its relevant flags, whether oneDNN has native bf16, GPUs, torch version and the current load."""
    from segpipe.distributed import cpu_supports_bf16
    name, flags = cpu_info()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return (f"# CPU: {name}, {os.cpu_count()} logical CPUs, flags: {' '.join(flags) or 'none of ' + '/'.join(FLAGS)}; "
            f"native bf16: {'yes' if cpu_supports_bf16() else 'no'}; GPU: {', '.join(gpus) or 'none'}; "
            f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")
