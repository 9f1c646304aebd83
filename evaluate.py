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
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from segpipe import distributed as dist_utils
from segpipe.checkpoint import CheckpointError
from segpipe.data import DataError, MaskDecoder, SegmentationDataset, load_index, worker_message
from segpipe.engine import progress
from segpipe.metrics import ConfusionMatrix
from segpipe.outputs import OutputError, prepare_dir
from segpipe.predict import TTA_SCALES, Predictor, open_predictor, resolve_device

# A DataLoader worker started with spawn or forkserver (macOS, Windows, Python >= 3.14) imports this file
# again as __mp_main__: everything below runs only when the file is the program.
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_file", nargs="?", metavar="CHECKPOINT",
                        help="best.pt/last.pt of train.py or a compressed artefact "
                             "(default: the best.pt of the newest finished run in runs/)")
    parser.add_argument("--checkpoint", help="the same as CHECKPOINT")
    parser.add_argument("--data-root", help="folder holding SPLIT/NAME.jpg + NAME_mask.png "
                                            "(default: the data.root the checkpoint was trained on)")
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
    args = parser.parse_args()
    if args.checkpoint_file and args.checkpoint and args.checkpoint_file != args.checkpoint:
        sys.exit(f"error: the checkpoint is given twice ({args.checkpoint_file} and --checkpoint {args.checkpoint}); "
                 f"give it once")
    args.checkpoint = args.checkpoint or args.checkpoint_file
    if args.batch_size < 1 or args.workers < 0:
        sys.exit(f"error: --batch-size must be 1 or more and --workers 0 or more "
                 f"(got {args.batch_size} and {args.workers})")


    def image_miou(mask: torch.Tensor, pred: torch.Tensor, num_classes: int, ignore_index: int) -> float:
        """mIoU of one image over the classes in its truth or prediction (NaN if every pixel is ignored)."""
        cm = ConfusionMatrix(num_classes, ignore_index)
        cm.update(mask, pred)
        return cm.compute()["miou"] if cm.matrix.sum() > 0 else math.nan


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
        from segpipe.visualize import colorize, panels
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


    # -- processes and device ----------------------------------------------------------------------------------
    try:
        resolve_device(args.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    rt = dist_utils.setup(args.device, amp="none")  # fp32: the masks infer.py writes come from fp32 too
    log = print if rt.is_main else (lambda *a, **k: None)

    # -- checkpoint and predictor ------------------------------------------------------------------------------
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
    scales = predictor.scales
    classes, num_classes, ignore_index = predictor.classes, predictor.num_classes, predictor.ignore_index

    # -- data: raw uint8 images (the Predictor resizes and normalises) and full-resolution masks ------------------
    data_cfg = predictor.meta["config"].get("data", {})
    data_root = args.data_root or data_cfg.get("root")
    if not data_root or not Path(data_root).is_dir():
        sys.exit(f"data root {data_root!r} (from {'--data-root' if args.data_root else checkpoint}) is not a folder; "
                 f"pass --data-root ROOT with ROOT/{args.split}/NAME.jpg + NAME_mask.png")
    try:
        index = load_index(data_root, args.split, data_cfg.get("cache_dir"), args.skip_unpaired)
        decoder = MaskDecoder.for_checkpoint(predictor.meta)
    except DataError as e:
        sys.exit(f"data error: {e}\n(evaluate.py: --skip-unpaired scores only the images with masks; "
                 f"infer.py predicts images without masks)")
    dataset = SegmentationDataset(index, decoder)
    sampler = dist_utils.ShardSampler(len(dataset), rt.rank, rt.world_size)
    loader = DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=args.workers, collate_fn=list)
    log(f"evaluating {checkpoint} ({predictor.meta['model_name']}, {num_classes} classes) on {len(dataset)} images "
        f"of {Path(data_root) / args.split}, {rt.world_size} process(es) on {rt.device}"
        f"{f', scales {list(scales)}' if len(scales) > 1 else ''}{', flip' if args.tta else ''}")

    # -- the loop: every image of this rank's shard, scored at its mask's resolution --------------------------------
    cm = ConfusionMatrix(num_classes, ignore_index, device=rt.device)
    per_image = torch.zeros(len(dataset), dtype=torch.float64, device=rt.device)  # each rank fills its own shard
    order = iter(sampler)  # the loader yields the shard in sampler order
    failure = None
    tic = time.perf_counter()
    try:
        for batch in progress(loader, len(loader), "evaluate", rt.is_main, 20):
            preds = predictor.predict_batch([image for image, _ in batch])
            for (_, mask), pred in zip(batch, preds):
                cm.update(mask, pred)
                per_image[next(order)] = image_miou(mask, pred, num_classes, ignore_index)
    except DataError as e:
        failure = f"data error: {worker_message(e)}\n(the checkpoint predicts {num_classes} classes: " \
                  f"{', '.join(classes)}; is {data_root} the data set it was trained on?)"
    # Every rank reaches this collective, failed or not, so none waits forever on a peer that stopped.
    failed, seconds = dist_utils.all_reduce_max([float(failure is not None), time.perf_counter() - tic], rt.device)
    if failed:
        dist_utils.cleanup()
        sys.exit(failure or "data error in another process (see its message above)")
    cm.all_reduce()
    if rt.world_size > 1:
        torch.distributed.all_reduce(per_image)  # shards are disjoint: the sum puts every score in place

    # -- report (rank 0) ---------------------------------------------------------------------------------------------
    if rt.is_main:
        metrics = cm.compute()
        names = [n.decode() for n in index.names]
        log(report_table(metrics, classes))
        if metrics["absent_classes"]:
            log("excluded from the means (absent from truth and prediction): "
                + ", ".join(classes[c] for c in metrics["absent_classes"]))
        log(f"{len(dataset)} images in {seconds:.1f} s: {len(dataset) / seconds:.2f} images/s")
        report = {
            "checkpoint": str(checkpoint), "data_root": str(data_root), "split": args.split,
            "scales": list(scales), "flip": args.tta, "window": list(predictor.window) if predictor.window else None,
            "num_images": len(dataset), "classes": classes,
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
            "images_per_s": len(dataset) / seconds, "world_size": rt.world_size,
            "per_image_miou": dict(zip(names, per_image.cpu().tolist())),
        }
        (out_dir / "metrics.json").write_text(json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")
        from segpipe.visualize import confusion_matrix_image
        confusion_matrix_image(cm.matrix.cpu().numpy(), classes).save(out_dir / "confusion_matrix.png")

        worst = draw_failures(predictor, dataset, names, per_image.cpu().numpy(), args.failures, out_dir / "failures")
        log(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'confusion_matrix.png'} and the {len(worst)} worst images "
            f"in {out_dir / 'failures'}/")
    dist_utils.cleanup()
