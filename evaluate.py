"""Score a checkpoint on a labelled split: `python evaluate.py [CHECKPOINT] [--data-root R] [--split valid] [--tta]`.

Several processes: `torchrun --nproc_per_node=N evaluate.py ...`; every image is scored exactly once
(ShardSampler, no padding) and the confusion matrices are summed. Predictions come from the Predictor that
infer.py uses, at each mask's full resolution, so these numbers are what infer.py's masks score.
Prints a per-class table and writes to --out (default: CHECKPOINT_FOLDER/eval_SPLIT):
metrics.json (fractions in [0, 1]; null for undefined values), confusion_matrix.png (row-normalised) and
failures/ (the images with the lowest per-image mIoU, as image | truth | prediction panels).
A class absent from both truth and prediction has no IoU: it is excluded from the means and listed.
"""
import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from segpipe import distributed as dist_utils
from segpipe.checkpoint import CheckpointError
from segpipe.data import DataError, MaskDecoder, SegmentationDataset, worker_message
from segpipe.engine import progress
from segpipe.metrics import ConfusionMatrix
from segpipe.outputs import OutputError, prepare_dir
from segpipe.predict import TTA_SCALES, Predictor, open_predictor, resolve_device
from segpipe.shards import is_descriptor, open_index
from segpipe.visualize import colorize, confusion_matrix_image, panels


def get_args_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_file", nargs="?", metavar="CHECKPOINT",
                        help="best.pt/last.pt of train.py or a compressed artefact "
                             "(default: the best.pt of the newest finished run in runs/)")
    parser.add_argument("--checkpoint", help="the same as CHECKPOINT")
    parser.add_argument("--data-root", help="folder holding SPLIT/NAME.jpg + NAME_mask.png, or a shard descriptor "
                                            "(shards.json, a path or URL) (default: the checkpoint's data.root)")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--out", help="output folder (default: the checkpoint's folder/eval_SPLIT)")
    parser.add_argument("--tta", action="store_true", help=f"horizontal flip and scales {TTA_SCALES}")
    parser.add_argument("--scales", type=float, nargs="+", help="input scales (overrides those of --tta)")
    parser.add_argument("--window", help="sliding-window tile HxW, or 'auto' (the training crop size)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass, per process")
    parser.add_argument("--workers", type=int, default=2, help="data loading processes, per process")
    parser.add_argument("--failures", type=int, default=6, help="how many worst images to draw in failures/")
    parser.add_argument("--skip-unpaired", action="store_true", help="score only the images that have a mask")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present)")
    parser.add_argument("--trust-artefact", action="store_true",
                        help="allow an int8 .pt2 --checkpoint: loading one can run code stored in it, so use only "
                             "files you made with `python -m segpipe.compress quantize`")
    return parser


def main(argv: Optional[list] = None) -> int:
    """Score a checkpoint on a labelled split, on every process of the run; rank 0 reports. Returns 0."""
    args = parse_args(argv)
    rt = start_processes(args.device)
    log = print if rt.is_main else (lambda *a, **k: None)
    predictor, checkpoint, out_dir = open_predictor_and_output(args, rt, log)
    data = build_data(args, predictor, checkpoint, rt)
    log(f"evaluating {checkpoint} ({predictor.meta['model_name']}, {predictor.num_classes} classes) on "
        f"{len(data.dataset)} images of {Path(data.root) / args.split}, {rt.world_size} process(es) on {rt.device}"
        f"{f', scales {list(predictor.scales)}' if len(predictor.scales) > 1 else ''}{', flip' if args.tta else ''}")
    cm, per_image, seconds = score(predictor, data, rt)
    if rt.is_main:
        report(args, predictor, checkpoint, data, cm, per_image, seconds, rt.world_size, out_dir, log)
    dist_utils.cleanup()
    return 0


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    """The arguments, with the checkpoint given once and the counts in range (else the program ends)."""
    args = get_args_parser().parse_args(argv)
    if args.checkpoint_file and args.checkpoint and args.checkpoint_file != args.checkpoint:
        sys.exit(f"error: the checkpoint is given twice ({args.checkpoint_file} and --checkpoint {args.checkpoint}); "
                 f"give it once")
    args.checkpoint = args.checkpoint or args.checkpoint_file
    if args.batch_size < 1 or args.workers < 0:
        sys.exit(f"error: --batch-size must be 1 or more and --workers 0 or more "
                 f"(got {args.batch_size} and {args.workers})")
    return args


