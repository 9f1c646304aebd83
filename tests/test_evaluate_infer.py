"""evaluate.py and infer.py end to end: exact-once multi-process scoring, masks that score what evaluate.py
reports, and bad inputs answered with a message (no traceback)."""
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, random_mask, run_env, write_pair
from test_predict import tiny_checkpoint

NUM_IMAGES = 7  # odd: two processes get shards of 4 and 3
SIZE = (40, 56)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Seven labelled 40x56 images (3 classes + ignore pixels), and a 4-class checkpoint that never predicts
    class_3, so one class is absent from truth and prediction."""
    root = tmp_path_factory.mktemp("eval") / "data"
    rng = np.random.default_rng(0)
    images = []
    for i in range(NUM_IMAGES):
        mask = random_mask(rng, *SIZE, 3)
        mask[: 8 * (i % 3), :8] = 255  # ignore pixels
        write_pair(root / "valid", f"img{i:03d}", mask)
        images.append(np.asarray(Image.open(root / "valid" / f"img{i:03d}.jpg")))
    ckpt = tiny_checkpoint(root.parent / "run" / "best.pt", num_classes=4, images=images, never=3,
                           data_root=root)
    return root, ckpt


def run_script(script: str, argv: list[str], cwd: Path, monkeypatch) -> None:
    """Run an entry script's main(argv) in this process, from cwd, as `python script argv...` would."""
    monkeypatch.chdir(cwd)
    code = importlib.import_module(Path(script).stem).main(argv)
    if code:
        raise SystemExit(code)


def fails_with(script: str, argv: list[str], cwd: Path, monkeypatch) -> str:
    """The message the script exits with; an exception instead of sys.exit(message) fails the test."""
    with pytest.raises(SystemExit) as info:
        run_script(script, argv, cwd, monkeypatch)
    assert isinstance(info.value.code, str), f"expected an exit message, got exit code {info.value.code!r}"
    return info.value.code


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory):
    """evaluate.py in one process (a subprocess, with the same one-thread setting as the torchrun workers)."""
    root, ckpt = setup
    out = tmp_path_factory.mktemp("eval1")
    result = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(ckpt), "--data-root", str(root),
                             "--out", str(out), "--workers", "0", "--batch-size", "2", "--failures", "3"],
                            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "metrics.json").read_text()), result.stdout, out


def test_evaluate_reports_table_json_and_pictures(one_process):
    metrics, stdout, out = one_process
    assert metrics["num_images"] == NUM_IMAGES and len(metrics["per_image_miou"]) == NUM_IMAGES
    for key in ("miou", "mdice", "mfscore", "pixel_accuracy", "mean_accuracy", "fw_iou"):
        assert 0 < metrics[key] <= 1, key
    assert metrics["per_class_dice"]["class_3"] is None and "Dice/F1" in stdout and "mDice" in stdout
    dice = [v for v in metrics["per_class_dice"].values() if v is not None]
    assert metrics["mdice"] == pytest.approx(np.mean(dice)) and metrics["mdice"] >= metrics["miou"]
    assert metrics["per_class_iou"]["class_3"] is None and metrics["absent_classes"] == ["class_3"]
    present = [v for v in metrics["per_class_iou"].values() if v is not None]
    assert metrics["miou"] == pytest.approx(np.mean(present))  # the absent class is left out of the mean
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (4, 4) and matrix.sum() == metrics["num_pixels"]
    assert "class_3" in stdout and "absent" in stdout and "mIoU" in stdout and "images/s" in stdout
    assert Image.open(out / "confusion_matrix.png").size[0] > 0
    gallery = sorted((out / "failures").glob("*.png"))
    worst = sorted(metrics["per_image_miou"], key=metrics["per_image_miou"].get)[:3]
    assert [p.stem[3:] for p in gallery] == worst  # 01_NAME.png, lowest per-image mIoU first


@pytest.fixture(scope="module")
def shard_set(setup, tmp_path_factory) -> Path:
    """The valid folder of setup packed into several tar shards: their shards.json."""
    from segpipe.shards import write_shards
    root, _ = setup
    data = tmp_path_factory.mktemp("shards") / "data"
    shutil.copytree(root / "valid", data / "valid")
    descriptor = write_shards(str(data), str(data.parent / "shards"), 2000, splits=("valid",),
                              log=lambda *a: None)  # about 2 kB per shard: several shards
    assert len(list(descriptor.parent.glob("valid-*.tar"))) > 2
    return descriptor


