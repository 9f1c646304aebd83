"""Predict class maps: `python infer.py image.jpg [more files | folders | globs] [--checkpoint P] [--out DIR] [--tta]`,
or `python infer.py shards.json --split valid` for the images of a split of tar shards (a path or URL).

For each image writes OUT/NAME_mask.png (the class index of every pixel, as a palette PNG: viewers show the
class colours, programs read the indices) and OUT/NAME_overlay.jpg (the image blended with the class colours,
with a legend of the classes present), and prints each class's share of the image and the time taken.
Files it writes are marked (segpipe.outputs.PREDICTION_TAG) and written under a temporary name, then renamed: it
never replaces a file it did not write, refuses an --out inside a data folder (NAME_mask.png is also the name of
the ground truth there), and a rerun skips the images whose outputs are already there (--overwrite redoes them),
so a long job that was stopped goes on where it ended. Many processes: `torchrun --nproc_per_node=N infer.py ...`
predicts each input exactly once over all of them (each process a contiguous block, so over shards each reads only
its own part). The outputs of an image NAME.jpg in a folder or a shard are NAME_mask.png and NAME_overlay.jpg.
Without --checkpoint it uses the best.pt of the newest finished training run in runs/ (and asks for --checkpoint
when finished runs predict different classes).
The predictions are those evaluate.py scores: both go through segpipe.predict.Predictor.
"""
import argparse
import glob
import re
import sys
import time
from pathlib import Path
from typing import Optional

from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from segpipe import distributed as dist_utils
from segpipe.checkpoint import CheckpointError
from segpipe.data import IMAGE_EXTS, MASK_SUFFIX, DataError
from segpipe.outputs import OutputError, is_prediction, prepare_dir, save_prediction, split_folder_holding
from segpipe.predict import TTA_SCALES, ImageFiles, Predictor, class_shares, open_predictor
from segpipe.shards import ShardIndex, is_descriptor, open_index
from segpipe.visualize import colorize, overlay


def get_args_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files, folders (their images, not *_mask.png) or globs; "
                                                  "or one shard descriptor (shards.json path or URL)")
    parser.add_argument("--split", default="valid", help="the split of a shard descriptor input (default: valid)")
    parser.add_argument("--checkpoint", help="a best.pt/last.pt of train.py or a compressed artefact "
                                             "(default: the best.pt of the newest finished run in runs/)")
    parser.add_argument("--out", default="predictions", help="folder for NAME_mask.png and NAME_overlay.jpg")
    parser.add_argument("--overwrite", action="store_true", help="replace predictions an earlier run wrote to --out")
    parser.add_argument("--tta", action="store_true", help=f"test-time augmentation: horizontal flip and scales "
                                                           f"{', '.join(map(str, TTA_SCALES))} (about 6x slower)")
    parser.add_argument("--scales", type=float, nargs="+", help="input scales for multi-scale prediction "
                                                                "(overrides those of --tta)")
    parser.add_argument("--window", help="tile size HxW for images much larger than the training crops, or 'auto' "
                                         "(the training crop size); default: the whole image in one pass")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present)")
    parser.add_argument("--trust-artefact", action="store_true",
                        help="allow an int8 .pt2 --checkpoint: loading one can run code stored in it, so use only "
                             "files you made with `python -m segpipe.compress quantize`")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours in the overlay")
    parser.add_argument("--batch-size", type=int, default=4, help="images of the same size per forward pass")
    parser.add_argument("--workers", type=int, default=2, help="processes decoding the next images while the model "
                                                               "runs (none when there are fewer than two batches)")
    return parser