def start_processes(device: Optional[str]) -> dist_utils.Runtime:
    """Join the process group (under torchrun) on the chosen device, in fp32: infer.py's masks come from fp32 too."""
    try:
        resolve_device(device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    return dist_utils.setup(device, amp="none")


def open_predictor_and_output(args: argparse.Namespace, rt: dist_utils.Runtime, log) -> tuple[Predictor, Path, Path]:
    """The Predictor, its checkpoint's path, and the output folder (checked before the slow part)."""
    try:
        predictor, checkpoint, picked = open_predictor(args.checkpoint, rt.device, args.tta, args.scales,
                                                       args.window, args.batch_size, args.trust_artefact)
    except (CheckpointError, ValueError) as e:  # no checkpoint, an unreadable one, a bad --window or --scales
        sys.exit(f"error: {e}")
    if picked:
        log(f"using {checkpoint}, from the newest finished run (pass a checkpoint to choose another)")
    try:  # before the evaluation, so an unwritable --out does not throw the scores away
        out_dir = prepare_dir(args.out or Path(checkpoint).parent / f"eval_{args.split}", "--out")
    except OutputError as e:
        sys.exit(f"error: {e}")
    return predictor, checkpoint, out_dir


@dataclass
class Data:
    """The labelled split: raw uint8 images (the Predictor resizes and normalises) and full-resolution masks."""

    root: str
    index: object
    dataset: SegmentationDataset
    sampler: dist_utils.ShardSampler
    loader: DataLoader


def build_data(args: argparse.Namespace, predictor: Predictor, checkpoint: Path, rt: dist_utils.Runtime) -> Data:
    """The split's images and masks, decoded as the checkpoint's training decoded them; each rank its own shard."""
    data_cfg = predictor.meta["config"].get("data", {})
    data_root = args.data_root or data_cfg.get("root")
    if not data_root or not (is_descriptor(data_root) or Path(data_root).is_dir()):
        sys.exit(f"data root {data_root!r} (from {'--data-root' if args.data_root else checkpoint}) is not a folder "
                 f"or shard descriptor; pass --data-root ROOT with ROOT/{args.split}/NAME.jpg + NAME_mask.png, or "
                 f"the shards.json of `python -m segpipe.shards write`")
    try:  # a folder, or tar shards (local or remote) read at their offsets: the same exact-once sampler
        index = open_index(data_root, args.split, data_cfg.get("cache_dir"), args.skip_unpaired,
                           data_cfg.get("cache_limit") or "20GB")
        decoder = MaskDecoder.for_checkpoint(predictor.meta)
    except DataError as e:
        sys.exit(f"data error: {e}\n(evaluate.py: --skip-unpaired scores only the images with masks; "
                 f"infer.py predicts images without masks)")
    dataset = SegmentationDataset(index, decoder)
    sampler = dist_utils.ShardSampler(len(dataset), rt.rank, rt.world_size)
    loader = DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=args.workers, collate_fn=list)
    return Data(str(data_root), index, dataset, sampler, loader)


def score(predictor: Predictor, data: Data, rt: dist_utils.Runtime) -> tuple[ConfusionMatrix, torch.Tensor, float]:
    """Every image of this rank's shard scored at its mask's resolution; the confusion matrix and per-image mIoUs
    summed over ranks, and the slowest rank's seconds. A data error on any rank ends every rank."""
    num_classes, ignore_index = predictor.num_classes, predictor.ignore_index
    cm = ConfusionMatrix(num_classes, ignore_index, device=rt.device)
    per_image = torch.zeros(len(data.dataset), dtype=torch.float64, device=rt.device)  # each rank fills its shard
    order = iter(data.sampler)  # the loader yields the shard in sampler order
    failure = None
    tic = time.perf_counter()
    try:
        for batch in progress(data.loader, len(data.loader), "evaluate", rt.is_main, 20):
            preds = predictor.predict_batch([image for image, _ in batch])
            for (_, mask), pred in zip(batch, preds):
                cm.update(mask, pred)
                per_image[next(order)] = image_miou(mask, pred, num_classes, ignore_index)
    except DataError as e:
        failure = f"data error: {worker_message(e)}\n(the checkpoint predicts {num_classes} classes: " \
                  f"{', '.join(predictor.classes)}; is {data.root} the data set it was trained on?)"
    # Every rank reaches this collective, failed or not, so none waits forever on a peer that stopped.
    failed, seconds = dist_utils.all_reduce_max([float(failure is not None), time.perf_counter() - tic], rt.device)
    if failed:
        dist_utils.cleanup()
        sys.exit(failure or "data error in another process (see its message above)")
    cm.all_reduce()
    if rt.world_size > 1:
        torch.distributed.all_reduce(per_image)  # shards are disjoint: the sum puts every score in place
    return cm, per_image, seconds


