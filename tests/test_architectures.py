"""Behaviour of the U-Net and ResNet-50 conv-head models: shapes, training, weights, export."""
from urllib.error import URLError

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from segpipe.checkpoint import make_checkpoint, save_checkpoint
from segpipe.compress.int8 import untie_relus
from segpipe.config import ConfigError, load_config
from segpipe.convhead import build_resnet50_convhead
from segpipe.model_files import build_initial_model
from segpipe.models import ModelError, build_model, model_options
from segpipe.predict import Predictor
from segpipe.unet import build_unet

IGNORE = 255
BUILDERS = {"unet": build_unet, "resnet50_convhead": build_resnet50_convhead}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy shared CPU, OpenMP threads spin-waiting for each other cost
    more than a second thread gains on inputs this small."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(name: str, num_classes: int, seed: int = 0, **kwargs) -> nn.Module:
    """Build a model with a fixed random init, so tests are deterministic."""
    torch.manual_seed(seed)
    return BUILDERS[name](num_classes, **kwargs)


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits without autograd."""
    model.eval()
    with torch.no_grad():
        return model(x)["out"]


@pytest.mark.parametrize("num_classes", [1, 3, 19])
@pytest.mark.parametrize("name", BUILDERS)
def test_logits_have_input_size_and_class_count(name, num_classes):
    model = build(name, num_classes)
    for size in [(33, 47), (17, 31), (32, 64)]:  # odd, smaller than one stride-32 cell, exact multiple
        out = forward(model, torch.randn(1, 3, *size))
        assert out.shape == (1, num_classes, *size)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", BUILDERS)
def test_training_step_updates_every_parameter(name):
    model = build(name, num_classes=3).train()
    torch.manual_seed(1)
    image = torch.randn(2, 3, 33, 47)
    target = torch.randint(0, 3, (2, 33, 47))
    target[:, :5] = IGNORE
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.CrossEntropyLoss(ignore_index=IGNORE)(model(image)["out"], target)
    loss.backward()
    # Every parameter must take part, or DDP would need find_unused_parameters=True.
    no_grad = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    optimizer.step()
    unchanged = [k for k, p in model.named_parameters() if torch.equal(p, before[k])]
    assert torch.isfinite(loss) and unchanged == []


@pytest.mark.parametrize("name", BUILDERS)
def test_state_dict_round_trip_gives_identical_output(name):
    source = build(name, num_classes=3, seed=0)
    source.train()
    with torch.no_grad():
        source(torch.randn(2, 3, 33, 47))  # move BN running stats away from their defaults
    target = build(name, num_classes=3, seed=1)
    x = torch.randn(1, 3, 33, 47)
    assert not torch.equal(forward(source, x), forward(target, x))
    target.load_state_dict(source.state_dict())
    assert torch.equal(forward(source, x), forward(target, x))


@pytest.mark.parametrize("output_stride", [8, 16])
def test_convhead_output_stride_sets_feature_resolution(output_stride):
    model = build("resnet50_convhead", num_classes=4, output_stride=output_stride).eval()
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        features = model.backbone(x)["out"]
    assert features.shape[-2:] == (-(-33 // output_stride), -(-47 // output_stride))
    assert forward(model, x).shape == (1, 4, 33, 47)


def test_convhead_weights_transfer_between_output_strides():
    # Dilation changes no weight shapes: train at stride 16, evaluate at stride 8.
    os16 = build("resnet50_convhead", num_classes=4, output_stride=16)
    os8 = build("resnet50_convhead", num_classes=4, output_stride=8, seed=1)
    os8.load_state_dict(os16.state_dict())
    assert torch.equal(os8.backbone.layer4[0].conv2.weight, os16.backbone.layer4[0].conv2.weight)


def test_convhead_depth_and_width_shape_the_head():
    model = build("resnet50_convhead", num_classes=5, head_depth=2, head_width=32)
    assert len(model.head) == 2 and model.classifier.in_channels == 32
    plain = build("resnet50_convhead", num_classes=5, head_depth=0)
    assert len(plain.head) == 0 and plain.classifier.in_channels == 2048
    assert forward(plain, torch.randn(1, 3, 33, 41)).shape == (1, 5, 33, 41)


@pytest.mark.parametrize(
    "kwargs", [{"output_stride": 32}, {"head_depth": -1}, {"head_width": 0}, {"weights": "coco"}]
)
def test_convhead_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        build_resnet50_convhead(3, **kwargs)


@pytest.mark.parametrize("encoder", ["resnet18", "resnet34"])
def test_unet_lighter_encoders(encoder):
    model = build("unet", num_classes=3, encoder=encoder)
    assert forward(model, torch.randn(1, 3, 33, 47)).shape == (1, 3, 33, 47)


def test_unet_rejects_unknown_encoder_and_zero_classes():
    with pytest.raises(ValueError, match="vgg16"):
        build_unet(3, encoder="vgg16")
    with pytest.raises(ValueError, match="num_classes"):
        build_unet(0)


@pytest.mark.parametrize("name", BUILDERS)
def test_offline_imagenet_download_names_the_fixes(name, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache, so a download is attempted

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as error:
        build(name, num_classes=3, weights_backbone="imagenet")
    assert "model.weights_backbone=none" in str(error.value)
    assert "model.weights_backbone=/path/to/resnet50-11ad3fa6.pth" in str(error.value)


def test_local_imagenet_file_loads_into_the_encoder(tmp_path):
    torch.manual_seed(7)
    reference = resnet18()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), path)
    cfg = load_config(None, ["model.name=unet", "model.encoder=resnet18", f"model.weights_backbone={path}"])
    model, _ = build_initial_model(cfg.model, 3)
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_local_file_of_the_wrong_architecture_is_rejected(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    for file in (path, tmp_path / "missing.pth"):
        cfg = load_config(None, ["model.name=resnet50_convhead", f"model.weights_backbone={file}"])
        with pytest.raises(ModelError, match=file.name):
            build_initial_model(cfg.model, 3)


def test_unet_exports_with_dynamic_height_and_width():
    model = build("unet", num_classes=3, encoder="resnet18").eval()
    height, width = torch.export.Dim("height", min=64, max=1024), torch.export.Dim("width", min=64, max=1024)
    program = torch.export.export(
        model, (torch.randn(1, 3, 65, 97),), dynamic_shapes={"x": {2: height, 3: width}}
    )
    for size in [(64, 96), (71, 130)]:  # no padding needed, and padding on both axes
        x = torch.randn(1, 3, *size)
        torch.testing.assert_close(program.module()(x)["out"], forward(model, x))


# Non-default architecture options, as a config sets them (model.KEY).
OPTIONS = {"unet": {"encoder": "resnet18"},
           "resnet50_convhead": {"output_stride": 16, "head_depth": 1, "head_width": 16}}


@pytest.mark.parametrize("name", BUILDERS)
def test_config_options_round_trip_through_checkpoint_and_predictor(name, tmp_path):
    cfg = load_config(None, [f"model.name={name}"] + [f"model.{k}={v}" for k, v in OPTIONS[name].items()])
    options = model_options(cfg.model)
    assert options == OPTIONS[name]
    torch.manual_seed(0)
    model = build_model(name, 3, **options).eval()
    if name == "unet":
        assert type(model.backbone.layer1[0]).__name__ == "BasicBlock"
    else:
        assert len(model.head) == 1 and model.classifier.in_channels == 16
    path = tmp_path / "best.pt"
    save_checkpoint(make_checkpoint(model.state_dict(), {
        "model_name": name, "model_options": options, "num_classes": 3, "classes": ["a", "b", "c"], "palette": None,
        "ignore_index": 255, "mean": [0.5] * 3, "std": [0.25] * 3, "eval_size": None, "config": {}}), path)
    image = torch.randint(0, 256, (3, 37, 45), dtype=torch.uint8)
    x = ((image.float() / 255 - 0.5) / 0.25)[None]
    expected = forward(model, x).argmax(1)[0]
    assert torch.equal(Predictor.from_file(path, "cpu").predict(image).long(), expected)


def test_options_for_another_model_or_out_of_range_are_refused():
    with pytest.raises(ModelError, match="model.output_stride applies to resnet50_convhead, not to unet"):
        build_model("unet", 3, output_stride=16)
    with pytest.raises(ModelError, match="output_stride"):
        build_model("resnet50_convhead", 3, output_stride=32)
    with pytest.raises(ConfigError, match="head_width"):
        load_config(None, ["model.head_widht=8"])


@pytest.mark.parametrize("encoder", ["resnet18", "resnet50"])  # BasicBlock and Bottleneck share one ReLU
def test_untied_relus_leave_unet_outputs_unchanged(encoder):
    model = build("unet", num_classes=3, encoder=encoder).eval()
    x = torch.randn(1, 3, 33, 47)
    expected = forward(model, x)
    untie_relus(model)
    blocks = [m for m in model.backbone.modules() if "Untied" in type(m).__name__]
    assert len(blocks) == (8 if encoder == "resnet18" else 16)
    assert not any(hasattr(b, "relu") for b in blocks)
    torch.testing.assert_close(forward(model, x), expected)


def test_unet_with_basic_blocks_quantizes_to_int8():
    from segpipe.compress.int8 import quantize_int8
    model = build("unet", num_classes=3, encoder="resnet18").eval()
    torch.manual_seed(2)
    calibration = [torch.randn(1, 3, 64, 64) for _ in range(3)]
    program = quantize_int8(model, calibration)  # BasicBlock's shared ReLU would make the quantizer refuse
    x = torch.randn(1, 3, 64, 64)
    expected = forward(model, x).argmax(1)
    with torch.no_grad():
        got = program.module()(x)["out"].argmax(1)  # the reference q/dq graph: no compiler needed
    assert (got == expected).float().mean() > 0.9


def test_convhead_head_layers_are_pruned_for_real():
    from segpipe.compress import prune_channels
    model = build("resnet50_convhead", num_classes=4, output_stride=16, head_depth=2, head_width=64).eval()
    before = sum(p.numel() for p in model.parameters())
    prune_channels(model, 0.5)
    assert [layer[0].out_channels for layer in model.head] == [32, 32] and model.classifier.in_channels == 32
    assert sum(p.numel() for p in model.parameters()) < 0.6 * before
    assert forward(model, torch.randn(1, 3, 33, 47)).shape == (1, 4, 33, 47)


def test_lraspp_with_default_settings_does_not_collapse_in_eval_mode():
    """100 steps at the default config: eval-mode predictions on the training images keep every class.
    (MobileNetV3's own BatchNorm momentum, 0.01, predicts one class here: running statistics lag behind.)"""
    from conftest import random_mask
    from segpipe.config import load_config
    from segpipe.models import set_bn_momentum
    torch.manual_seed(0)
    cfg = load_config(None)
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(np.stack([random_mask(rng, 32, 32, 3) for _ in range(8)]))
    colours = torch.tensor([[1.0, -1, 0], [-1, 1, 0.5], [0, 0, -1]])
    images = colours[masks].permute(0, 3, 1, 2) + 0.3 * torch.randn(8, 3, 32, 32)
    model = build_model("lraspp_mobilenet_v3_large", 3)
    set_bn_momentum(model, cfg.model.bn_momentum)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    for _ in range(100):
        batch = torch.randperm(8)[:4]
        loss = nn.functional.cross_entropy(model(images[batch])["out"], masks[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pred = model.eval()(images)["out"].argmax(1)
    assert pred.unique().tolist() == [0, 1, 2]
    assert (pred == masks).float().mean() > 0.8
