"""Hostile files and careless commands: code in artefacts never runs, ground truth is never overwritten, odd but
genuine files load, and every mistake is one line naming the file or value (no traceback)."""
import builtins
import io
import json
import pickle
import runpy
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, random_mask, run_env, write_pair
from test_predict import tiny_checkpoint

SIZE = (40, 56)
METADATA = {"model_name": "lraspp_mobilenet_v3_large", "num_classes": 3, "classes": ["a", "b", "c"],
            "palette": None, "ignore_index": 255, "mean": [0.5] * 3, "std": [0.2] * 3, "eval_size": None,
            "config": {}, "compression": {"method": "int8"}}


def run(script: str, *args, cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    """An entry script as a process, as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """Failed, with no traceback, and the last line says each of words."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in last_line(result), result.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A labelled data root (train and valid, 3 classes) and a tiny checkpoint trained on nothing."""
    base = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("valid", 2)):
        for i in range(n):
            write_pair(base / "data" / split, f"img{i:03d}", random_mask(rng, *SIZE, 3))
    return base / "data", tiny_checkpoint(base / "run" / "best.pt", data_root=base / "data")


# -- 1. a crafted .pt2 never runs its code ------------------------------------------------------------------------


class Marker:
    """Unpickling this creates the marker file: what a hostile archive would do instead."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def crafted_pt2(path: Path, marker: Path, where: str) -> Path:
    """A genuine torch.export archive with the segpipe metadata, altered so a pickle creates marker on load.

    where: "sample_inputs" (unpickled when the safe load fails), "weights" (a weight marked use_pickle),
    "opaque" (an opaque-object constant), or "none" (unaltered, pickle-free).
    """
    program = torch.export.export(torch.nn.Conv2d(3, 3, 1).eval(), (torch.zeros(1, 3, 4, 4),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"segpipe.json": json.dumps(METADATA)})
    genuine = zipfile.ZipFile(buffer)
    entries = {name: genuine.read(name) for name in genuine.namelist()}
    if where == "sample_inputs":
        entries["archive/data/sample_inputs/model.pt"] = pickled(((Marker(marker),), {}))
    elif where == "weights":
        config = json.loads(entries["archive/data/weights/model_weights_config.json"])
        payload = next(iter(config["config"].values()))
        payload["use_pickle"] = True
        entries[f"archive/data/weights/{payload['path_name']}"] = pickled(Marker(marker))
        entries["archive/data/weights/model_weights_config.json"] = json.dumps(config)
    elif where == "opaque":
        config = {"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                      "tensor_meta": None}}}
        entries["archive/data/constants/model_constants_config.json"] = json.dumps(config)
        entries["archive/data/constants/opaque_obj_0"] = pickle.dumps(Marker(marker))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:  # stored, as torch writes them
        for name, content in entries.items():
            archive.writestr(name, content)
    return path


def test_crafted_pt2_would_run_code_in_torch_export_load(tmp_path):
    """The threat is real: torch.export.load itself unpickles the crafted sample inputs (so the tests below
    would notice a loader that reached it)."""
    marker = tmp_path / "marker"
    try:
        torch.export.load(crafted_pt2(tmp_path / "evil.pt2", marker, "sample_inputs"))
    except RuntimeError:
        pass  # the altered program may fail to build after the pickle ran
    assert marker.exists()


def test_a_crafted_pt2_never_runs_its_pickle_in_infer_or_evaluate(data, tmp_path):
    root, _ = data
    marker = tmp_path / "marker"
    evil = crafted_pt2(tmp_path / "evil.pt2", marker, "sample_inputs")
    # Without --trust-artefact it is refused; with it, the inspection still refuses the pickle.
    result = run("infer.py", root / "valid" / "img000.jpg", "--checkpoint", evil, "--out", tmp_path / "out",
                 cwd=tmp_path)
    assert_one_line_error(result, "evil.pt2", "refused")
    assert not marker.exists()
    result = run("evaluate.py", "--checkpoint", evil, "--data-root", root, "--trust-artefact", cwd=tmp_path)
    assert_one_line_error(result, "evil.pt2", "refused", "sample inputs")
    assert not marker.exists()


@pytest.mark.parametrize("where", ["weights", "opaque"])
def test_pickled_weights_or_opaque_constants_are_refused_even_when_trusted(tmp_path, where):
    from segpipe.checkpoint import CheckpointError
    from segpipe.compress import load_artefact
    marker = tmp_path / "marker"
    with pytest.raises(CheckpointError, match="refused"):
        load_artefact(crafted_pt2(tmp_path / "evil.pt2", marker, where), trust=True)
    assert not marker.exists()


def test_pt2_is_refused_without_trust_and_says_why(tmp_path):
    """Even a pickle-free archive makes torch.export.load evaluate its strings: loading needs trust."""
    from segpipe.checkpoint import CheckpointError
    from segpipe.compress import load_artefact
    with pytest.raises(CheckpointError, match="--trust-artefact") as info:
        load_artefact(crafted_pt2(tmp_path / "plain.pt2", tmp_path / "marker", "none"))
    assert "run anything" in str(info.value) and "\n" not in str(info.value)
    model, meta = load_artefact(tmp_path / "plain.pt2", trust=True, compile=False)  # a genuine file still loads
    assert meta["num_classes"] == 3 and model(torch.zeros(1, 3, 4, 4)).shape == (1, 3, 4, 4)


# -- 2. infer.py never destroys ground truth or earlier predictions ---------------------------------------------------


def run_in_process(script: str, argv: list, cwd: Path, monkeypatch) -> None:
    """An entry script in this process, as `python script argv...` from cwd would run it."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    runpy.run_path(str(REPO / script), run_name="__main__")