def image_miou(mask: torch.Tensor, pred: torch.Tensor, num_classes: int, ignore_index: int) -> float:
    """mIoU of one image over the classes in its truth or prediction (NaN if every pixel is ignored)."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(mask, pred)
    return cm.compute()["miou"] if cm.matrix.sum() > 0 else math.nan


def report(args: argparse.Namespace, predictor: Predictor, checkpoint: Path, data: Data, cm: ConfusionMatrix,
           per_image: torch.Tensor, seconds: float, world_size: int, out_dir: Path, log) -> None:
    """The table on the terminal; metrics.json, confusion_matrix.png and the worst images in out_dir."""
    classes, n = predictor.classes, len(data.dataset)
    metrics = cm.compute()
    names = [name.decode() for name in data.index.names]
    log(report_table(metrics, classes))
    if metrics["absent_classes"]:
        log("excluded from the means (absent from truth and prediction): "
            + ", ".join(classes[c] for c in metrics["absent_classes"]))
    log(f"{n} images in {seconds:.1f} s: {n / seconds:.2f} images/s")
    summary = {
        "checkpoint": str(checkpoint), "data_root": data.root, "split": args.split,
        "scales": list(predictor.scales), "flip": args.tta,
        "window": list(predictor.window) if predictor.window else None, "num_images": n, "classes": classes,
        "miou": metrics["miou"], "mdice": metrics["mdice"], "mfscore": metrics["mfscore"],
        "pixel_accuracy": metrics["pixel_accuracy"],
        "mean_accuracy": metrics["mean_accuracy"], "fw_iou": metrics["fw_iou"],
        "per_class_iou": dict(zip(classes, metrics["iou"])),
        "per_class_dice": dict(zip(classes, metrics["dice"])),
        "per_class_precision": dict(zip(classes, metrics["precision"])),
        "per_class_accuracy": dict(zip(classes, metrics["accuracy"])),
        "pixel_share": dict(zip(classes, metrics["pixel_share"])),
        "absent_classes": [classes[c] for c in metrics["absent_classes"]],
        "num_pixels": metrics["num_pixels"], "confusion_matrix": cm.matrix.cpu().tolist(),
        "images_per_s": n / seconds, "world_size": world_size,
        "per_image_miou": dict(zip(names, per_image.cpu().tolist())),
    }
    (out_dir / "metrics.json").write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False) + "\n")
    confusion_matrix_image(cm.matrix.cpu().numpy(), classes).save(out_dir / "confusion_matrix.png")
    worst = draw_failures(predictor, data.dataset, names, per_image.cpu().numpy(), args.failures, out_dir / "failures")
    log(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'confusion_matrix.png'} and the {len(worst)} worst images "
        f"in {out_dir / 'failures'}/")


def report_table(metrics: dict, classes: list[str]) -> str:
    """Per class IoU, Dice (F1), accuracy and pixel share, then the summary metrics, as percentages ("-": undefined)."""
    pct = lambda v: "-" if v != v else f"{100 * v:.1f}%"  # noqa: E731 - v != v: NaN
    width = max(len("class"), *(len(c) for c in classes))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Dice/F1':>7}  {'accuracy':>8}  {'pixels':>6}"]
    for c, name in enumerate(classes):
        note = "  absent: not in truth or prediction" if c in metrics["absent_classes"] else ""
        lines.append(f"{name:<{width}}  {pct(metrics['iou'][c]):>6}  {pct(metrics['dice'][c]):>7}  "
                     f"{pct(metrics['accuracy'][c]):>8}  {pct(metrics['pixel_share'][c]):>6}{note}")
    lines.append("-" * (width + 37))
    lines.append(f"mIoU {pct(metrics['miou'])}  mDice (= mFscore) {pct(metrics['mdice'])}  "
                 f"pixel accuracy {pct(metrics['pixel_accuracy'])}  mean accuracy {pct(metrics['mean_accuracy'])}  "
                 f"frequency-weighted IoU {pct(metrics['fw_iou'])}")
    return "\n".join(lines)


def draw_failures(predictor: Predictor, dataset: SegmentationDataset, names: list[str], scores: np.ndarray,
                  k: int, folder: Path) -> list[int]:
    """Save the k images with the lowest mIoU as image | truth | prediction panels, worst first; return them.

    They are predicted again (deterministic: the masks that were scored), so no rank has to keep images.
    """
    worst = [int(i) for i in np.argsort(np.where(np.isnan(scores), np.inf, scores))[:k] if not np.isnan(scores[i])]
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # a previous run's worst images would mislead
        old.unlink()
    palette = predictor.palette
    for place, i in enumerate(worst, 1):
        image, mask = dataset.load(i)
        pred = predictor.predict(image)
        picture = Image.fromarray(image.permute(1, 2, 0).numpy())
        truth = colorize(mask.numpy(), palette, ignore_index=predictor.ignore_index)
        title = f"prediction: mIoU {100 * scores[i]:.1f}%"
        panels([picture, truth, colorize(pred.numpy(), palette)], [names[i], "truth", title]).save(
            folder / f"{place:02d}_{names[i]}.png")
    return worst


def json_safe(value):
    """NaN -> None (JSON null), recursively; JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# A DataLoader worker started with spawn or forkserver (macOS, Windows, Python >= 3.14) imports this file
# again as __mp_main__: nothing above runs on import.
if __name__ == "__main__":
    sys.exit(main())
