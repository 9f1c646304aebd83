"""Command line: `python -m segpipe.compress prune ...` and `python -m segpipe.compress quantize ...`.

    prune    --checkpoint P --sparsity 0.5 [--method unstructured|structured] [--finetune-epochs N] --out P2
    prune    --checkpoint P --sweep [--method ...] [--images N]      mIoU against sparsity 0.1 ... 0.9
    quantize --checkpoint P [--dtype int8|bf16] [--calib-images 64] --out P2.pt2
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import yaml
from torch import nn

from segpipe.checkpoint import META_KEYS, CheckpointError, make_checkpoint, save_checkpoint
from segpipe.compress.int8 import SUFFIX as INT8_SUFFIX
from segpipe.compress.int8 import quantize_int8, save_int8
from segpipe.compress.quality import (calibration_images, labelled_images, mean_iou, pixel_agreement,
                                      predict_classes)
from segpipe.compress.structured import (CRITERIA, PruningError, group_widths, prune_channels,
                                         prunable_channel_sparsity)
from segpipe.compress.unstructured import SCOPES, prune_unstructured
from segpipe.data import DataError
from segpipe.model_files import load_float_model
from segpipe.outputs import OutputError, prepare_file
from segpipe.training import read_config, train
SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The prune and quantize sub-commands."""
    parser = argparse.ArgumentParser(prog="python -m segpipe.compress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prune = sub.add_parser("prune", help="structured or unstructured L1 pruning")
    prune.add_argument("--checkpoint", required=True)
    prune.add_argument("--sparsity", type=float, default=0.5, help="share of weights/channels to remove")
    prune.add_argument("--method", choices=("unstructured", "structured"), default="unstructured")
    prune.add_argument("--scope", choices=SCOPES, default="layer", help="unstructured: per layer or global")
    prune.add_argument("--criterion", choices=CRITERIA, default="l1", help="structured: filter L1 or BN |gamma|")
    prune.add_argument("--round-to", type=int, default=8, help="structured: kept widths are multiples of this")
    prune.add_argument("--finetune-epochs", type=int, default=0,
                       help="structured: then train this many epochs with train.py (the checkpoint's config)")
    prune.add_argument("--finetune-lr", type=float, default=None,
                       help="fine-tuning learning rate (default: a tenth of the checkpoint's train.lr)")
    prune.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="more train.py overrides for fine-tuning, e.g. train.batch_size=4")
    prune.add_argument("--sweep", action="store_true", help="print mIoU against sparsity 0.1 ... 0.9 instead")
    prune.add_argument("--out", help="where to write the pruned checkpoint (.pth)")
    quant = sub.add_parser("quantize", help="int8 static quantization (x86, PT2E) or bf16 autocast")
    quant.add_argument("--checkpoint", required=True)
    quant.add_argument("--dtype", choices=("int8", "bf16"), default="int8")
    quant.add_argument("--calib-images", type=int, default=64, help="int8: training images to calibrate on")
    quant.add_argument("--out", required=True, help=f"int8: a *{INT8_SUFFIX} file; bf16: a .pth file")
    for p in (prune, quant):
        p.add_argument("--data-root", default=None,
                       help="folder with train/ and valid/ (default: the data.root the checkpoint was "
                            "trained on)")
        p.add_argument("--images", type=int, default=None, help="sweep: limit the valid images used")
        p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.command == "prune" and not args.sweep and not args.out:
        parser.error("prune needs --out PATH (or --sweep to only measure)")
    check_numbers(args)
    return args


# Allowed values of the numeric options: (test, what the message asks for).
NUMBER_RULES = {"sparsity": (lambda v: 0 < v < 1, "a share between 0 and 1, e.g. 0.5"),
                "round_to": (lambda v: v >= 1, "1 or more"), "finetune_epochs": (lambda v: v >= 0, "0 or more"),
                "finetune_lr": (lambda v: v > 0, "above 0"), "calib_images": (lambda v: v >= 1, "1 or more"),
                "images": (lambda v: v >= 1, "1 or more"), "threads": (lambda v: v >= 1, "1 or more")}


def check_numbers(args: argparse.Namespace) -> None:
    """One line naming the option, instead of a traceback deep in pruning or calibration."""
    for name, (ok, wanted) in NUMBER_RULES.items():
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            raise SystemExit(f"error: --{name.replace('_', '-')} {value}: must be {wanted}")


