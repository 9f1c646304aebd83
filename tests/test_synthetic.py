"""Tests of the synthetic street-scene generator and its on-disk data set."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from segpipe import synthetic
from segpipe.synthetic import CLASSES, MARKER, PALETTE, ensure_dataset, make_scene, write_dataset

SIZE = (64, 80)
SMALL = dict(n_train=4, n_valid=2, size=SIZE, seed=3)


def _scenes(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    return [tuple(np.asarray(x) for x in make_scene(np.random.default_rng([seed, i]), *SIZE)) for i in range(n)]


def test_palette_has_one_colour_per_class():
    assert len(PALETTE) == len(CLASSES) and len(set(PALETTE)) == len(PALETTE)


def test_same_seed_gives_same_scene():
    for (image_a, mask_a), (image_b, mask_b) in zip(_scenes(3), _scenes(3)):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(mask_a, mask_b)


def test_other_seed_gives_other_scene():
    assert not np.array_equal(_scenes(1, seed=0)[0][0], _scenes(1, seed=1)[0][0])


def test_modes_and_sizes():
    image, mask = make_scene(np.random.default_rng(0), *SIZE)
    assert image.mode == "RGB" and mask.mode == "L"
    assert image.size == mask.size == (SIZE[1], SIZE[0])


def test_masks_hold_only_class_ids():
    for _, mask in _scenes(10):
        assert mask.max() < len(CLASSES)


def test_every_class_appears_in_a_small_set():
    seen = set()
    for _, mask in _scenes(20):
        seen.update(np.unique(mask).tolist())
    assert seen == set(range(len(CLASSES)))


def test_colours_follow_the_mask():
    sky, road, veg = [], [], []
    for image, mask in _scenes(10):
        sky.append(image[mask == synthetic.SKY].mean(0))
        road.append(image[mask == synthetic.ROAD].mean(0))
        if (mask == synthetic.VEGETATION).any():
            veg.append(image[mask == synthetic.VEGETATION].mean(0))
    sky, road, veg = np.mean(sky, 0), np.mean(road, 0), np.mean(veg, 0)
    assert sky[2] > road[2] + 40, (sky, road)  # the sky is bluer and brighter than asphalt
    assert veg[1] > veg[0] and veg[1] > veg[2], veg  # foliage is green


def test_write_dataset_layout(tmp_path):
    root = write_dataset(tmp_path / "synth", **SMALL)
    for split, n in (("train", 4), ("valid", 2)):
        images = sorted((root / split).glob("*.jpg"))
        assert len(images) == n
        for path in images:
            mask = Image.open(path.with_name(path.stem + "_mask.png"))
            assert mask.mode == "L" and mask.size == Image.open(path).size == (SIZE[1], SIZE[0])
    assert json.loads((root / MARKER).read_text())["classes"] == CLASSES
    assert [p.name for p in tmp_path.iterdir()] == ["synth"]  # no temporary folder left behind


def test_ensure_dataset_keeps_a_complete_set(tmp_path):
    root = ensure_dataset(tmp_path / "synth", **SMALL)
    marker = root / MARKER
    os.utime(marker, (1, 1))
    ensure_dataset(root, **SMALL)
    assert marker.stat().st_mtime == 1


def test_ensure_dataset_redoes_a_set_with_missing_files(tmp_path):
    root = ensure_dataset(tmp_path / "synth", **SMALL)
    (root / "train" / "train_0001.jpg").unlink()
    ensure_dataset(root, **SMALL)
    assert (root / "train" / "train_0001.jpg").exists()


def test_ensure_dataset_redoes_a_set_made_with_other_arguments(tmp_path):
    root = ensure_dataset(tmp_path / "synth", **SMALL)
    ensure_dataset(root, **{**SMALL, "n_train": 5})
    assert len(list((root / "train").glob("*.jpg"))) == 5


def test_interrupted_write_leaves_no_root_and_is_redone(tmp_path, monkeypatch):
    calls = []

    def dies_on_third(rng, height, width):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return make_scene(rng, height, width)

    monkeypatch.setattr(synthetic, "make_scene", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        ensure_dataset(tmp_path / "synth", **SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    root = ensure_dataset(tmp_path / "synth", **SMALL)
    assert (root / MARKER).exists()


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    real = tmp_path / "cityscapes"
    (real / "train").mkdir(parents=True)
    (real / "train" / "a.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="no .complete marker"):
        ensure_dataset(real, **SMALL)
    assert (real / "train" / "a.jpg").read_bytes() == b"not ours"


def test_cli_writes_a_set(tmp_path, capsys):
    synthetic.main(["--root", str(tmp_path / "cli"), "--train", "2", "--valid", "1", "--size", "32", "48"])
    assert len(list((tmp_path / "cli" / "valid").glob("*_mask.png"))) == 1
    assert "wrote 2 train + 1 valid" in capsys.readouterr().out
