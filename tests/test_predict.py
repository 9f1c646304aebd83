"""The Predictor (segpipe.predict) and the ConfusionMatrix it is scored with."""
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch import nn

from segpipe.checkpoint import FORMAT, CheckpointError, make_checkpoint, save_checkpoint
from segpipe.metrics import ConfusionMatrix
from segpipe.models import build_model
from segpipe.predict import Predictor, _tile_starts, latest_checkpoint

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tiny_checkpoint(path: Path, num_classes: int = 3, images: list | None = None, never: int | None = None,
                    eval_size=None, palette=None, data_root=None, seed: int = 0) -> Path:
    """A random-init LR-ASPP checkpoint as train.py writes it.

    images: BatchNorm statistics are taken from these (uint8 HxWx3 arrays), so predictions vary with the
    content instead of being one class everywhere; never: a class the model can never predict.
    """
    torch.manual_seed(seed)
    model = build_model("lraspp_mobilenet_v3_large", num_classes)
    if images is not None:
        batch = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1).float() / 255 for i in images])
        batch = (batch - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # running stats = this batch's
        with torch.no_grad():
            model.train()(batch)
    if never is not None:
        with torch.no_grad():
            model.classifier.high_classifier.bias[never] = -1e4
    save_checkpoint(make_checkpoint(model.state_dict(), {
        "model_name": "lraspp_mobilenet_v3_large", "model_options": {}, "num_classes": num_classes,
        "classes": [f"class_{i}" for i in range(num_classes)], "palette": palette,
        "ignore_index": 255, "mean": MEAN, "std": STD, "eval_size": eval_size,
        "config": {"data": {"root": str(data_root) if data_root else None, "crop_size": [32, 32]}},
    }), path)
    return path


class PixelModel(nn.Module):
    """A fixed 1x1 convolution plus a left-to-right ramp: pointwise except for position (so flips matter)."""

    def __init__(self, num_classes: int = 3, ramp: float = 0.0):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.ramp = ramp
        self.seen: list[tuple] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        out = self.conv(x)
        ramp = torch.linspace(-1, 1, x.shape[-1], device=x.device)
        out[:, 0] += self.ramp * ramp
        return {"out": out}


def meta(num_classes: int = 3, eval_size=None) -> dict:
    return {"model_name": "pixel", "num_classes": num_classes, "classes": [f"c{i}" for i in range(num_classes)],
            "palette": [[i * 50, 0, 0] for i in range(num_classes)], "ignore_index": 255, "mean": MEAN,
            "std": STD, "eval_size": eval_size, "config": {}}


def normalise(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)


def test_confusion_matrix_matches_numpy_count():
    rng = np.random.default_rng(0)
    n, ignore = 5, 255
    target = rng.integers(0, n, size=(3, 31, 29))
    target[rng.random(target.shape) < 0.2] = ignore
    target[target == 3] = 0  # class 3 never in truth ...
    pred = rng.integers(0, n, size=target.shape)
    pred[pred == 3] = 1  # ... nor predicted: absent
    cm = ConfusionMatrix(n, ignore)
    for t, p in zip(target, pred):  # several updates accumulate
        cm.update(torch.from_numpy(t), torch.from_numpy(p))
    expected = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t != ignore:
            expected[t, p] += 1
    assert np.array_equal(cm.matrix.numpy(), expected)
    result = cm.compute()
    iou = [expected[c, c] / (expected[c].sum() + expected[:, c].sum() - expected[c, c]) for c in (0, 1, 2, 4)]
    assert math.isnan(result["iou"][3]) and result["absent_classes"] == [3]
    assert result["miou"] == pytest.approx(np.mean(iou))
    assert result["pixel_accuracy"] == pytest.approx(np.trace(expected) / expected.sum())
    assert result["num_pixels"] == (target != ignore).sum()


def test_dice_and_fscore_match_a_hand_count():
    # truth  0 0 1 1 | 2 255   pred  0 1 1 1 | 0 2
    target = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    cm = ConfusionMatrix(4, 255)
    cm.update(target, pred)
    result = cm.compute()
    # class 0: TP 1, truth 2, predicted 2 -> Dice 2/4; class 1: TP 2, truth 2, predicted 3 -> 4/5;
    # class 2: TP 0, truth 1, predicted 0 -> 0; class 3 absent -> NaN, left out of the means
    assert result["dice"][:3] == pytest.approx([0.5, 0.8, 0.0]) and math.isnan(result["dice"][3])
    assert result["precision"][:2] == pytest.approx([0.5, 2 / 3]) and math.isnan(result["precision"][2])
    assert result["mdice"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    recall, precision = [0.5, 1.0], [0.5, 2 / 3]  # F1 = 2PR / (P + R); class 2 has F1 0 (recall 0)
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)] + [0.0]
    assert result["mfscore"] == pytest.approx(np.mean(f1))


def test_prediction_is_upsampled_logits_argmax_at_original_size(rgb):
    model = PixelModel()
    predictor = Predictor(model, meta(eval_size=[16, 24]), "cpu")
    pred = predictor.predict(Image.fromarray(rgb))
    assert pred.shape == (37, 53) and pred.dtype == torch.int64
    x = nnf.interpolate(normalise(rgb), size=(16, 24), mode="bilinear", antialias=True, align_corners=False)
    logits = nnf.interpolate(model(x)["out"], size=(37, 53), mode="bilinear", align_corners=False)
    expected = logits.argmax(1)[0]
    assert (pred == expected).float().mean() > 0.99  # uint8 vs float resize may differ on a rare pixel
    assert len(expected.unique()) > 1  # a constant map would make this comparison empty