def exit_message(script: str, argv: list, cwd: Path, monkeypatch) -> str:
    """The one-line message the script exits with; a traceback instead fails the test."""
    with pytest.raises(SystemExit) as info:
        run_in_process(script, argv, cwd, monkeypatch)
    assert isinstance(info.value.code, str), f"expected an exit message, got {info.value.code!r}"
    assert "\n" not in info.value.code.strip(), info.value.code
    return info.value.code


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_infer_refuses_to_write_into_a_data_split(data, tmp_path):
    root, ckpt = data
    before = snapshot(root / "valid")
    result = run("infer.py", root / "valid", "--checkpoint", ckpt, "--out", root / "valid", cwd=tmp_path)
    assert_one_line_error(result, str(root / "valid"), "ground truth")
    assert snapshot(root / "valid") == before  # no mask replaced, no overlay added


def test_infer_refuses_an_out_below_a_data_split(data, tmp_path, monkeypatch):
    root, ckpt = data
    message = exit_message("infer.py", [root / "valid" / "img000.jpg", "--checkpoint", ckpt,
                                        "--out", root / "valid" / "preds"], tmp_path, monkeypatch)
    assert "inside the data folder" in message and not (root / "valid" / "preds").exists()


def test_infer_replaces_only_its_own_predictions_and_only_with_overwrite(data, tmp_path, monkeypatch):
    root, ckpt = data
    out = tmp_path / "out"
    images = [root / "valid" / "img000.jpg", root / "valid" / "img001.jpg"]
    run_in_process("infer.py", [*images, "--checkpoint", ckpt, "--out", out, "--workers", 0], tmp_path, monkeypatch)
    first = snapshot(out)
    assert sorted(first) == ["img000_mask.png", "img000_overlay.jpg", "img001_mask.png", "img001_overlay.jpg"]
    message = exit_message("infer.py", [*images, "--checkpoint", ckpt, "--out", out], tmp_path, monkeypatch)
    assert "--overwrite" in message and snapshot(out) == first
    run_in_process("infer.py", [*images, "--checkpoint", ckpt, "--out", out, "--overwrite", "--workers", 0],
                   tmp_path, monkeypatch)
    # A file of the user's under an output name is never replaced, --overwrite or not.
    Image.fromarray(np.zeros(SIZE, np.uint8)).save(out / "img001_mask.png")
    users = (out / "img001_mask.png").read_bytes()
    message = exit_message("infer.py", [*images, "--checkpoint", ckpt, "--out", out, "--overwrite"],
                           tmp_path, monkeypatch)
    assert "img001_mask.png" in message and "not written by infer.py" in message
    assert (out / "img001_mask.png").read_bytes() == users


# -- 3. upper-case extensions, 9. non-UTF-8 names, 10. 16-bit images, 11. EXIF orientation --------------------------


def colour_of(mask: np.ndarray) -> np.ndarray:
    """The image write_pair draws for a mask: each class its own colour, so alignment can be checked."""
    mask = mask.astype(np.int64)
    return np.stack([mask * 40 % 256, 255 - mask * 60 % 256, mask * 90 % 256], -1).astype(np.uint8)


def test_upper_case_extensions_open_the_real_files(tmp_path):
    from segpipe.data import MaskDecoder, SegmentationDataset, load_index
    mask = random_mask(np.random.default_rng(0), *SIZE, 3)
    split = tmp_path / "data" / "train"
    split.mkdir(parents=True)
    Image.fromarray(colour_of(mask)).save(split / "CAM1.JPG", format="JPEG")
    Image.fromarray(mask.astype(np.uint8)).save(split / "CAM1_mask.PNG", format="PNG")  # a mask, not an image
    write_pair(split, "cam2", mask, ext=".jpeg")
    index = load_index(str(tmp_path / "data"), "train")
    assert [n.decode() for n in index.names] == ["CAM1", "cam2"]
    assert index.paths(0) == (str(split / "CAM1.JPG"), str(split / "CAM1_mask.PNG"))
    dataset = SegmentationDataset(index, MaskDecoder(3, 255))
    for i in range(2):
        image, labels = dataset.load(i)
        assert np.array_equal(labels.numpy(), mask)