def data_root(args: argparse.Namespace, checkpoint: dict) -> str:
    """--data-root, else the root the checkpoint was trained on (its absence is reported where it is read)."""
    if args.data_root:
        return args.data_root
    return ((checkpoint.get("config") or {}).get("data") or {}).get("root") or "data"


def prune_model(model: nn.Module, args: argparse.Namespace, sparsity: float) -> dict:
    """Prune a float model in place as the arguments say; return its "compression" record."""
    if args.method == "structured":
        before = group_widths(model)
        channels = prune_channels(model, sparsity, args.criterion, args.round_to)
        return {"method": "structured", "requested_sparsity": sparsity, "criterion": args.criterion,
                "round_to": args.round_to, "sparsity": prunable_channel_sparsity(channels, before),
                "channels": channels, "original_channels": before}
    reached = prune_unstructured(model, sparsity, args.scope)
    return {"method": "unstructured", "requested_sparsity": sparsity, "scope": args.scope, "sparsity": reached}


def sweep(model: nn.Module, checkpoint: dict, args: argparse.Namespace) -> None:
    """Print mIoU and agreement with the unpruned model for sparsities 0.1 ... 0.9 (the paper's figure)."""
    root = data_root(args, checkpoint)
    images, masks = labelled_images(checkpoint, root, "valid", args.images)
    num_classes, ignore = checkpoint["num_classes"], checkpoint["ignore_index"]
    dense = predict_classes(model, checkpoint, images)
    print(f"{args.method} pruning sweep on {len(images)} valid images of {root}")
    print(f"{'sparsity':>8}  {'reached':>7}  {'mIoU':>6}  {'agreement':>9}")
    print(f"{0.0:>8.1f}  {0.0:>7.3f}  {mean_iou(dense, masks, num_classes, ignore):>6.4f}  {1.0:>9.4f}")
    for s in SWEEP:
        pruned = copy.deepcopy(model)
        record = prune_model(pruned, args, s)
        preds = predict_classes(pruned.eval(), checkpoint, images)
        print(f"{s:>8.1f}  {record['sparsity']:>7.3f}  {mean_iou(preds, masks, num_classes, ignore):>6.4f}  "
              f"{pixel_agreement(preds, dense):>9.4f}", flush=True)


def compressed(meta: dict, model: nn.Module, record: dict) -> dict:
    """The checkpoint of a compressed float model: the source's metadata, the new weights, the record."""
    return make_checkpoint(model.state_dict(), {k: meta[k] for k in META_KEYS}, compression=record)


def valid_miou(model: nn.Module, meta: dict, images: list, masks: list) -> float:
    """mIoU of a model on labelled images, scored as evaluate.py scores it."""
    if getattr(model, "aux_classifier", None) is not None:
        model = copy.deepcopy(model)
        model.aux_classifier = None
    preds = predict_classes(model.eval(), meta, images)
    return mean_iou(preds, masks, meta["num_classes"], meta["ignore_index"])


def finetune(pruned_checkpoint: dict, args: argparse.Namespace) -> Path:
    """Train the pruned model (segpipe.training.train: its config, init_from the pruned weights); return the path
    of its best.pt.

    The run lives next to --out in OUT_STEM-finetune/ (pruned.pth, config.yaml, last.pt, best.pt, tb/), so
    an interrupted fine-tuning resumes when the same command runs again.
    """
    config = pruned_checkpoint.get("config")
    if not config:
        raise SystemExit(f"{args.checkpoint} stores no training config (not written by train.py), so it cannot be "
                         f"fine-tuned here; prune without --finetune-epochs and train with train.py "
                         f"train.init_from={args.out}")
    run_dir = Path(args.out).with_name(Path(args.out).stem + "-finetune")
    run_dir.mkdir(parents=True, exist_ok=True)
    pruned_path = run_dir / "pruned.pth"
    save_checkpoint(pruned_checkpoint, pruned_path)
    config_path = run_dir / "source_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    lr = args.finetune_lr if args.finetune_lr is not None else 0.1 * float(config["train"]["lr"])
    overrides = [f"train.init_from={pruned_path}", f"train.epochs={args.finetune_epochs}", "train.resume=auto",
                 f"train.lr={lr}", "train.max_steps=null", "model.weights=none", "model.weights_backbone=none",
                 f"output_dir={run_dir}"]
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    overrides += args.set
    print(f"fine-tuning: python train.py --config {config_path} {' '.join(overrides)}", flush=True)
    if train(read_config(str(config_path), overrides)) != 0:
        raise SystemExit(f"fine-tuning failed (see the output above); the pruned, not fine-tuned model is in "
                         f"{pruned_path}, and running the same command again resumes from {run_dir / 'last.pt'}")
    return run_dir / "best.pt"