def main(argv: Optional[list] = None) -> int:
    """Predict every input image and write its mask and overlay; under torchrun each process takes its share.
    Returns 0; ends the program with the list of inputs that could not be processed, if any (after the others)."""
    args = parse_args(argv)
    rt = dist_utils.setup(args.device, amp="none")  # fp32, as evaluate.py scores
    log = print if rt.is_main else (lambda *a, **k: None)
    out_dir = prepare_output(args.out)
    predictor, checkpoint = open_model(args, rt.device, log)
    images, stems, unmatched = collect_inputs(args, predictor)
    errors = unmatched if rt.is_main else []  # every rank finds them; rank 0 reports them
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    todo = unfinished(out_dir, stems, args.overwrite)
    log(f"{len(images)} image(s) -> {out_dir}/  ({Path(checkpoint).name}: {predictor.meta['model_name']}, "
        f"{predictor.num_classes} classes, {predictor.device}{', TTA' if len(predictor.scales) > 1 or args.tta else ''}"
        f"{f', {rt.world_size} processes' if rt.world_size > 1 else ''})"
        + (f"; {len(images) - len(todo)} already predicted, skipped (--overwrite redoes them)"
           if len(todo) < len(images) else ""))
    mine = [todo[i] for i in dist_utils.ShardSampler(len(todo), rt.rank, rt.world_size)]  # every input once
    written = predict_all(predictor, ImageFiles(images), stems, mine, out_dir, args, errors)
    written, failed = dist_utils.all_reduce_sum([written, len(errors)], rt.device)
    log(f"wrote {int(written)} mask(s) and overlay(s) to {out_dir}/")
    dist_utils.cleanup()
    if errors:
        sys.exit(f"{len(errors)} input(s) could not be processed:\n  " + "\n  ".join(errors))
    if failed:
        sys.exit(f"{int(failed)} input(s) could not be processed (another process named them above)")
    return 0


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    """The arguments, with the counts in range (else the program ends)."""
    args = get_args_parser().parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        sys.exit(f"error: --batch-size must be 1 or more and --workers 0 or more "
                 f"(got {args.batch_size} and {args.workers})")
    return args


def prepare_output(out: str) -> Path:
    """The output folder, checked before anything slow: never inside a data folder, writable."""
    data_folder = split_folder_holding(out)
    if data_folder is not None:
        sys.exit(f"error: --out {out} is inside the data folder {data_folder}, whose NAME_mask.png files are "
                 f"ground truth; write predictions elsewhere, e.g. --out predictions")
    try:
        return prepare_dir(out, "--out")
    except OutputError as e:
        sys.exit(f"error: {e}")


def open_model(args: argparse.Namespace, device, log) -> tuple[Predictor, Path]:
    """The Predictor of --checkpoint (or of the newest finished run) on device, and that file's path."""
    try:
        predictor, checkpoint, picked = open_predictor(args.checkpoint, device, args.tta, args.scales,
                                                       args.window, args.batch_size, args.trust_artefact)
    except (CheckpointError, ValueError) as e:  # no checkpoint, an unreadable one, a bad --window or --scales
        sys.exit(f"error: {e}")
    if picked:
        log(f"using {checkpoint}, from the newest finished run (--checkpoint chooses another)")
    return predictor, checkpoint


def collect_inputs(args: argparse.Namespace,
                   predictor: Predictor) -> tuple[list[Path] | ShardIndex, list[str], list[str]]:
    """The images to predict (paths, or the index of a split of tar shards), the NAME of each one's outputs, and
    the inputs that matched nothing (the program ends on an unusable shard descriptor)."""
    descriptors = [item for item in args.inputs if is_descriptor(item)]
    if not descriptors:
        files, missing = collect_images(args.inputs)
        return files, output_stems([path.stem for path in files]), missing
    if len(args.inputs) > 1:
        sys.exit(f"error: {descriptors[0]} is a shard descriptor: give it as the only input (one infer.py run per "
                 f"shard set and split)")
    data_cfg = predictor.meta["config"].get("data", {})  # where the checkpoint's training cached its shards
    try:
        index = open_index(descriptors[0], args.split, data_cfg.get("cache_dir"),
                           cache_limit=data_cfg.get("cache_limit") or "20GB")
    except DataError as e:
        sys.exit(f"data error: {e}")
    return index, output_stems([file_stem(key.decode()) for key in index.names]), []


def file_stem(key: str) -> str:
    """A shard member's key as a file name: tools other than segpipe may write keys like CITY/NAME; their
    separators become _, so an output never lands outside --out."""
    return re.sub(r"[/\\\x00]", "_", key)


