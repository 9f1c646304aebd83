import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import segpipe.data as data_mod
from conftest import CAMVID, REPO, needs_camvid, random_mask, run_env, write_pair
from segpipe.data import DataError, MaskDecoder, SegmentationDataset, load_index


def dataset(root, split="train", num_classes=3, ignore=255, **kw):
    return SegmentationDataset(load_index(str(root), split), MaskDecoder(num_classes, ignore, **kw))


def test_index_pairs_names_and_ignores_other_files(make_dataset):
    root = make_dataset(n_train=3)
    (root / "train" / "notes.txt").write_text("not an image")
    (root / "train" / ".DS_Store").write_bytes(b"\0")
    index = load_index(str(root), "train")
    assert [n.decode() for n in index.names] == ["img000", "img001", "img002"]
    assert index.names.dtype.kind == "S"  # one numpy buffer, not a list of Python str
    img, mask = index.paths(1)
    assert img.endswith("train/img001.jpg") and mask.endswith("train/img001_mask.png")


def test_index_is_cached_and_not_rescanned(make_dataset, monkeypatch):
    root = make_dataset(n_train=2)
    load_index(str(root), "train")
    assert (root / ".segpipe-index-train.npz").is_file()
    monkeypatch.setattr(data_mod, "_scan", lambda *a: pytest.fail("rescanned an unchanged folder"))
    assert len(load_index(str(root), "train")) == 2


def test_changed_folder_is_detected(make_dataset):
    root = make_dataset(n_train=2)
    assert len(load_index(str(root), "train")) == 2
    time.sleep(0.01)
    write_pair(root / "train", "extra", np.zeros((40, 56), dtype=np.int64))
    assert len(load_index(str(root), "train")) == 3


def test_read_only_root_caches_elsewhere(make_dataset, tmp_path, monkeypatch):
    root = make_dataset(n_train=2)
    monkeypatch.setattr(os, "access", lambda *a: False)
    monkeypatch.setenv("SEGPIPE_CACHE", str(tmp_path / "cache"))
    load_index(str(root), "train")
    assert len(list((tmp_path / "cache").glob("index-train-*.npz"))) == 1


def test_missing_masks_are_listed(make_dataset):
    root = make_dataset(n_train=3)
    for i in (0, 2):
        (root / "train" / f"img00{i}_mask.png").unlink()
    with pytest.raises(DataError, match=r"2 image\(s\) have no _mask.png mask, e\.g\. img000\.jpg, img002\.jpg.*"
                                        r"data\.skip_unpaired=true"):
        load_index(str(root), "train")


def test_missing_masks_can_be_skipped_with_a_warning(make_dataset):
    root = make_dataset(n_train=3)
    (root / "train" / "img001_mask.png").unlink()
    with pytest.warns(UserWarning, match="skipping"):
        index = load_index(str(root), "train", skip_unpaired=True)
    assert [n.decode() for n in index.names] == ["img000", "img002"]


def test_empty_and_missing_split(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="holds no image with a mask"):
        load_index(str(tmp_path), "train")
    with pytest.raises(DataError, match=r"valid does not exist.*data\.root"):
        load_index(str(tmp_path), "valid")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_image_is_named(make_dataset, damage):
    root = make_dataset(n_train=2)
    path = root / "train" / "img001.jpg"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"not a jpeg at all")
    ds = dataset(root)
    ds[0]
    with pytest.raises(DataError, match=r"img001\.jpg: cannot decode the image"):
        ds[1]


def test_image_and_mask_of_different_size(make_dataset):
    root = make_dataset(n_train=1)
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(root / "train" / "img000_mask.png")
    with pytest.raises(DataError, match=r"img000\.jpg is 56x40 but its mask .*img000_mask\.png is 20x20"):
        dataset(root)[0]


def test_mask_values_outside_classes(make_dataset):
    root = make_dataset(n_train=1, num_classes=5)
    with pytest.raises(DataError, match=r"img000_mask\.png: mask values \[3, 4\] are outside the 3 classes"):
        dataset(root, num_classes=3)[0]
    mask = dataset(root, num_classes=3, ignore=4, label_map={0: 0, 1: 1, 2: 2, 3: 4, 4: 4})[0][1]
    assert set(mask.unique().tolist()) <= {0, 1, 2, 4}


def test_ignore_index_values_are_allowed(make_dataset):
    root = make_dataset(n_train=1, num_classes=4)
    mask = dataset(root, num_classes=3, ignore=3)[0][1]
    assert mask.max() == 3


PALETTE = [[128, 64, 128], [70, 70, 70], [0, 0, 142]]


def test_rgb_masks_decode_with_palette(make_dataset):
    root = make_dataset(n_train=1, rgb_palette=PALETTE)
    index_root = make_dataset(n_train=1, root=root.parent / "index")
    rgb = dataset(root, mask_format="rgb", palette=PALETTE)[0][1]
    plain = dataset(index_root)[0][1]
    assert torch.equal(rgb, plain)


