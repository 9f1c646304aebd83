"""One table of one model's CPU artefacts: latency, size, parameters, agreement, mIoU; which one is fastest.

    nice python benchmarks/compress.py [--checkpoint P | --model NAME] [--data-root ../shared/data/camvid] [--images N]

Rows: PyTorch fp32 (eager, channels_last), bf16 autocast, torchao int8, structured and unstructured pruning
(where the architecture has prunable channel groups), and ONNX Runtime fp32 and int8 (the .onnx files
`python -m segpipe.export onnx [--int8]` writes, run by segpipe.onnx_runtime with as many threads as torch).

Latency: batch 1 at 360x480, --threads threads, the median of --runs timed forwards after warm-up.
The variants are timed in interleaved rounds (one forward of each per round) so that load from other
processes on a shared machine spreads over all rows instead of penalising whichever ran at the wrong time.
"vs fp32 same format" compares each row with the fp32 model run the same way (contiguous eager, or
channels_last); int8 is compiled and picks its own layout, so it is compared with fp32 eager; ONNX
Runtime int8 is compared with ONNX Runtime fp32.
Agreement is the share of valid-set pixels whose class equals the fp32 model's; mIoU uses the valid
masks (11 = void ignored). The auxiliary head is removed in every row: inference never reads it.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hardware import describe  # noqa: E402
from segpipe.checkpoint import META_KEYS, make_checkpoint, save_checkpoint  # noqa: E402
from segpipe.compress.bf16 import Bf16Autocast  # noqa: E402
from segpipe.compress.int8 import quantize_int8, save_int8  # noqa: E402
from segpipe.compress.quality import (calibration_images, labelled_images, mean_iou,  # noqa: E402
                                      pixel_agreement, predict_classes)
from segpipe.compress.structured import PruningError, prune_channels  # noqa: E402
from segpipe.compress.unstructured import prune_unstructured  # noqa: E402
from segpipe.export import export_model, quantize_model, with_metadata, write_model  # noqa: E402
from segpipe.model_files import load_model  # noqa: E402
from segpipe.models import MODEL_NAMES, build_model  # noqa: E402
from segpipe.onnx_runtime import load_onnx  # noqa: E402

FP32, FP32_CL, ORT_FP32 = "fp32 eager", "fp32 channels_last", "ONNX Runtime fp32"
CAMVID_CLASSES, CAMVID_VOID = 11, 11
HEIGHT, WIDTH = 360, 480


class ChannelsLast(nn.Module):
    """Runs a float model with weights and input in channels_last."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(images.contiguous(memory_format=torch.channels_last))


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a trained segpipe checkpoint (default: random init of --model)")
    parser.add_argument("--model", choices=MODEL_NAMES, default="deeplabv3_resnet50",
                        help="the architecture to build with random weights when no --checkpoint is given")
    parser.add_argument("--data-root", default="../shared/data/camvid")
    parser.add_argument("--images", type=int, default=None, help="valid images for agreement/mIoU (default all)")
    parser.add_argument("--calib-images", type=int, default=64, help="training images to calibrate int8 on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10, help="timed forwards per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per variant first")
    parser.add_argument("--wait-load", type=float, default=None,
                        help="before timing, wait (at most --wait-minutes) until the 1-minute load average is "
                             "below this: on a shared machine, other processes otherwise dominate the latencies")
    parser.add_argument("--wait-minutes", type=float, default=30)
    return parser.parse_args()


def load_float(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """The fp32 model and its metadata (made up for random init)."""
    if args.checkpoint:
        return load_model(args.checkpoint)
    print("NOTE: no --checkpoint: a RANDOMLY INITIALISED model. Latency, size and parameter counts are real; "
          "agreement is only indicative and mIoU is meaningless.", flush=True)
    torch.manual_seed(0)
    model = build_model(args.model, CAMVID_CLASSES)
    checkpoint = {"model_name": args.model, "model_options": {}, "num_classes": CAMVID_CLASSES,
                  "classes": [f"class_{i}" for i in range(CAMVID_CLASSES)], "palette": None,
                  "ignore_index": CAMVID_VOID, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                  "eval_size": None, "config": {}}
    if getattr(model, "aux_classifier", None) is not None:
        model.aux_classifier = None
    return model.eval(), checkpoint


def build_variants(model: nn.Module, checkpoint: dict, args: argparse.Namespace,
                   folder: Path) -> dict[str, dict]:
    """name -> {"run": callable, "file": saved artefact, "params": str}, each saved the way the CLI saves it."""
    params = sum(p.numel() for p in model.parameters())
    variants = {}

    def add(name: str, run: Callable, file: Path, n_params: int | str = params, baseline: str = FP32) -> None:
        variants[name] = {"run": run, "file": file, "params": n_params, "baseline": baseline}
        print(f"  built {name}", flush=True)

    def save_float(name: str, m: nn.Module, compression: dict) -> Path:
        path = folder / f"{name}.pth"
        save_checkpoint(make_checkpoint(m.state_dict(), {k: checkpoint[k] for k in META_KEYS}, compression=compression),
                        path)
        return path

    fp32_file = save_float("fp32", model, {"method": "none"})
    add(FP32, model, fp32_file)
    add(FP32_CL, ChannelsLast(copy.deepcopy(model)).eval(), fp32_file, baseline=FP32_CL)
    add("bf16 autocast (channels_last)", Bf16Autocast(copy.deepcopy(model)).eval(),
        save_float("bf16", model, {"method": "bf16"}), baseline=FP32_CL)

    t = time.perf_counter()
    calibration = list(calibration_images(checkpoint, args.data_root, args.calib_images))
    program = quantize_int8(model, calibration)
    int8_file = folder / "int8.pt2"
    save_int8(program, int8_file, {"model_name": checkpoint["model_name"], "compression": {"method": "int8"}})
    int8, _ = load_model(int8_file, trust_artefact=True)
    print(f"  int8: calibrated on {len(calibration)} training images, quantized and saved in "
          f"{time.perf_counter() - t:.0f} s (compiles on first call)", flush=True)
    add("int8 (PT2E, compiled)", int8, int8_file)
    add_onnx(model, checkpoint, calibration, folder, add)

    for sparsity in (0.3, 0.5):
        pruned = copy.deepcopy(model)
        try:
            channels = prune_channels(pruned, sparsity)
        except PruningError as e:
            print(f"  no structured rows: {e}", flush=True)
            break
        n = sum(p.numel() for p in pruned.parameters())
        file = save_float(f"structured{sparsity}", pruned, {"method": "structured", "channels": channels})
        add(f"structured {sparsity:.0%}", pruned.eval(), file, n)
        if sparsity == 0.5:
            add("structured 50% channels_last", ChannelsLast(copy.deepcopy(pruned)).eval(), file, n, FP32_CL)

    sparse = copy.deepcopy(model)
    reached = prune_unstructured(sparse, 0.5, "layer")
    nonzero = sum(int((p != 0).sum()) for p in sparse.parameters())
    add("unstructured 50%", sparse.eval(), save_float("unstructured", sparse, {"method": "unstructured",
                                                                               "sparsity": reached}),
        f"{params / 1e6:.1f}M ({nonzero / 1e6:.1f}M nz)")
    return variants


def add_onnx(model: nn.Module, checkpoint: dict, calibration: list[torch.Tensor], folder: Path,
             add: Callable) -> None:
    """The ONNX Runtime rows: fp32 and int8 .onnx files written and loaded as segpipe.export and load_onnx do."""
    t = time.perf_counter()
    proto = export_model(model, torch.randn(1, 3, HEIGHT, WIDTH))
    int8_proto = quantize_model(proto, calibration)
    for name, precision, p in ((ORT_FP32, "fp32", proto), ("ONNX Runtime int8 (QDQ)", "int8", int8_proto)):
        file = folder / f"{precision}.onnx"
        write_model(with_metadata(p, checkpoint, {"precision": precision}), file)
        add(name, load_onnx(file)[0], file, baseline=ORT_FP32)
    print(f"  ONNX: exported, int8-calibrated on {len(calibration)} training images and saved in "
          f"{time.perf_counter() - t:.0f} s", flush=True)


def wait_for_quiet(max_load: float | None, minutes: float) -> None:
    """Sleep until the load average drops below max_load, or give up after `minutes` and say so."""
    if max_load is None:
        return
    deadline = time.time() + 60 * minutes
    while os.getloadavg()[0] >= max_load and time.time() < deadline:
        time.sleep(15)
    load = os.getloadavg()[0]
    print(f"  load average {load:.1f} when timing starts" + ("" if load < max_load else
          f" (still above {max_load} after {minutes:.0f} min: latencies include other processes' load)"),
          flush=True)


@torch.no_grad()
def time_variants(variants: dict[str, dict], runs: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per forward of a 1x3x360x480 batch, interleaved over the variants."""
    x = torch.randn(1, 3, HEIGHT, WIDTH)
    for name, v in variants.items():
        t = time.perf_counter()
        for _ in range(warmup):
            v["run"](x)
        print(f"  warm-up {name}: {time.perf_counter() - t:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(runs):
        for name, v in variants.items():
            t = time.perf_counter()
            v["run"](x)
            times[name].append((time.perf_counter() - t) * 1000)
        print(f"  round {r + 1}/{runs}: " + ", ".join(f"{times[n][-1]:.0f}" for n in variants), flush=True)
    print(f"  load average {os.getloadavg()[0]:.1f} when timing ended", flush=True)
    return times


def quality(variants: dict[str, dict], checkpoint: dict, args: argparse.Namespace) -> tuple[dict[str, tuple], int]:
    """(agreement with fp32, mIoU) of each variant on the valid images, predicted as evaluate.py predicts
    (at the checkpoint's eval size, logits upsampled to the full-resolution masks); and the image count."""
    images, masks = labelled_images(checkpoint, args.data_root, "valid", args.images)
    reference = None
    results = {}
    for name, v in variants.items():
        t = time.perf_counter()
        preds = predict_classes(v["run"], checkpoint, images)
        reference = reference if reference is not None else preds  # the first row is fp32 eager
        results[name] = (pixel_agreement(preds, reference),
                         mean_iou(preds, masks, checkpoint["num_classes"], checkpoint["ignore_index"]))
        print(f"  {name}: {len(images)} images in {time.perf_counter() - t:.0f} s, agreement {results[name][0]:.2%}, "
              f"mIoU {results[name][1]:.4f}", flush=True)
    return results, len(images)


def print_table(variants: dict[str, dict], times: dict[str, list[float]], scores: dict[str, tuple],
                n_images: int) -> None:
    """The markdown table, speed-ups relative to fp32 eager."""
    base = statistics.median(times[FP32])
    print("\n| variant | latency ms (median) | min ms | speed-up vs fp32 eager | vs fp32 same format | file MB "
          "| parameters | agreement | mIoU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, v in variants.items():
        ms = statistics.median(times[name])
        same = statistics.median(times[v["baseline"]]) / ms
        params = v["params"] if isinstance(v["params"], str) else f"{v['params'] / 1e6:.1f}M"
        agree, miou = scores[name]
        print(f"| {name} | {ms:.0f} | {min(times[name]):.0f} | {base / ms:.2f}x | {same:.2f}x ({v['baseline']}) "
              f"| {os.path.getsize(v['file']) / 1e6:.1f} | {params} | {agree:.2%} | {miou:.4f} |")
    print(f"\nagreement and mIoU over {n_images} valid images")
    median = {name: statistics.median(times[name]) for name in variants}
    faithful = [name for name in variants if scores[name][0] >= 0.99]  # classes as fp32 on >= 99% of pixels
    for label, names in (("fastest", list(variants)), ("fastest with >= 99% agreement", faithful)):
        best = min(names, key=median.get)
        print(f"{label}: {best} ({median[best]:.0f} ms median, {min(times[best]):.0f} ms min)")
    print(f"{ORT_FP32}: {median[ORT_FP32]:.0f} ms median; PyTorch {FP32_CL}: {median[FP32_CL]:.0f} ms median")


def main() -> None:
    """Build every variant, time them interleaved, score them on the valid images, print the table."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(describe(), flush=True)
    print(f"# {args.threads} threads", flush=True)
    model, checkpoint = load_float(args)
    with tempfile.TemporaryDirectory(prefix="segpipe-compress-bench-") as folder:
        variants = build_variants(model, checkpoint, args, Path(folder))
        wait_for_quiet(args.wait_load, args.wait_minutes)
        times = time_variants(variants, args.runs, args.warmup)
        scores, n_images = quality(variants, checkpoint, args)
        print_table(variants, times, scores, n_images)
    print(f"load average {os.getloadavg()[0]:.1f} at the end of the run "
          f"({'random init' if not args.checkpoint else args.checkpoint})")


if __name__ == "__main__":
    main()
