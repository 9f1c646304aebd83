"""Same-budget model comparison on CamVid: train each model for the same CPU time, then score it.

    nice python benchmarks/same_budget.py --budget-min 12

For every run (model:loss) the budget becomes a number of epochs: the seconds of one training step
(batch, crop and precision of the config; the fastest of 3 after a warm-up step, all runs measured
up front, before any training, so that no run's measurement competes with another's training) times
the steps in an epoch. Each model then trains its full schedule (warm-up and poly decay end together) with
`train.py`, validates once at the end, and `evaluate.py` scores best.pt on the full-resolution valid
masks. Fixing the epochs up front keeps a run's result independent of other load on the machine;
the table reports the wall time each run really took. Latency is measured last, for all trained
models together in interleaved rounds (batch 1 at the config's eval size, fp32 as evaluate.py runs,
--threads threads, median). A run whose metrics.json exists is not redone (delete OUT/NAME to redo
it); an interrupted run resumes from its last.pt.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.hardware import describe  # noqa: E402
from benchmarks.train_step import make_step  # noqa: E402
from segpipe.config import load_config  # noqa: E402
from segpipe.data import load_index  # noqa: E402
from segpipe.distributed import resolve_amp  # noqa: E402
from segpipe.model_files import load_model  # noqa: E402

SMALL_CLASSES = ("pole", "sign_symbol", "pedestrian", "bicyclist")
DEFAULT_RUNS = ("unet:ce", "deeplabv3_resnet50:ce", "resnet50_convhead:ce", "resnet50_convhead:ce+dice")


def seconds_per_step(model_name: str, loss: str, cfg, repeats: int = 3) -> float:
    """Seconds of one training step (forward, loss, backward, optimizer) at the config's batch, crop and
    precision: the fastest of `repeats` after a warm-up step, as other load only ever makes a step slower."""
    amp_dtype, _ = resolve_amp(cfg.train.amp, torch.device("cpu"))
    step = make_step(model_name, cfg.model.channels_last, amp_dtype is not None, cfg.train.batch_size,
                     tuple(cfg.data.crop_size), loss, len(cfg.data.classes))
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.inference_mode()
def latencies_ms(checkpoints: list[Path], size: list[int], rounds: int = 10) -> list[float]:
    """Median ms of one eval forward (batch 1, size) per checkpoint, timed in interleaved rounds."""
    models = [load_model(path, torch.device("cpu"))[0] for path in checkpoints]
    x = torch.randn(1, 3, *size)
    for model in models:  # warm-up
        model(x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for model, record in zip(models, times):
            start = time.perf_counter()
            model(x)
            record.append(1000 * (time.perf_counter() - start))
    return [sorted(t)[len(t) // 2] for t in times]


def run(cmd: list[str], log_path: Path) -> float:
    """Run cmd with its output appended to log_path; return its wall seconds, stop on failure."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    with open(log_path, "a") as log:
        result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): see {log_path}")
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/compare_camvid_cpu.yaml")
    parser.add_argument("--budget-min", type=float, default=12, help="training minutes per run")
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="MODEL:LOSS pairs")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / args.config, args.overrides)
    steps_per_epoch = len(load_index(cfg.data.root, "train", cfg.data.cache_dir)) // cfg.train.batch_size
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    runs = [(spec.split(":")[0], spec.split(":")[1], out / spec.replace(":", "-").replace("+", "_"))
            for spec in args.runs]
    for model_name, loss, run_dir in runs:  # every measurement first, on a machine no run is training on
        if not (run_dir / "budget.json").is_file():
            step_s = seconds_per_step(model_name, loss, cfg)
            epochs = max(1, int(args.budget_min * 60 / (step_s * steps_per_epoch)))
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "budget.json").write_text(json.dumps({"step_s": step_s, "epochs": epochs,
                                                             "budget_min": args.budget_min}))
    rows = []
    for model_name, loss, run_dir in runs:
        metrics_path = run_dir / "eval_valid" / "metrics.json"
        record_path = run_dir / "budget.json"
        record = json.loads(record_path.read_text())
        if not metrics_path.is_file():
            epochs = record["epochs"]
            print(f"{run_dir.name}: {record['step_s']:.2f} s/step x {steps_per_epoch} steps/epoch -> "
                  f"{epochs} epochs in {record['budget_min']:g} min", flush=True)
            name = f"{args.out}/{run_dir.name}"
            record["train_s"] = run([sys.executable, "train.py", "--config", args.config, *args.overrides,
                                     f"model.name={model_name}", f"train.loss={loss}", f"train.epochs={epochs}",
                                     f"train.val_every={epochs}", "train.resume=auto", f"output_dir={name}"],
                                    run_dir / "log.txt")
            record_path.write_text(json.dumps(record))
            run([sys.executable, "evaluate.py", "--checkpoint", f"{name}/best.pt", "--workers", "1",
                 "--failures", "0"], run_dir / "log.txt")
        rows.append((model_name, loss, record, json.loads(metrics_path.read_text())))

    latency = latencies_ms([run_dir / "best.pt" for _, _, run_dir in runs], cfg.data.eval_size or [360, 480])
    lines = ["| model | loss | s/step | epochs | train wall (min) | val mIoU | "
             + " | ".join(SMALL_CLASSES) + " | latency ms |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(SMALL_CLASSES) + "---:|"]
    for (model_name, loss, record, metrics), ms in zip(rows, latency):
        small = " | ".join(f"{100 * metrics['per_class_iou'][c]:.1f}" for c in SMALL_CLASSES)
        train_min = f"{record['train_s'] / 60:.1f}" if "train_s" in record else "?"
        lines.append(f"| {model_name} | {loss} | {record['step_s']:.2f} | {record['epochs']} | {train_min} | "
                     f"{100 * metrics['miou']:.1f} | {small} | {ms:.0f} |")
    table = "\n".join(lines)
    print("\n" + describe())
    print(f"{torch.get_num_threads()} threads, budget {args.budget_min:g} min/run, "
          f"IoU in % on CamVid valid (full-resolution masks), latency at batch 1, "
          f"{'x'.join(map(str, cfg.data.eval_size or [360, 480]))}, fp32\n{table}")
    (out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
