"""Hostile files and careless commands: code in artefacts never runs, ground truth is never overwritten, odd but
genuine files load, and every mistake is one line naming the file or value (no traceback)."""
import builtins
import importlib
import io
import json
import logging
import os
import pickle
import shutil
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
    """The last line of stderr (where errors go), else of stdout."""
    lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
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


def test_crafted_pt2_would_run_code_in_torch_export_load(tmp_path, caplog):
    """The threat is real: torch.export.load itself unpickles the crafted sample inputs (so the tests below
    would notice a loader that reached it)."""
    # torch's fallback warning has one argument for two %s; pytest's log capture turns that into a failure.
    caplog.set_level(logging.ERROR, logger="torch._export.serde.serialize")
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
    from segpipe.model_files import load_model
    marker = tmp_path / "marker"
    with pytest.raises(CheckpointError, match="refused"):
        load_model(crafted_pt2(tmp_path / "evil.pt2", marker, where), trust_artefact=True)
    assert not marker.exists()


def test_pt2_is_refused_without_trust_and_says_why(tmp_path):
    """Even a pickle-free archive makes torch.export.load evaluate its strings: loading needs trust."""
    from segpipe.checkpoint import CheckpointError
    from segpipe.model_files import load_model
    with pytest.raises(CheckpointError, match="--trust-artefact") as info:
        load_model(crafted_pt2(tmp_path / "plain.pt2", tmp_path / "marker", "none"))
    assert "run anything" in str(info.value) and "\n" not in str(info.value)
    model, meta = load_model(tmp_path / "plain.pt2", trust_artefact=True, compile=False)  # a genuine file still loads
    assert meta["num_classes"] == 3 and model(torch.zeros(1, 3, 4, 4)).shape == (1, 3, 4, 4)


# -- 2. infer.py never destroys ground truth or earlier predictions ---------------------------------------------------


def run_in_process(script: str, argv: list, cwd: Path, monkeypatch) -> None:
    """An entry script's main(argv) in this process, from cwd, as `python script argv...` would run it."""
    monkeypatch.chdir(cwd)
    code = importlib.import_module(Path(script).stem).main([str(a) for a in argv])
    if code:
        raise SystemExit(code)


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