def test_evaluate_on_shards_scores_what_the_folder_scores(setup, shard_set, one_process, tmp_path, monkeypatch,
                                                          capsys):
    root, ckpt = setup
    run_script("evaluate.py", ["--checkpoint", str(ckpt), "--data-root", str(shard_set), "--out",
                               str(tmp_path / "eval"), "--workers", "0", "--batch-size", "2", "--failures", "1"],
               tmp_path, monkeypatch)
    shards = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    folder = one_process[0]
    assert shards["num_images"] == NUM_IMAGES and shards["confusion_matrix"] == folder["confusion_matrix"]
    assert shards["per_image_miou"] == folder["per_image_miou"]


def torchrun(port: int, script: str, *args) -> subprocess.CompletedProcess:
    """script under torchrun with two processes on 127.0.0.1, as a user launches it."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={port}", script, *map(str, args)],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("source, workers", [("folder", 0), ("shards", 1)])
def test_two_processes_score_every_image_exactly_once(setup, shard_set, one_process, tmp_path, free_port, source,
                                                      workers):
    # One process scores the same on the folder and on the shards (test above); two processes, on shards each with
    # a loader worker reading its own block of shards, must score the same: each image once.
    root, ckpt = setup
    result = torchrun(free_port, "evaluate.py", "--checkpoint", ckpt, "--data-root",
                      root if source == "folder" else shard_set, "--out", tmp_path, "--workers", workers,
                      "--batch-size", 2, "--failures", 0)
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = json.loads((tmp_path / "metrics.json").read_text()), one_process[0]
    assert two["world_size"] == 2 and two["num_images"] == NUM_IMAGES
    assert two["confusion_matrix"] == one["confusion_matrix"]  # no image dropped or counted twice
    assert two["per_image_miou"] == one["per_image_miou"] and two["miou"] == one["miou"]


def test_infer_on_shards_under_torchrun_writes_what_infer_on_the_folder_writes(setup, shard_set, tmp_path, free_port,
                                                                               monkeypatch, capsys):
    root, ckpt = setup
    run_script("infer.py", [str(root / "valid"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "folder"),
                            "--workers", "0"], tmp_path, monkeypatch)
    result = torchrun(free_port, "infer.py", shard_set, "--split", "valid", "--checkpoint", ckpt, "--out",
                      tmp_path / "shards", "--workers", 1, "--batch-size", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {NUM_IMAGES} mask(s)" in result.stdout  # summed over both processes: none predicted twice
    assert "valid-000000.tar: img000.jpg" in result.stdout  # per-image lines name the shard and member
    names = sorted(p.name for p in (tmp_path / "folder").iterdir())
    assert len(names) == 2 * NUM_IMAGES and sorted(p.name for p in (tmp_path / "shards").iterdir()) == names
    for name in names:
        if name.endswith("_mask.png"):
            folder, shards = Image.open(tmp_path / "folder" / name), Image.open(tmp_path / "shards" / name)
            assert np.array_equal(np.asarray(folder), np.asarray(shards)), name
    capsys.readouterr()
    run_script("infer.py", [str(shard_set), "--checkpoint", str(ckpt), "--out", str(tmp_path / "shards")],
               tmp_path, monkeypatch)  # a rerun after a stop: nothing left to do
    assert f"{NUM_IMAGES} already predicted, skipped" in capsys.readouterr().out


def test_infer_keeps_shard_keys_of_other_tools_inside_out(setup, tmp_path, monkeypatch, capsys):
    import io
    import tarfile
    from segpipe.shards import index_shards
    root, ckpt = setup
    folder = tmp_path / "other"
    folder.mkdir()
    members = {"city/a.jpg": (root / "valid" / "img000.jpg").read_bytes(),
               "city/a.mask.png": (root / "valid" / "img000_mask.png").read_bytes(),
               "../../evil.jpg": (root / "valid" / "img001.jpg").read_bytes(),
               "../../evil.mask.png": (root / "valid" / "img001_mask.png").read_bytes()}
    with tarfile.open(folder / "valid-000000.tar", "w") as tar:  # keys with directories, as webdataset tools write
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    descriptor = index_shards(str(folder), log=lambda *a: None)
    (tmp_path / "work").mkdir()
    before = sorted(tmp_path.rglob("*"))
    run_script("infer.py", [str(descriptor), "--checkpoint", str(ckpt), "--out", "pred"], tmp_path / "work",
               monkeypatch)
    written = sorted(p.name for p in (tmp_path / "work" / "pred").iterdir())
    assert written == [".._.._evil_mask.png", ".._.._evil_overlay.jpg", "city_a_mask.png", "city_a_overlay.jpg"]
    assert sorted(set(tmp_path.rglob("*")) - set(before)) == sorted(
        [tmp_path / "work" / "pred", *(tmp_path / "work" / "pred" / name for name in written)])
    message = fails_with("infer.py", [str(descriptor), "--split", "test", "--checkpoint", str(ckpt)], tmp_path,
                         monkeypatch)
    assert "has no 'test' split (it has: valid)" in message and "\n" not in message
    message = fails_with("infer.py", [str(descriptor), str(root / "valid"), "--checkpoint", str(ckpt)], tmp_path,
                         monkeypatch)
    assert "shards.json is a shard descriptor: give it as the only input" in message


def test_infer_on_two_processes_predicts_every_input_once_as_one_process_does(setup, tmp_path, free_port,
                                                                             monkeypatch, capsys):
    root, ckpt = setup
    run_script("infer.py", [str(root / "valid"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "one"),
                            "--workers", "0"], tmp_path, monkeypatch)
    result = torchrun(free_port, "infer.py", root / "valid", "--checkpoint", ckpt, "--out", tmp_path / "two",
                      "--workers", 1, "--batch-size", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    # The count is summed over both processes: an input predicted twice would count twice. (The per-image lines
    # of two processes share one pipe and may interleave, so they are not counted.)
    assert f"wrote {NUM_IMAGES} mask(s)" in result.stdout and "2 processes" in result.stdout
    assert len(list((tmp_path / "two").glob("*_mask.png"))) == NUM_IMAGES
    for name in sorted(p.name for p in (tmp_path / "one").iterdir()):
        one, two = Image.open(tmp_path / "one" / name), Image.open(tmp_path / "two" / name)
        if name.endswith("_mask.png"):
            assert np.array_equal(np.asarray(one), np.asarray(two)), name


def test_infer_masks_score_what_evaluate_reports(setup, one_process, tmp_path, monkeypatch, capsys):
    root, ckpt = setup
    run_script("infer.py", [str(root / "valid"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "pred")],
               tmp_path, monkeypatch)
    stdout = capsys.readouterr().out
    matrix = np.zeros((4, 4), dtype=np.int64)
    for i in range(NUM_IMAGES):
        mask = Image.open(tmp_path / "pred" / f"img{i:03d}_mask.png")
        assert mask.mode == "P" and mask.size == (SIZE[1], SIZE[0])
        assert mask.getpalette()[:12] == [c for rgb in _default_or_stored_palette(ckpt) for c in rgb][:12]
        overlay = Image.open(tmp_path / "pred" / f"img{i:03d}_overlay.jpg")
        assert overlay.format == "JPEG" and overlay.size[1] >= SIZE[0]
        pred = np.asarray(mask).astype(np.int64)
        truth = np.asarray(Image.open(root / "valid" / f"img{i:03d}_mask.png")).astype(np.int64)
        keep = truth != 255
        np.add.at(matrix, (truth[keep], pred[keep]), 1)
        assert f"img{i:03d}.jpg" in stdout
    assert not (root / "valid" / "img000_mask_mask.png").exists()  # masks in the folder were not predicted
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    miou = np.mean(tp[union > 0] / union[union > 0])
    assert miou == pytest.approx(one_process[0]["miou"], abs=1e-12)
    assert len(np.unique(np.nonzero(matrix)[1])) > 1  # predictions vary: the equality is not trivial


def _default_or_stored_palette(ckpt: Path) -> list:
    from segpipe.visualize import default_palette
    return torch.load(ckpt, weights_only=True)["palette"] or default_palette(4)


def test_infer_reports_unreadable_files_and_goes_on(setup, tmp_path, monkeypatch, capsys):
    root, ckpt = setup
    (tmp_path / "notes.jpg").write_text("not an image")
    bomb = tmp_path / "huge.png"
    Image.new("1", (14000, 14000)).save(bomb)  # 196 Mpixel: over twice Pillow's decompression-bomb limit
    good = root / "valid" / "img001.jpg"
    message = fails_with("infer.py", [str(tmp_path / "notes.jpg"), str(good), str(bomb), "nothing*.jpg",
                                      "--checkpoint", str(ckpt), "--out", "pred"], tmp_path, monkeypatch)
    assert "3 input(s) could not be processed" in message
    assert "notes.jpg: cannot decode the image" in message
    assert "huge.png" in message and "MAX_IMAGE_PIXELS" in message
    assert "nothing*.jpg: no such file" in message
    assert (tmp_path / "pred" / "img001_mask.png").is_file()  # the good image was still processed
    assert "img001.jpg" in capsys.readouterr().out


def test_without_checkpoint_infer_and_evaluate_use_the_newest_finished_run(setup, tmp_path, monkeypatch, capsys):
    from segpipe.checkpoint import mark_finished
    root, ckpt = setup
    message = fails_with("infer.py", [str(root / "valid" / "img000.jpg")], tmp_path, monkeypatch)
    assert "no finished run in runs/" in message and "train.py" in message and "--checkpoint" in message
    (tmp_path / "runs" / "exp").mkdir(parents=True)
    shutil.copy(ckpt, tmp_path / "runs" / "exp" / "best.pt")
    message = fails_with("infer.py", [str(root / "valid" / "img000.jpg")], tmp_path, monkeypatch)
    assert "still training or was stopped" in message and "--checkpoint runs/exp/best.pt" in message
    mark_finished(tmp_path / "runs" / "exp", ["a", "b", "c", "d"], 0.5)
    run_script("infer.py", [str(root / "valid" / "img000.jpg")], tmp_path, monkeypatch)
    assert f"using {Path('runs/exp/best.pt')}" in capsys.readouterr().out
    assert (tmp_path / "predictions" / "img000_mask.png").is_file()
    run_script("evaluate.py", ["--data-root", str(root), "--workers", "0"], tmp_path, monkeypatch)
    assert f"using {Path('runs/exp/best.pt')}, from the newest finished run" in capsys.readouterr().out


def test_evaluate_takes_the_checkpoint_as_first_argument(setup, tmp_path, monkeypatch, capsys):
    root, ckpt = setup
    run_script("evaluate.py", [str(ckpt), "--data-root", str(root), "--workers", "0", "--out", str(tmp_path / "e")],
               tmp_path, monkeypatch)
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["checkpoint"] == str(ckpt)
    message = fails_with("evaluate.py", [str(ckpt), "--checkpoint", str(tmp_path / "other.pt")], tmp_path, monkeypatch)
    assert "twice" in message


class Exploit:
    """Unpickling this would create a marker file: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_that_would_run_code_is_refused(setup, tmp_path, monkeypatch):
    root, _ = setup
    marker = tmp_path / "pwned"
    torch.save({"format": "segpipe-checkpoint", "model": {}, "payload": Exploit(marker)}, tmp_path / "evil.pt")
    for script, argv in (("infer.py", [str(root / "valid" / "img000.jpg")]),
                         ("evaluate.py", ["--data-root", str(root)])):
        message = fails_with(script, argv + ["--checkpoint", str(tmp_path / "evil.pt")], tmp_path, monkeypatch)
        assert "evil.pt cannot be loaded safely" in message and "could run code" in message
    assert not marker.exists()