def test_flip_and_multiscale_average_probabilities(rgb):
    model = PixelModel(ramp=3.0)
    predictor = Predictor(model, meta(), "cpu", flip=True, scales=(0.5, 1.0))
    pred = predictor.predict(rgb)
    x = normalise(rgb)
    total = 0
    for scale in (0.5, 1.0):
        xs = nnf.interpolate(x, size=(round(37 * scale), round(53 * scale)), mode="bilinear",
                             antialias=scale < 1) if scale != 1 else x
        for flip in (False, True):
            out = model(xs.flip(-1) if flip else xs)["out"]
            out = out.flip(-1) if flip else out
            total = total + nnf.interpolate(out, size=(37, 53), mode="bilinear").softmax(1)
    assert torch.equal(pred, total.argmax(1)[0])
    plain = Predictor(model, meta(), "cpu").predict(rgb)
    assert not torch.equal(pred, plain)  # the ramp makes the mirrored view disagree: TTA changed something


def test_sliding_window_tiles_cover_the_image_within_the_window(rgb):
    model = PixelModel()  # pointwise: tiles must reproduce the whole-image prediction exactly
    whole = Predictor(model, meta(), "cpu").predict(rgb)
    model.seen.clear()
    tiled = Predictor(model, meta(), "cpu", window=(16, 20)).predict(rgb)
    assert torch.equal(tiled, whole)
    assert all(h <= 16 and w <= 20 for _, _, h, w in model.seen) and len(model.seen) == 4 * 4
    for length, tile in ((37, 16), (53, 20), (10, 16)):
        starts = _tile_starts(length, min(tile, length), 1 / 3)
        assert starts[0] == 0 and starts[-1] + min(tile, length) == length


def test_batches_group_equal_sizes_and_match_single_predictions(rgb):
    model = PixelModel()
    predictor = Predictor(model, meta(), "cpu", batch_size=2)
    images = [rgb, rgb[:20, :30], rgb[::-1].copy(), rgb[5:, 7:].copy(), rgb[:20, 10:40].copy()]
    model.seen.clear()
    batched = predictor.predict_batch(images)
    assert sorted(s[0] for s in model.seen) == [1, 2, 2]  # 37x53 and 20x30 come in pairs, 32x46 alone
    for image, pred in zip(images, batched):
        assert pred.shape == image.shape[:2]
        assert torch.equal(pred, predictor.predict(image))


def test_from_checkpoint_rebuilds_model_and_metadata(tmp_path, rgb):
    path = tiny_checkpoint(tmp_path / "best.pt", num_classes=4, palette=[[1, 2, 3]] * 4, eval_size=[32, 48])
    predictor = Predictor.from_file(path, "cpu", window="auto")
    assert predictor.classes == ["class_0", "class_1", "class_2", "class_3"] and predictor.window == (32, 32)
    assert predictor.palette == [[1, 2, 3]] * 4
    pred = predictor.predict(rgb)
    assert pred.shape == (37, 53) and int(pred.max()) < 4


def test_checkpoint_whose_weights_do_not_fit_is_refused(tmp_path):
    path = tiny_checkpoint(tmp_path / "five.pt", num_classes=5)
    ckpt = torch.load(path, weights_only=True)
    ckpt["num_classes"], ckpt["classes"] = 3, ["a", "b", "c"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"five\.pt: its weights do not fit lraspp_mobilenet_v3_large with 3"):
        Predictor.from_file(path, "cpu")


def test_checkpoint_without_metadata_is_refused(tmp_path):
    path = tmp_path / "raw.pt"
    torch.save({"format": FORMAT, "model": {}}, path)
    with pytest.raises(CheckpointError, match=r"raw\.pt lacks model_name"):
        Predictor.from_file(path, "cpu")


def test_latest_checkpoint_is_the_newest_finished_run(tmp_path):
    from segpipe.checkpoint import CheckpointError, mark_finished
    runs = tmp_path / "runs"
    assert latest_checkpoint(runs) is None
    for i, name in enumerate(["b", "a", "c"]):
        (runs / name).mkdir(parents=True)
        (runs / name / "best.pt").write_bytes(b"x")
        if name != "c":  # c is still training: newest best.pt, no finished record
            mark_finished(runs / name, ["x", "y"], 0.5)
            os.utime(runs / name / "finished.json", (time.time(), time.time() + [5, 30][i]))
        os.utime(runs / name / "best.pt", (time.time(), time.time() + 100))
    assert latest_checkpoint(runs) == runs / "a" / "best.pt"
    mark_finished(runs / "c", ["x", "y", "z"], 0.5)  # a finished run of another data set: ask, do not guess
    with pytest.raises(CheckpointError, match=r"predict different classes .*pass --checkpoint"):
        latest_checkpoint(runs)


def test_compressed_artefact_goes_through_the_same_predictor(tmp_path, rgb):
    from segpipe.compress import weight_sparsity
    from segpipe.compress.__main__ import main as compress_main
    plain = tiny_checkpoint(tmp_path / "best.pt", num_classes=3)
    pruned = tmp_path / "pruned.pth"
    compress_main(["prune", "--checkpoint", str(plain), "--method", "unstructured", "--sparsity", "0.5",
                   "--out", str(pruned)])
    small, full = Predictor.from_file(pruned, "cpu"), Predictor.from_file(plain, "cpu")
    assert small.classes == full.classes and small.meta["mean"] == MEAN
    assert weight_sparsity(small.model) > 0.4 > weight_sparsity(full.model)  # the artefact's weights, not best.pt's
    assert small.predict(rgb).shape == (37, 53)