def test_infer_skips_finished_predictions_redoes_them_with_overwrite_and_never_replaces_foreign_files(
        data, tmp_path, monkeypatch, capsys):
    root, ckpt = data
    out = tmp_path / "out"
    images = [root / "valid" / "img000.jpg", root / "valid" / "img001.jpg"]
    run_in_process("infer.py", [*images, "--checkpoint", ckpt, "--out", out, "--workers", 0], tmp_path, monkeypatch)
    first = snapshot(out)
    assert sorted(first) == ["img000_mask.png", "img000_overlay.jpg", "img001_mask.png", "img001_overlay.jpg"]
    # A rerun (after a stop) predicts only what is missing: here one overlay, so image 1 alone.
    (out / "img001_overlay.jpg").unlink()
    os.utime(out / "img000_mask.png", (1, 1))
    capsys.readouterr()
    run_in_process("infer.py", [*images, "--checkpoint", ckpt, "--out", out], tmp_path, monkeypatch)
    printed = capsys.readouterr().out
    assert "1 already predicted, skipped" in printed and "wrote 1 mask(s)" in printed
    assert snapshot(out) == first and os.stat(out / "img000_mask.png").st_mtime == 1  # image 0 untouched
    run_in_process("infer.py", [*images, "--checkpoint", ckpt, "--out", out, "--overwrite", "--workers", 0],
                   tmp_path, monkeypatch)
    assert "wrote 2 mask(s)" in capsys.readouterr().out and os.stat(out / "img000_mask.png").st_mtime > 1
    assert not list(out.glob(".*.tmp"))  # outputs are renamed into place, no temporary file is left
    # A file of the user's under an output name is never replaced, --overwrite or not.
    Image.fromarray(np.zeros(SIZE, np.uint8)).save(out / "img001_mask.png")
    users = (out / "img001_mask.png").read_bytes()
    for flags in ([], ["--overwrite"]):
        message = exit_message("infer.py", [*images, "--checkpoint", ckpt, "--out", out, *flags],
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
    from segpipe.data import image_size  # the header-only size (crop clamping) follows the same rule
    assert image_size(str(split / "photo.jpg")) == shown.shape


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


# -- 5. resume from a bad last.pt -----------------------------------------------------------------------------------


TINY = ["model.name=lraspp_mobilenet_v3_large", "data.crop_size=[32,32]", "train.batch_size=2", "data.num_workers=0",
        "train.amp=none", "train.warmup_steps=1", "train.num_vis=0", "data.classes=[a,b,c]"]


def train_args(root: Path, out: Path, *extra) -> list:
    return ["--config", REPO / "configs/default.yaml", *TINY, f"data.root={root}", f"output_dir={out}", *extra]


def test_resume_from_a_corrupt_or_foreign_last_pt_is_one_model_error(data, tmp_path, monkeypatch):
    root, _ = data
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    message = exit_message("train.py", train_args(root, out, "train.resume=auto"), tmp_path, monkeypatch)
    assert message.startswith("model error:") and "last.pt" in message and "delete" in message
    tiny_checkpoint(out / "last.pt", num_classes=5)  # another run's model: 5 classes
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt.update(optimizer={}, scheduler={}, scaler={}, epoch=1, step=2, batches_done=0, best_miou=0.1)
    torch.save(ckpt, out / "last.pt")
    message = exit_message("train.py", train_args(root, out, "train.resume=auto"), tmp_path, monkeypatch)
    assert message.startswith("model error:") and "holds a lraspp_mobilenet_v3_large with 5 classes" in message
    assert "with 3 classes" in message and "output_dir" in message and len(message) < 600


# -- 6. output paths are checked first; a full disk is one line and loses nothing --------------------------------------


def test_outputs_that_are_files_fail_at_once(data, tmp_path, monkeypatch):
    root, ckpt = data
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    message = exit_message("train.py", train_args(root, blocker), tmp_path, monkeypatch)
    assert message.startswith("config error:") and "output_dir" in message and "is a file" in message
    for script, argv in (("infer.py", [root / "valid" / "img000.jpg", "--checkpoint", ckpt]),
                         ("evaluate.py", ["--checkpoint", ckpt, "--data-root", root])):
        message = exit_message(script, [*argv, "--out", blocker], tmp_path, monkeypatch)
        assert "--out" in message and "is a file" in message
    from segpipe.compress.__main__ import main
    with pytest.raises(SystemExit, match="is a file"):
        main(["quantize", "--checkpoint", str(ckpt), "--dtype", "bf16", "--out", str(blocker / "bf16.pth")])
    assert blocker.read_text() == "mine"


def can_mount(folder: Path, options: str) -> bool:
    """Mount a tmpfs with these options on folder; False where this root may not (containers, no mount tool)."""
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write to: permission bits for a normal user; a read-only mount for root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if not can_mount(folder, "ro,size=64k"):
        pytest.skip("root without permission to mount a read-only tmpfs")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_read_only_outputs_fail_at_once(data, tmp_path, monkeypatch, read_only_dir):
    root, ckpt = data
    message = exit_message("infer.py", [root / "valid" / "img000.jpg", "--checkpoint", ckpt, "--out",
                                        read_only_dir / "pred"], tmp_path, monkeypatch)
    assert "--out" in message and "cannot be written" in message
    from segpipe.compress.__main__ import main
    with pytest.raises(SystemExit, match="cannot be written"):
        main(["quantize", "--checkpoint", str(ckpt), "--out", str(read_only_dir / "q.pt2")])


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB file system (tmpfs, needs root), else skip: the in-process ENOSPC test below always runs."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or not can_mount(folder, "size=1m"):
        pytest.skip("a real full disk needs root to mount a small tmpfs")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_keeps_the_previous_checkpoint_and_removes_the_partial_file(tiny_disk):
    from segpipe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    path = tiny_disk / "last.pt"
    save_checkpoint({"format": "segpipe-checkpoint", "v": torch.ones(3)}, path)
    with pytest.raises(CheckpointError, match="no space left on device"):
        save_checkpoint({"format": "segpipe-checkpoint", "v": torch.zeros(1_000_000)}, path)  # 4 MB
    assert torch.equal(load_checkpoint(path)["v"], torch.ones(3))
    assert [p.name for p in tiny_disk.iterdir()] == ["last.pt"]


def test_train_ends_with_no_space_left_on_device(data, tmp_path, monkeypatch, capsys):
    """The last line of train.py names the full disk (faked here: os.fsync raises ENOSPC), no traceback."""
    import errno
    root, _ = data
    out = tmp_path / "run"

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(SystemExit) as info:
        run_in_process("train.py", train_args(root, out, "train.epochs=1"), tmp_path, monkeypatch)
    assert info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no space left on device" in last and "last.pt" in last
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".pt", ".tmp")) == []