def test_missing_and_mismatched_checkpoints(setup, tmp_path, monkeypatch):
    root, _ = setup
    message = fails_with("evaluate.py", ["--checkpoint", "nope.pt", "--data-root", str(root)], tmp_path, monkeypatch)
    assert "nope.pt does not exist" in message and "train.py" in message
    other = tiny_checkpoint(tmp_path / "five.pt", num_classes=5)
    ckpt = torch.load(other, weights_only=True)
    ckpt["num_classes"], ckpt["classes"] = 4, ["a", "b", "c", "d"]
    torch.save(ckpt, other)
    message = fails_with("evaluate.py", ["--checkpoint", str(other), "--data-root", str(root)], tmp_path, monkeypatch)
    assert "five.pt: its weights do not fit lraspp_mobilenet_v3_large with 4 classes" in message


def test_masks_beyond_the_checkpoint_classes_name_the_file(setup, tmp_path, monkeypatch):
    root, ckpt = setup
    write_pair(tmp_path / "data" / "valid", "a", np.zeros(SIZE, dtype=np.int64))
    write_pair(tmp_path / "data" / "valid", "b", np.full(SIZE, 6))
    message = fails_with("evaluate.py", ["--checkpoint", str(ckpt), "--data-root", str(tmp_path / "data"),
                                         "--workers", "1"], tmp_path, monkeypatch)
    assert f"{tmp_path / 'data' / 'valid' / 'b_mask.png'}: mask values [6] are outside the 4 classes" in message
    assert "Traceback" not in message and "is " in message and "the data set it was trained on" in message


def test_data_root_without_masks(setup, tmp_path, monkeypatch):
    _, ckpt = setup
    (tmp_path / "data" / "valid").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "valid" / "x.jpg")
    message = fails_with("evaluate.py", ["--checkpoint", str(ckpt), "--data-root", str(tmp_path / "data")],
                         tmp_path, monkeypatch)
    assert str(tmp_path / "data" / "valid") in message and "no _mask.png mask" in message
    assert "infer.py" in message