def test_a_name_that_is_not_utf8_is_skipped_with_a_warning(tmp_path):
    from segpipe.data import load_index
    split = tmp_path / "data" / "train"
    write_pair(split, "good", np.zeros(SIZE, np.int64))
    with open(bytes(split) + b"/caf\xe9.jpg", "wb") as f:  # a Latin-1 name, as old cameras and zips write
        f.write((split / "good.jpg").read_bytes())
    with pytest.warns(UserWarning, match=r"caf\\xe9\.jpg.*not valid UTF-8"):
        index = load_index(str(tmp_path / "data"), "train")
    assert [n.decode() for n in index.names] == ["good"]


def test_16_bit_grayscale_is_scaled_to_8_bits_not_white(tmp_path):
    from segpipe.data import read_image
    ramp = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode.startswith("I;16")
    image, _ = read_image(str(tmp_path / "depth.png"))
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels[..., 0].min() == 0 and pixels[..., 0].max() == 255
    assert np.abs(pixels[..., 0].astype(int) - np.rint(ramp / 257)).max() <= 1  # the same picture, in 8 bits


@pytest.mark.parametrize("orientation", [3, 6])
@pytest.mark.parametrize("decode_size", [None, (8, 12)])
def test_exif_orientation_is_applied_so_masks_drawn_on_the_shown_view_align(tmp_path, orientation, decode_size):
    """A camera stores the pixels sideways (6: turn 90 degrees clockwise to show) or upside down (3) and flags it;
    the mask was drawn on the shown view. Both the full decode and the reduced JPEG draft must align."""
    from segpipe.data import MaskDecoder, SegmentationDataset, load_index
    shown = np.kron(np.array([[0, 1, 2], [1, 2, 0]]), np.ones((24, 16), np.int64))  # 48x48, blocks of 24x16
    shown = np.concatenate([shown, np.full((16, 48), 2)])  # 64 high x 48 wide: not square, so a turn matters
    stored = np.rot90(shown, 1) if orientation == 6 else np.rot90(shown, 2)  # what the camera wrote
    split = tmp_path / "data" / "train"
    split.mkdir(parents=True)
    picture = Image.fromarray(colour_of(stored))
    exif = picture.getexif()
    exif[0x0112] = orientation
    picture.save(split / "photo.jpg", exif=exif, quality=95)
    Image.fromarray(shown.astype(np.uint8)).save(split / "photo_mask.png")
    dataset = SegmentationDataset(load_index(str(tmp_path / "data"), "train"), MaskDecoder(3, 255),
                                  decode_size=decode_size)
    image, mask = dataset.load(0)
    assert image.shape[1:] == mask.shape
    expected = colour_of(mask.numpy()).astype(int)
    got = image.permute(1, 2, 0).numpy().astype(int)
    # Interior pixels match the colour of their class (JPEG blurs edges; a wrong turn would miss by ~100).
    assert np.median(np.abs(got - expected)) < 8


# -- 4. config values -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, words", [
    ("train.lr=-1", "train.lr"), ("train.lr=0", "train.lr"), ("train.batch_size=0", "train.batch_size"),
    ("train.accum_steps=0", "train.accum_steps"), ("data.crop_size=[0,0]", "data.crop_size"),
    ("data.crop_size=[32]", "data.crop_size"), ("data.scale_range=[2.0,0.5]", "data.scale_range"),
    ("data.scale_range=[0,1]", "data.scale_range"), ("train.class_weights=[1,2]", "2 weights but there are 3"),
    ("train.class_weights=median", "median_freq"), ("train.epochs=0", "train.epochs"),
    ("train.lr=[1", "not valid YAML"),
])
def test_bad_config_values_are_one_config_error(override, words):
    from segpipe.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=None) as info:
        load_config(REPO / "configs/default.yaml", ["data.classes=[a,b,c]", override])
    assert words in str(info.value) and "\n" not in str(info.value)


def test_train_reports_config_errors_before_touching_data(tmp_path):
    """A YAML syntax error in the file, and a bad value: one `config error:` line, although data.root is missing
    (so they are checked before the data)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: 0.01\n   epochs: 2\n")
    result = run("train.py", "--config", broken, cwd=tmp_path)
    assert_one_line_error(result, "config error:", "broken.yaml", "line 3")
    result = run("train.py", "--config", REPO / "configs/default.yaml", "train.accum_steps=0",
                 f"data.root={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert_one_line_error(result, "config error:", "train.accum_steps=0")