def run_prune(args: argparse.Namespace) -> None:
    """prune: load, prune (or sweep), optionally fine-tune, save a checkpoint every entry point can read."""
    if args.out and Path(args.out).suffix == INT8_SUFFIX:
        raise SystemExit(f"--out {args.out}: pruned models are checkpoints; name the file *.pth")
    if args.finetune_epochs and args.method != "structured":
        raise SystemExit("--finetune-epochs needs --method structured: fine-tuning an unstructured-pruned model "
                         "would grow the removed weights back (the masks are not kept)")
    if args.out:
        prepare_file(args.out, "--out")  # before the pruning and fine-tuning, not after
    if args.sweep:
        return sweep(*load_float_model(args.checkpoint, keep_aux=False), args)
    model, checkpoint = load_float_model(args.checkpoint, keep_aux=True)
    params_before = sum(p.numel() for p in model.parameters())
    record = prune_model(model, args, args.sparsity)
    record.update(source=str(args.checkpoint), params_before=params_before,
                  params_after=sum(p.numel() for p in model.parameters()))
    pruned = compressed(checkpoint, model, record)
    print(f"{args.method} pruning: sparsity {record['sparsity']:.3f} (asked {args.sparsity}), parameters "
          f"{params_before:,} -> {record['params_after']:,}", flush=True)
    if args.finetune_epochs:  # valid mIoU (first --images) before and after, on the same decoded images
        images, masks = labelled_images(checkpoint, data_root(args, checkpoint), "valid", args.images)
        record["miou_before_finetune"] = valid_miou(model, checkpoint, images, masks)
        tuned, _ = load_float_model(finetune(pruned, args), keep_aux=True)
        record.update(finetune_epochs=args.finetune_epochs, finetune_run=str(Path(args.out).stem + "-finetune"),
                      miou_after_finetune=valid_miou(tuned, checkpoint, images, masks))
        pruned = compressed(checkpoint, tuned, record)
        print(f"valid mIoU of the pruned model: {record['miou_before_finetune']:.4f} before fine-tuning, "
              f"{record['miou_after_finetune']:.4f} after {args.finetune_epochs} epoch(s)")
    save_checkpoint(pruned, args.out)
    print(f"wrote {args.out}")


def run_quantize(args: argparse.Namespace) -> None:
    """quantize: bf16 (a checkpoint flagged for autocast) or int8 (calibrate, convert, save a .pt2)."""
    wanted = INT8_SUFFIX if args.dtype == "int8" else ".pth"
    if (Path(args.out).suffix == INT8_SUFFIX) != (args.dtype == "int8"):
        raise SystemExit(f"--out {args.out}: {args.dtype} artefacts are read by their suffix; name it *{wanted}")
    prepare_file(args.out, "--out")  # before the calibration, not after
    model, checkpoint = load_float_model(args.checkpoint, keep_aux=False)
    previous = checkpoint["compression"]
    if args.dtype == "bf16":
        record = {"method": "bf16", "source": str(args.checkpoint), "previous": previous}
        save_checkpoint(compressed(checkpoint, model, record), args.out)
        print(f"bf16: wrote {args.out} (fp32 weights, run under bf16 autocast by segpipe.model_files.load_model)")
        return
    root = data_root(args, checkpoint)
    calibration = list(calibration_images(checkpoint, root, args.calib_images))
    print(f"int8: calibrating on {len(calibration)} training images of {root} ...", flush=True)
    program = quantize_int8(model, calibration)
    record = {"method": "int8", "source": str(args.checkpoint), "calib_images": len(calibration),
              "quantizer": "torchao X86InductorQuantizer, default static config", "previous": previous,
              "torch": torch.__version__, "torchao": _torchao_version()}
    save_int8(program, args.out, {**{k: checkpoint[k] for k in META_KEYS}, "compression": record})
    print(f"int8: wrote {args.out}")


def _torchao_version() -> str:
    import torchao
    return torchao.__version__


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        {"prune": run_prune, "quantize": run_quantize}[args.command](args)
    except (DataError, CheckpointError, PruningError, OutputError) as e:  # the user's files or options: a message, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
