"""ONNX export (segpipe.export) and ONNX Runtime inference (segpipe.onnx_runtime): every architecture agrees
with PyTorch, the metadata round-trips, infer.py and evaluate.py read .onnx files, int8, hostile files."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from conftest import random_mask, write_pair  # noqa: E402
from test_evaluate_infer import fails_with, run_script  # noqa: E402
from test_predict import tiny_checkpoint  # noqa: E402

from segpipe import export  # noqa: E402
from segpipe.models import MODEL_NAMES, build_model  # noqa: E402
from segpipe.onnx_runtime import OnnxError, OnnxModel, load_onnx  # noqa: E402
from segpipe.checkpoint import META_KEYS  # noqa: E402
from segpipe.predict import Predictor  # noqa: E402

SIZE = (40, 56)
# int8 must keep at least this share of the fp32 class map. On this random-weight 4-class model it keeps 83%
# (a trained LR-ASPP on CamVid: 94.5%), while a broken quantization falls to about the largest class's share
# (44% here) or chance (25%): the threshold separates the two with room for calibration noise.
INT8_MIN_AGREEMENT = 0.7


def smooth_images(n: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """Normalised-looking images made of blobs rather than noise, so class maps have regions."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, size[0] // 8, size[1] // 8, generator=generator)
    return nnf.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def with_batch_statistics(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics taken from images, so a random model's logits vary with the content."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        model.train()(images)
    return model.eval()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_architecture_exports_and_agrees_with_pytorch(name):
    torch.manual_seed(0)
    model = with_batch_statistics(build_model(name, 3), smooth_images(4, (64, 64), seed=1))
    if getattr(model, "aux_classifier", None) is not None:
        model.aux_classifier = None
    onnx_model = OnnxModel(export.export_model(model, smooth_images(1, (64, 64), seed=2)).SerializeToString())
    for images in (smooth_images(2, (64, 64), seed=3), smooth_images(1, (48, 80), seed=4)):  # batch and size vary
        with torch.no_grad():
            expected = model(images)["out"]
        got = onnx_model(images)["out"]
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
        assert (got.argmax(1) == expected.argmax(1)).float().mean() >= export.MIN_AGREEMENT
        assert expected.argmax(1).unique().numel() > 1  # the class maps vary: agreement is not trivial


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny 4-class checkpoint trained on nothing, its data set, and its fp32 and int8 .onnx exports."""
    folder = tmp_path_factory.mktemp("onnx")
    root, rng, images = folder / "data", np.random.default_rng(0), []
    for split, n in (("train", 6), ("valid", 6)):
        for i in range(n):
            write_pair(root / split, f"img{i:03d}", random_mask(rng, *SIZE, 3))
            if split == "valid":
                images.append(np.asarray(Image.open(root / split / f"img{i:03d}.jpg")))
    ckpt = tiny_checkpoint(folder / "run" / "best.pt", num_classes=4, images=images, data_root=root,
                           palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]])
    out = folder / "run" / "model.onnx"
    assert export.main(["onnx", "--checkpoint", str(ckpt), "--out", str(out), "--int8", "--calib-images", "6"]) == 0
    return root, ckpt, out, folder / "run" / "model.int8.onnx"


def test_exported_metadata_round_trips(exported):
    _, ckpt, out, _ = exported
    checkpoint = torch.load(ckpt, weights_only=True)
    model, meta = load_onnx(out)
    assert {k: meta[k] for k in META_KEYS} == {k: checkpoint.get(k) for k in META_KEYS}
    assert meta["config"] == checkpoint["config"]
    record = meta["export"]
    assert record["precision"] == "fp32" and record["images"] == 6
    assert record["agreement"] >= export.MIN_AGREEMENT
    assert {k: v for k, v in Predictor.from_file(out, "cpu").meta.items() if k in META_KEYS} == {
        k: checkpoint.get(k) for k in META_KEYS}
    assert model(torch.zeros(2, 3, 24, 40))["out"].shape == (2, 4, 24, 40)  # dynamic batch, height, width


def test_evaluate_and_infer_read_onnx_as_they_read_the_checkpoint(exported, tmp_path, monkeypatch):
    root, ckpt, out, _ = exported
    agreement = load_onnx(out)[1]["export"]["agreement"]
    scores = {}
    for model_file in (ckpt, out):  # in this process: the scripts' own code paths, without two more interpreters
        folder = tmp_path / f"eval-{model_file.suffix[1:]}"
        run_script("evaluate.py", [str(model_file), "--data-root", str(root), "--out", str(folder), "--workers", "0",
                                   "--failures", "0"], tmp_path, monkeypatch)
        scores[model_file.suffix] = json.loads((folder / "metrics.json").read_text())
    from_ckpt, from_onnx = scores[".pt"], scores[".onnx"]
    assert from_onnx["miou"] == pytest.approx(from_ckpt["miou"], abs=1 - agreement)
    assert from_onnx["num_images"] == from_ckpt["num_images"] == 6
    masks = {}
    for model_file in (ckpt, out):
        folder = tmp_path / f"infer-{model_file.suffix[1:]}"
        run_script("infer.py", [str(root / "valid"), "--checkpoint", str(model_file), "--out", str(folder)],
                   tmp_path, monkeypatch)
        masks[model_file.suffix] = np.stack([np.asarray(Image.open(folder / f"img{i:03d}_mask.png"))
                                             for i in range(6)])
    assert (masks[".onnx"] == masks[".pt"]).mean() >= agreement
    assert len(np.unique(masks[".pt"])) > 1


def test_int8_export_loads_and_agrees(exported):
    root, ckpt, _, int8 = exported
    model, meta = load_onnx(int8)
    assert meta["export"]["precision"] == "int8" and meta["export"]["calib_images"] == 6
    assert meta["export"]["agreement"] >= INT8_MIN_AGREEMENT
    names = sorted(p.name for p in (root / "valid").glob("*.jpg"))
    images = [np.asarray(Image.open(root / "valid" / n)) for n in names]
    reference = Predictor.from_file(ckpt, "cpu").predict_batch(images)
    preds = Predictor(model, meta, "cpu").predict_batch(images)
    share = sum(int((p == r).sum()) for p, r in zip(preds, reference)) / sum(r.numel() for r in reference)
    assert share == pytest.approx(meta["export"]["agreement"])  # what the file says is what it does
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8)).graph.node)


def test_export_refuses_to_replace_a_file_it_did_not_write(exported, tmp_path):
    _, ckpt, _, _ = exported
    other = tmp_path / "notes.onnx"
    other.write_text("my notes")
    with pytest.raises(SystemExit) as info:
        export.main(["onnx", "--checkpoint", str(ckpt), "--out", str(other)])
    assert str(other) in str(info.value) and "\n" not in str(info.value)
    assert other.read_text() == "my notes"


def test_export_without_validation_data_says_so(exported, tmp_path):
    _, ckpt, _, _ = exported
    with pytest.raises(SystemExit) as info:
        export.main(["onnx", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx"),
                     "--data-root", str(tmp_path / "nowhere")])
    assert "--data-root" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "m.onnx").exists()


def _edited(source: Path, target: Path, drop: str | None = None, garble: str | None = None) -> Path:
    proto = onnx.load(str(source))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != drop]
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value="{not json" if key == garble else value)
    onnx.save(proto, str(target))
    return target


@pytest.mark.parametrize("kind", ["not onnx", "truncated", "no metadata", "missing classes", "bad json"])
def test_hostile_onnx_files_get_one_line(exported, tmp_path, kind):
    _, _, out, _ = exported
    path = tmp_path / "hostile.onnx"
    if kind == "not onnx":
        path.write_bytes(b"\x89PNG not a model at all")
    elif kind == "truncated":
        path.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    elif kind == "no metadata":  # an ONNX file from elsewhere
        _edited(out, path, drop="segpipe_format")
    elif kind == "missing classes":
        _edited(out, path, drop="classes")
    else:
        _edited(out, path, garble="mean")
    with pytest.raises(ValueError) as info:
        Predictor.from_file(path, "cpu")
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_infer_exits_with_one_line_for_a_damaged_onnx(exported, tmp_path, monkeypatch):
    root, _, out, _ = exported
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(out.read_bytes()[:1000])
    message = fails_with("infer.py", [str(root / "valid"), "--checkpoint", str(damaged), "--out",
                                      str(tmp_path / "pred")], tmp_path, monkeypatch)
    assert str(damaged) in message and "\n" not in message


def test_missing_onnxruntime_names_the_pip_command(exported, monkeypatch):
    _, _, out, _ = exported
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(OnnxError, match="pip install onnxruntime"):
        load_onnx(out)
