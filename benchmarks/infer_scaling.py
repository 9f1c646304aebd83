"""infer.py throughput on 1 and 2 processes: `python benchmarks/infer_scaling.py [--images DIR] [--count 202]`.

Runs infer.py as a user would, once as one process and once under `torchrun --nproc_per_node=2` (each process
predicts its share, one thread each), on the same images with a random-init LR-ASPP MobileNetV3 checkpoint
(11 classes; the speed does not depend on the weights). Prints images/s from the wall time of each run,
start-up and model loading included, and the steady rate once started: (count - n) / (wall time - wall time of
the same command on n images, one per process), which is what a long job gets. Default images: the CamVid
validation images, if present, repeated to --count (else synthetic scenes); --repeats runs each command that
many times, interleaved, and reports medians.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.hardware import describe  # noqa: E402
from segpipe.checkpoint import make_checkpoint, save_checkpoint  # noqa: E402
from segpipe.models import build_model  # noqa: E402
from segpipe.synthetic import ensure_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAMVID_VALID = REPO.parent / "shared" / "data" / "camvid" / "valid"


def random_checkpoint(path: Path, num_classes: int = 11) -> Path:
    """A random-init LR-ASPP checkpoint in segpipe's format."""
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", num_classes)
    meta = {"model_name": "lraspp_mobilenet_v3_large", "model_options": {}, "num_classes": num_classes,
            "classes": [f"class_{i}" for i in range(num_classes)], "palette": None, "ignore_index": 255,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "eval_size": None, "config": {}}
    save_checkpoint(make_checkpoint(model.state_dict(), meta), path)
    return path


def input_images(folder: Path, source: Path | None, count: int) -> list[Path]:
    """count images copied into folder/in (the source's images repeated as needed): from source (CamVid valid by
    default), else synthetic scenes."""
    if source is None and CAMVID_VALID.is_dir():
        source = CAMVID_VALID
    if source is None:
        source = ensure_dataset(str(folder / "synthetic")) / "valid"
    files = sorted(p for p in Path(source).iterdir() if p.suffix.lower() in (".jpg", ".png")
                   and not p.name.endswith("_mask.png"))
    (folder / "in").mkdir()
    copies = []
    for i in range(count):
        copies.append(folder / "in" / f"{i:06d}_{files[i % len(files)].name}")
        shutil.copy(files[i % len(files)], copies[-1])
    return copies


def run(command: list[str], cwd: Path) -> float:
    """Seconds the command took; it must succeed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    tic = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - tic
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="folder of images (default: CamVid valid, else synthetic)")
    parser.add_argument("--count", type=int, default=202)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = random_checkpoint(tmp / "model.pt")
        files = input_images(tmp, args.images, args.count)
        launchers = {1: [sys.executable, str(REPO / "infer.py")],
                     2: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                         "--master_addr=127.0.0.1", "--master_port=29561", str(REPO / "infer.py")]}
        seconds: dict = {(n, k): [] for n in launchers for k in (n, len(files))}
        for r in range(args.repeats):
            for (n, k), times in seconds.items():
                inputs = [str(f) for f in files[:k]] if k < len(files) else [str(tmp / "in")]
                times.append(run([*launchers[n], *inputs, "--checkpoint", str(ckpt), "--batch-size",
                                  str(args.batch_size), "--workers", "1", "--out", str(tmp / f"out-{n}-{k}-{r}")], tmp))
    median = {key: statistics.median(times) for key, times in seconds.items()}
    source = args.images or (CAMVID_VALID if CAMVID_VALID.is_dir() else "synthetic scenes")
    print(f"{len(files)} images ({source}), batch {args.batch_size}, 1 loader worker and 1 thread per process; medians of {args.repeats} run(s)")
    print(f"{'processes':>9}  {'seconds':>7}  {'images/s':>8}  {'start-up s':>10}  {'steady images/s':>15}")
    for n in launchers:
        total, start = median[(n, len(files))], median[(n, n)]
        print(f"{n:>9}  {total:>7.1f}  {len(files) / total:>8.2f}  {start:>10.1f}  "
              f"{(len(files) - n) / (total - start):>15.2f}")


if __name__ == "__main__":
    main()
