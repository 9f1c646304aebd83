"""Training-step throughput: `python benchmarks/train_step.py [--model deeplabv3_resnet50] [--steps 3]`.

Images/s of one optimizer step (forward, loss with the auxiliary head, backward, SGD) at batch 2,
360x480, 2 threads, for fp32, channels_last and bf16 autocast (+ channels_last), median of --steps
after one warm-up step. The settings are interleaved, so machine noise hits them alike.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.hardware import describe  # noqa: E402
from segpipe.distributed import cpu_supports_bf16  # noqa: E402
from segpipe.losses import SegmentationLoss  # noqa: E402
from segpipe.models import build_model  # noqa: E402


def make_step(model_name: str, channels_last: bool, bf16: bool, batch: int, size: tuple[int, int],
              loss: str = "ce", num_classes: int = 11):
    """A closure running one training step of a fresh model in the given setting."""
    torch.manual_seed(0)
    model = build_model(model_name, num_classes).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = SegmentationLoss(loss, 255)
    images = torch.randn(batch, 3, *size).contiguous(memory_format=fmt)
    target = torch.randint(0, num_classes, (batch, *size))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            value = criterion(model(images), target)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="deeplabv3_resnet50")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {"fp32": (False, False), "fp32 channels_last": (True, False)}
    if cpu_supports_bf16():
        settings.update({"bf16 autocast": (False, True), "bf16 autocast + channels_last": (True, True)})
    steps = {name: make_step(args.model, cl, bf16, args.batch, tuple(args.size)) for name, (cl, bf16) in settings.items()}
    times = {name: [] for name in steps}
    for name, step in steps.items():
        step()  # warm-up: allocator, oneDNN primitive caches
    for _ in range(args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    print(describe())
    print(f"# {args.model}, batch {args.batch}, {args.size[0]}x{args.size[1]}, {args.threads} threads, "
          f"median of {args.steps} steps")
    print("\n| setting | s/step | images/s | vs fp32 |")
    print("|---|---:|---:|---:|")
    base = statistics.median(times["fp32"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.2f} | {args.batch / t:.2f} | {base / t:.2f}x |")
    if not cpu_supports_bf16():
        print("\n(this CPU has no native bf16: train.amp=auto trains in fp32 here)")


if __name__ == "__main__":
    main()