def test_a_temp_file_left_by_a_kill_is_removed_at_the_next_save(tmp_path):
    from segpipe.checkpoint import save_checkpoint
    leftover = tmp_path / ".last.pt.1234.abcd.tmp"
    leftover.write_bytes(b"half a checkpoint")
    (tmp_path / ".best.pt.1234.abcd.tmp").write_bytes(b"not this save's")
    save_checkpoint({"format": "segpipe-checkpoint"}, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.pt.1234.abcd.tmp", "last.pt"]


# -- 7. a corrupt mask on the median_freq path ------------------------------------------------------------------------


def test_median_freq_weights_with_a_bad_mask_is_a_data_error(data, tmp_path, monkeypatch):
    root, _ = data
    bad = tmp_path / "bad"
    for split in ("train", "valid"):
        write_pair(bad / split, "a", np.zeros(SIZE, np.int64))
        write_pair(bad / split, "b", np.full(SIZE, 7))  # 7: outside the 3 classes
    message = exit_message("train.py", train_args(bad, tmp_path / "run", "train.class_weights=median_freq"),
                           tmp_path, monkeypatch)
    assert message.startswith("data error:") and "b_mask.png" in message and "[7]" in message


# -- 8. errors inside loader workers ---------------------------------------------------------------------------------


def test_worker_message_keeps_only_the_users_line():
    from segpipe.data import DataError, worker_message
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                        "  File \"x.py\", line 1, in f\nsegpipe.data.DataError: /d/a.jpg: cannot decode the image")
    assert worker_message(wrapped) == "/d/a.jpg: cannot decode the image"
    assert worker_message(DataError("/d/a.jpg: plain")) == "/d/a.jpg: plain"


def broken_data(base: Path) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "valid"):
        for i in range(2):
            write_pair(base / split, f"img{i:03d}", random_mask(rng, *SIZE, 3))
    # A mask: only the loader workers read it (images are opened at start-up to size the crops).
    (base / "train" / "img001_mask.png").write_bytes(b"broken")
    return base


def test_a_worker_error_in_train_is_the_last_line_without_the_worker_traceback(tmp_path):
    root = broken_data(tmp_path / "data")
    result = run("train.py", *train_args(root, tmp_path / "run", "data.num_workers=1", "train.epochs=1"),
                 cwd=tmp_path)
    assert_one_line_error(result, "data error on rank 0:", "img001_mask.png: cannot decode the mask")
    assert "Caught DataError" not in result.stderr and "Original Traceback" not in result.stderr


def test_under_torchrun_the_failing_ranks_line_ends_the_output_once(tmp_path, free_port):
    root = broken_data(tmp_path / "data")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port}"]
    result = subprocess.run([sys.executable, *launcher, str(REPO / "train.py"),
                             *map(str, train_args(root, tmp_path / "run", "data.num_workers=1", "train.epochs=1",
                                                  "train.batch_size=1"))],
                            cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    lines = [line.strip() for line in output.splitlines() if line.strip() and set(line.strip()) != {"="}]
    # torchrun's failure summary ends with the root cause: our line, not "To enable traceback see ...".
    assert "img001_mask.png: cannot decode the mask" in lines[-1] and "data error on rank" in lines[-1]
    printed = [line for line in lines[:-1] if "img001_mask.png: cannot decode" in line]
    assert len(printed) == 1 and printed[0].startswith("data error on rank")  # once, by the failing rank
    assert "Caught DataError" not in output


# -- 12. compress: option values, int8 artefacts where a checkpoint is expected, file permissions ------------------------


@pytest.mark.parametrize("argv, words", [
    (["prune", "--sparsity", "1.5", "--out", "p.pth"], "--sparsity 1.5"),
    (["prune", "--sparsity", "-0.1", "--out", "p.pth"], "--sparsity -0.1"),
    (["quantize", "--calib-images", "0", "--out", "q.pt2"], "--calib-images 0"),
])
def test_compress_option_errors_are_one_line(data, tmp_path, argv, words):
    from segpipe.compress.__main__ import main
    with pytest.raises(SystemExit) as info:
        main([*argv[:1], "--checkpoint", str(data[1]), *argv[1:]])
    assert words in str(info.value.code) and "\n" not in str(info.value.code)


def test_an_int8_artefact_where_a_checkpoint_belongs_is_named_as_such(data, tmp_path):
    from segpipe.compress.__main__ import main
    artefact = crafted_pt2(tmp_path / "int8.pt2", tmp_path / "marker", "none")  # a genuine torch.export archive
    renamed = tmp_path / "int8.pt"
    renamed.write_bytes(artefact.read_bytes())
    for path, words in ((artefact, "is an int8 artefact"), (renamed, "renamed to .pt")):
        with pytest.raises(SystemExit) as info:
            main(["prune", "--checkpoint", str(path), "--out", str(tmp_path / "p.pth")])
        assert words in info.value.code and "corrupt" not in info.value.code and "damaged" not in info.value.code


def test_checkpoints_get_the_permissions_of_other_outputs(tmp_path):
    from segpipe.checkpoint import save_checkpoint
    old = os.umask(0o022)
    try:
        save_checkpoint({"format": "segpipe-checkpoint"}, tmp_path / "last.pt")
        (tmp_path / "config.yaml").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o644
