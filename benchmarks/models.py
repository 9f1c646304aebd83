"""Compare segmentation models on CPU at one input size: parameters, FLOPs and eval latency.

    nice python benchmarks/models.py --repeats 5 --models unet resnet50_convhead
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import segmentation as tv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.hardware import describe  # noqa: E402
from segpipe.convhead import build_resnet50_convhead  # noqa: E402
from segpipe.unet import build_unet  # noqa: E402

NUM_CLASSES = 11  # CamVid
# torchvision models without aux heads: an aux head is training-only cost, not inference cost.
MODELS: dict[str, Callable[[], nn.Module]] = {
    "deeplabv3_resnet50": lambda: tv.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=NUM_CLASSES),
    "deeplabv3_mobilenet_v3_large": lambda: tv.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES
    ),
    "lraspp_mobilenet_v3_large": lambda: tv.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES
    ),
    "fcn_resnet50": lambda: tv.fcn_resnet50(weights=None, weights_backbone=None, num_classes=NUM_CLASSES),
    "unet": lambda: build_unet(NUM_CLASSES),
    "unet_resnet18": lambda: build_unet(NUM_CLASSES, encoder="resnet18"),
    "resnet50_convhead": lambda: build_resnet50_convhead(NUM_CLASSES),
    "resnet50_convhead_os16": lambda: build_resnet50_convhead(NUM_CLASSES, output_stride=16),
}


def count_gflops(model: nn.Module, x: torch.Tensor) -> float:
    """GFLOPs of one forward as FlopCounterMode counts them (2 per multiply-accumulate)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


def interleaved_latency_ms(
    variants: dict[tuple[str, str], tuple[nn.Module, torch.Tensor]], warmup: int, repeats: int
) -> dict:
    """Median forward time per variant, timed round-robin so that load from other users of a shared machine
    spreads over all variants instead of skewing whichever ran at the busy moment."""
    times: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
    with torch.no_grad():
        for round_index in range(warmup + repeats):  # warm-up rounds let oneDNN pick kernels first
            for key, (model, x) in variants.items():
                start = time.perf_counter()
                model(x)
                if round_index >= warmup:
                    times[key].append(time.perf_counter() - start)
    return {key: 1e3 * statistics.median(t) for key, t in times.items()}


def measure(names: list[str], x: torch.Tensor, warmup: int, repeats: int) -> list[dict]:
    """One row per model: parameters, GFLOPs, fp32 latency in NCHW and in channels_last."""
    rows, variants = [], {}
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for name in names:
        torch.manual_seed(0)
        model = MODELS[name]().eval()
        rows.append({
            "model": name,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflops": count_gflops(model, x),
        })
        variants[(name, "nchw")] = (model, x)
        variants[(name, "cl")] = (copy.deepcopy(model).to(memory_format=torch.channels_last), x_cl)
    latency = interleaved_latency_ms(variants, warmup, repeats)
    for row in rows:
        row["nchw_ms"], row["cl_ms"] = latency[(row["model"], "nchw")], latency[(row["model"], "cl")]
    return rows


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="NAME",
                        help=f"models to measure (default: all of {', '.join(MODELS)})")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one forward per model and layout each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--size", type=int, nargs=2, default=[360, 480], metavar=("H", "W"))
    return parser.parse_args()


def main() -> None:
    """Print the hardware, then one row per model."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 3, *args.size)
    print(describe())
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, threads {torch.get_num_threads()}")
    print(f"input 1x3x{args.size[0]}x{args.size[1]}, eval, no_grad, fp32, {NUM_CLASSES} classes, random init; "
          f"latency = median of {args.repeats} rounds "
          f"after {args.warmup} warm-up, all models timed round-robin")
    print("GFLOPs from torch.utils.flop_counter.FlopCounterMode: FLOPs = 2 x multiply-accumulates (convs and matmuls)")
    header = f"{'model':<30} {'params (M)':>10} {'GFLOPs':>8} {'fp32 ms':>9} {'ch_last ms':>10}"
    print(header + "\n" + "-" * len(header))
    for r in measure(args.models, x, args.warmup, args.repeats):
        print(f"{r['model']:<30} {r['params_m']:>10.2f} {r['gflops']:>8.1f} {r['nchw_ms']:>9.0f} {r['cl_ms']:>10.0f}")
    print(f"load average after the run: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs; above that, timings are contended)")


if __name__ == "__main__":
    main()