def collect_images(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Image paths from files, folders and globs (in the order given), and the inputs that matched nothing."""
    found, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = [p for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                       and not p.name.lower().endswith(MASK_SUFFIX)]  # a data folder holds masks next to images
        elif path.exists():
            matches = [path]
        elif glob.has_magic(item):
            matches = [Path(p) for p in sorted(glob.glob(item)) if Path(p).is_file()]
        else:
            matches = []
        if not matches:
            missing.append(f"{item}: no such file, no image in that folder, or no file matches")
        found += [p for p in matches if p not in found]
    return found, missing


def output_stems(names: list[str]) -> list[str]:
    """The NAME of each input's NAME_mask.png and NAME_overlay.jpg: a.jpg from two folders gives a, a-1."""
    stems: list[str] = []
    used: set[str] = set()
    for name in names:
        stem, n = name, 1
        while stem in used:
            stem, n = f"{name}-{n}", n + 1
        stems.append(stem)
        used.add(stem)
    return stems


def unfinished(out_dir: Path, stems: list[str], overwrite: bool) -> list[int]:
    """The positions of the inputs still to predict: all with --overwrite, else those without both outputs.

    Outputs are written under a temporary name and renamed, so one that exists is complete: a rerun after a
    stop or preemption goes on where the last one ended. Exits before any work if an output name holds a file
    infer.py did not write (it is never replaced)."""
    outputs = [(out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.jpg") for stem in stems]
    foreign = [p for pair in outputs for p in pair if p.exists() and not is_prediction(p)]
    if foreign:
        sys.exit(f"error: {foreign[0]} exists and was not written by infer.py ({len(foreign)} such file(s)); "
                 f"it is never replaced: choose another --out")
    return [i for i, pair in enumerate(outputs) if overwrite or not all(p.exists() for p in pair)]


def predict_all(predictor: Predictor, images: ImageFiles, stems: list[str], positions: list[int], out_dir: Path,
                args: argparse.Namespace, errors: list[str]) -> int:
    """Decode images[positions] in loader workers, predict in batches, write each mask and overlay; returns how many
    were written. Inputs that cannot be decoded are added to errors."""
    palette, classes = predictor.palette, predictor.classes
    workers = args.workers if len(positions) >= 2 * args.batch_size else 0  # starting workers costs more than it saves
    loader = DataLoader(Subset(images, positions), args.batch_size, num_workers=workers, collate_fn=list)
    written = 0
    bar = tqdm(total=len(positions), unit="image", file=sys.stderr, disable=True if len(positions) < 2 else None)
    for batch in loader:
        bar.update(len(batch))
        for _, _, error in batch:
            if error is not None:
                errors.append(error)
                tqdm.write(f"error: {error}", file=sys.stderr)
        decoded = [(i, image) for i, image, error in batch if error is None]
        if not decoded:
            continue
        tic = time.perf_counter()
        preds = predictor.predict_batch([image for _, image in decoded])
        seconds = (time.perf_counter() - tic) / len(decoded)
        for (i, image), pred in zip(decoded, preds):
            labels = pred.numpy().astype("uint8" if predictor.num_classes <= 256 else "int32")
            save_prediction(colorize(labels, palette), out_dir / f"{stems[i]}_mask.png")
            save_prediction(overlay(image, labels, palette, classes, alpha=args.alpha).convert("RGB"),
                            out_dir / f"{stems[i]}_overlay.jpg", quality=90)
            written += 1
            shares = sorted(enumerate(class_shares(pred, predictor.num_classes)), key=lambda kv: -kv[1])
            summary = ", ".join(f"{classes[c]} {share:.1%}" for c, share in shares if share > 0)
            tqdm.write(f"{images.name(i)}  {image.width}x{image.height}  {seconds * 1000:.0f} ms  {summary}")
    bar.close()
    return written


# A DataLoader worker started with spawn or forkserver (macOS, Windows, Python >= 3.14) imports this file
# again as __mp_main__: nothing above runs on import.
if __name__ == "__main__":
    sys.exit(main())