def test_rgb_unknown_colour_is_named_or_ignored(make_dataset):
    root = make_dataset(n_train=1, rgb_palette=PALETTE)
    with pytest.raises(DataError, match=r"colour \(0, 0, 142\) is not in data\.palette"):
        dataset(root, mask_format="rgb", palette=PALETTE[:2])[0]
    mask = dataset(root, mask_format="rgb", palette=PALETTE[:2], palette_ignore=[PALETTE[2]])[0][1]
    assert set(mask.unique().tolist()) <= {0, 1, 255}


def test_label_map_remaps_and_rejects_unmapped_ids(make_dataset):
    root = make_dataset(n_train=1, num_classes=3)
    mapping = {0: 255, 1: 0, 2: 1}  # e.g. Cityscapes labelIds -> trainIds
    raw = dataset(root, num_classes=3)[0][1]
    mapped = dataset(root, num_classes=2, label_map=mapping)[0][1]
    for src, dst in mapping.items():
        assert torch.all(mapped[raw == src] == dst)
    with pytest.raises(DataError, match=r"raw mask ids \[2\] are not in data\.label_map"):
        dataset(root, num_classes=2, label_map={0: 255, 1: 0})[0]


def test_jpeg_draft_decodes_smaller_and_mask_follows(tmp_path):
    rng = np.random.default_rng(0)
    write_pair(tmp_path / "train", "big", random_mask(rng, 160, 240, 3))
    index = load_index(str(tmp_path), "train")
    image, mask = SegmentationDataset(index, MaskDecoder(3, 255), decode_size=(40, 60))[0]
    assert image.shape == (3, 40, 60) and mask.shape == (40, 60)
    full_image, _ = SegmentationDataset(index, MaskDecoder(3, 255))[0]
    assert full_image.shape == (3, 160, 240)


@needs_camvid
def test_camvid_loads():
    index = load_index(str(CAMVID), "train", cache_dir=None if os.access(CAMVID, os.W_OK) else None)
    assert len(index) == 367
    image, mask = SegmentationDataset(index, MaskDecoder(11, 11))[0]
    assert image.shape == (3, 360, 480) and image.dtype == torch.uint8
    assert mask.shape == (360, 480) and int(mask.max()) <= 11


@needs_camvid
def test_camvid_train_samples_have_the_crop_size_and_only_known_labels():
    from segpipe.config import load_config
    from segpipe.transforms import train_transform
    cfg = load_config(str(REPO / "configs" / "camvid.yaml"), [f"data.root={CAMVID}"]).data
    index = load_index(str(CAMVID), "train")
    dataset = SegmentationDataset(index, MaskDecoder(11, 11), train_transform(cfg))
    for i in range(0, len(index), 61):
        image, mask = dataset[(i, i)]
        assert image.shape == (3, 288, 384) and image.dtype == torch.float32 and mask.shape == (288, 384)
        assert -3 < float(image.min()) < float(image.max()) < 3  # normalised, not 0..255 or 0..1
        assert set(torch.unique(mask).tolist()) <= set(range(12))


@needs_camvid
def test_dataloader_benchmark_runs_on_camvid():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dataloader.py"), "--root", str(CAMVID),
                             "--samples", "4", "--repeats", "1", "--memory-samples", "16"],
                            capture_output=True, text=True, timeout=300, env=run_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    for row in ("| decode only (floor) |", "| naive stock v2 (full image) |", "| segpipe train pipeline |",
                "segpipe vs naive:", "| 2 workers |", "| 1,000,000 |"):
        assert row in result.stdout, row


def test_compression_quality_reads_masks_as_the_checkpoint_was_trained(make_dataset, tmp_path):
    from segpipe.compress.quality import labelled_images
    index_root = make_dataset(n_valid=2, root=tmp_path / "index")
    rgb_root = make_dataset(n_valid=2, rgb_palette=PALETTE, root=tmp_path / "rgb")  # same seed: same masks
    meta = {"num_classes": 3, "ignore_index": 255, "config": {"data": {"mask_format": "rgb", "palette": PALETTE}}}
    _, rgb_masks = labelled_images(meta, rgb_root, "valid")
    _, index_masks = labelled_images({**meta, "config": {}}, index_root, "valid")
    assert len(rgb_masks) == 2 and all(torch.equal(a, b) for a, b in zip(rgb_masks, index_masks))
    assert rgb_masks[0].shape == (40, 56)  # full resolution, as evaluate.py scores


def test_seeded_samples_repeat_and_leave_the_global_generator_alone(make_dataset):
    from torchvision.transforms import v2
    root = make_dataset(n_train=1, size=(64, 96))
    augment = v2.Compose([v2.RandomCrop([32, 48]), v2.RandomHorizontalFlip()])
    dataset = SegmentationDataset(load_index(str(root), "train"), MaskDecoder(3, 255), augment)
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    first, again = dataset[(0, 7)], dataset[(0, 7)]
    others = [dataset[(0, seed)] for seed in range(8, 14)]
    assert torch.equal(torch.rand(4), expected_next)  # sampling with a seed did not move the global stream
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert any(not torch.equal(first[0], image) for image, _ in others)
