"""python -m segpipe.discover and train.py's discovery: encodings, void, rare labels, noise, configs that train."""
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO, random_mask, run_env
from segpipe.config import load_config
from segpipe.data import DataError, MaskDecoder, SegmentationDataset, load_index
from segpipe.discover import MAX_CLASSES, detect

COLOURS = [[128, 64, 128], [70, 130, 180], [0, 0, 142]]
VOID = [0, 0, 0]
TRAIN_FAST = ["model.name=lraspp_mobilenet_v3_large", "data.crop_size=[32,32]", "data.train_size=null",
              "data.eval_size=null", "train.batch_size=2", "data.num_workers=0", "train.max_steps=2",
              "train.warmup_steps=1", "train.log_every=1", "train.num_vis=0"]


def write_set(root, encode, n_train=6, n_valid=2, size=(40, 56), seed=0):
    """ROOT/{train,valid} with JPEG images and masks made by encode(labels) -> PIL image; labels 0..2, 3 = void."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("valid", n_valid)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            labels = random_mask(rng, *size, 4)  # 4: the void label, in every mask like real void
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / split / f"img{i:03d}.jpg")
            encode(labels).save(root / split / f"img{i:03d}_mask.png")
    return root


def rgb(labels):
    return Image.fromarray(np.asarray(COLOURS + [VOID], dtype=np.uint8)[labels])


def index_i16(labels):
    return Image.fromarray(np.where(labels == 3, 255, labels).astype(np.uint16))


def index_p(labels):
    img = Image.fromarray(np.where(labels == 3, 255, labels).astype(np.uint8), mode="P")
    img.putpalette([v for c in COLOURS for v in c] + [0] * (256 - len(COLOURS)) * 3)
    return img


def discover(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "segpipe.discover", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=run_env(), cwd=cwd)


def train(config, out, *extra):
    return subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(config), f"output_dir={out}",
                           *TRAIN_FAST, *extra], capture_output=True, text=True, timeout=300, env=run_env(), cwd=REPO)


def test_rgb_masks_give_the_palette_void_flagged_and_a_config_that_trains(tmp_path):
    root = write_set(tmp_path / "rgb", rgb)
    result = discover(root)  # no flags: the encoding is detected
    assert result.returncode == 0, result.stderr
    config_file = tmp_path / "mine.yaml"
    config_file.write_text(result.stdout)
    cfg = load_config(config_file)
    assert cfg.data.mask_format == "rgb"
    assert sorted(cfg.data.palette) == sorted(COLOURS) and cfg.data.palette_ignore == [VOID]
    assert len(cfg.data.classes) == 3 and "void (not a class): (0, 0, 0), black" in result.stdout
    assert cfg.model.name == "lraspp_mobilenet_v3_large"  # no GPU here: the CPU recipe
    decoder = MaskDecoder(3, cfg.data.ignore_index, "rgb", cfg.data.palette, cfg.data.palette_ignore)
    _, mask = SegmentationDataset(load_index(str(root), "train"), decoder)[0]
    original = np.asarray(Image.open(root / "train" / "img000_mask.png"))
    void = (original == VOID).all(-1)
    assert (mask.numpy()[void] == cfg.data.ignore_index).all()
    painted = np.asarray(cfg.data.palette, dtype=np.uint8)[mask.numpy()[~void]]
    assert np.array_equal(painted, original[~void])
    run = train(config_file, tmp_path / "run")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run" / "last.pt").is_file()


@pytest.mark.parametrize("encode", [index_i16, index_p], ids=["I;16", "P"])
def test_index_masks_16_bit_and_palette_mode_are_classes_with_255_void(tmp_path, encode):
    root = write_set(tmp_path / "idx", encode)
    result = discover(root)
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["data"]["mask_format"] == "index" and cfg["data"]["classes"] == ["class_0", "class_1", "class_2"]
    assert cfg["data"]["ignore_index"] == 255 and "void (not a class): 255" in result.stdout
    config_file = tmp_path / "idx.yaml"
    config_file.write_text(result.stdout)
    run = train(config_file, tmp_path / "run")
    assert run.returncode == 0, run.stderr


def test_noise_images_stop_with_a_clear_message(tmp_path):
    rng = np.random.default_rng(0)
    noise_rgb = lambda labels: Image.fromarray(rng.integers(0, 256, (*labels.shape, 3), dtype=np.uint8))  # noqa: E731
    noise_l = lambda labels: Image.fromarray(rng.integers(0, 256, labels.shape, dtype=np.uint8))  # noqa: E731
    for name, encode, message in (("rgb", noise_rgb, "not class maps"), ("l", noise_l, "not class maps")):
        result = discover(write_set(tmp_path / name, encode, n_valid=1))
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("data error:") and message in lines[0], result.stderr


def test_one_stray_value_is_reported_rare_not_named_a_class(tmp_path):
    root = write_set(tmp_path / "stray", index_i16, n_train=24)
    labels = np.asarray(Image.open(root / "train" / "img005_mask.png")).copy()
    labels[0, 0] = 300
    Image.fromarray(labels.astype(np.uint16)).save(root / "train" / "img005_mask.png")
    found = detect(load_index(str(root), "train"))
    assert found.num_classes == 3 and [r[0] for r in found.rare] == [300]
    block = found.data_block(str(root))
    assert block["label_map"][300] == 255 and block["label_map"][2] == 2
    result = discover(root)
    assert result.returncode == 0, result.stderr
    assert "rare labels, mapped to void rather than named as classes: 300 (1 px in 1 mask)" in result.stdout
    assert len(yaml.safe_load(result.stdout)["data"]["classes"]) == 3


def test_too_many_label_ids_stop(tmp_path):
    ids = lambda labels: Image.fromarray((labels * 40).astype(np.uint16))  # noqa: E731 - 0..120
    with pytest.raises(DataError, match=f"would make 121 classes \\(more than {MAX_CLASSES}\\)"):
        detect(load_index(str(write_set(tmp_path / "ids", ids)), "train"))


def test_mixed_encodings_name_both_files(tmp_path):
    root = write_set(tmp_path / "mixed", index_p)
    rgb(np.zeros((40, 56), dtype=np.int64)).save(root / "train" / "img004_mask.png")
    result = discover(root)
    assert result.returncode == 1
    assert "masks mix encodings" in result.stderr and "img004_mask.png" in result.stderr
    assert "img000_mask.png" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_corrupt_mask_is_a_data_error_in_discover_and_train(tmp_path):
    root = write_set(tmp_path / "bad", index_p)
    (root / "train" / "img002_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    result = discover(root)
    assert result.returncode == 1
    assert result.stderr.startswith("data error:") and "img002_mask.png: cannot decode the mask" in result.stderr
    run = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/default.yaml"),
                          f"data.root={root}", f"output_dir={tmp_path / 'run'}", *TRAIN_FAST],
                         capture_output=True, text=True, timeout=120, env=run_env(), cwd=REPO)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("data error:") and "img002_mask.png" in run.stderr


def test_out_writes_a_complete_config_once_and_prints_the_next_commands(tmp_path):
    root = write_set(tmp_path / "rgb", rgb)
    out = tmp_path / "mine.yaml"
    result = discover(root, "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"python train.py --config {out}" in result.stdout and "python evaluate.py runs/" in result.stdout
    cfg = load_config(out)
    assert cfg.train.epochs >= 2 and cfg.data.crop_size == cfg.data.train_size and cfg.output_dir.startswith("runs/")
    out.write_text("mine: edited\n")
    again = discover(root, "--out", out)
    assert again.returncode == 1 and "--force" in again.stderr and out.read_text() == "mine: edited\n"
    assert discover(root, "--out", out, "--force").returncode == 0 and load_config(out).data.mask_format == "rgb"


def test_train_without_classes_detects_and_warns_in_two_lines(tmp_path):
    root = write_set(tmp_path / "rgb", rgb)
    run = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/default.yaml"),
                          f"data.root={root}", f"output_dir={tmp_path / 'run'}", *TRAIN_FAST],
                         capture_output=True, text=True, timeout=300, env=run_env(), cwd=REPO)
    assert run.returncode == 0, run.stderr
    warning = [line for line in run.stdout.splitlines() if "data.classes is not set" in line]
    assert len(warning) == 1 and "colour-coded (RGB) masks, 3 classes" in warning[0] and "void (0, 0, 0)" in warning[0]
    assert "class_0..class_2" in warning[0]
    # the end of training: a summary with what to run next, the resolved config saved (not printed), finished
    assert "done: best validation mIoU" in run.stdout and "next: python evaluate.py" in run.stdout
    assert f"config (resolved): {tmp_path / 'run' / 'config.yaml'}" in run.stdout
    assert "lr_reference_batch" not in run.stdout and (tmp_path / "run" / "finished.json").is_file()
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.data.mask_format == "rgb" and saved.data.palette_ignore == [VOID] and len(saved.data.classes) == 3


def test_crops_larger_than_the_images_are_clamped_with_a_note(tmp_path):
    from segpipe.discover import clamp_crop
    root = write_set(tmp_path / "rgb", rgb, n_train=3)
    data = load_config(None, [f"data.root={root}", "data.crop_size=[512,512]"]).data
    note = clamp_crop(data, load_index(str(root), "train"))
    assert data.crop_size == [40, 56] and "data.crop_size [512, 512] is larger than the 40x56" in note
    data = load_config(None, ["data.crop_size=[32,512]", "data.train_size=[36,100]"]).data
    assert clamp_crop(data, load_index(str(root), "train")) and data.crop_size == [32, 100]
    assert clamp_crop(data, load_index(str(root), "train")) == ""  # nothing left to clamp: no note


def test_the_run_is_named_after_the_data_folder_or_the_folder_holding_the_shards(tmp_path):
    from segpipe.discover import data_set_name
    (tmp_path / "camvid").mkdir()
    assert data_set_name(str(tmp_path / "camvid")) == "camvid"
    assert data_set_name(str(tmp_path / "camvid_shards" / "shards.json")) == "camvid_shards"  # not shards.json
    assert data_set_name("https://host/data/camvid/shards.json") == "camvid"
    assert data_set_name("s3://bucket/camvid/shards.json") == "camvid"
