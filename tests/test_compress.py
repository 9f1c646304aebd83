"""Compression: pruning reaches its sparsity, structured pruning really shrinks, int8 agrees, artefacts round-trip.

The model is a reduced DeepLabV3 (one Bottleneck per ResNet stage, real ASPP/DeepLab head and FCN
auxiliary head) at 64x64: the same module types the compression code works on, at a fraction of the cost.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCNHead

from segpipe.backbones import ResNetFeatures
from segpipe.checkpoint import CheckpointError, make_checkpoint, save_checkpoint
from segpipe.compress import find_channel_groups, prune_channels, prune_unstructured, untie_relus, weight_sparsity
from segpipe.compress.__main__ import main
from segpipe.compress.quality import pixel_agreement
from segpipe.compress.structured import PruningError, kept_count
from segpipe.compress.unstructured import prunable_weights
from segpipe.model_files import load_model
from segpipe.models import REGISTRY

NUM_CLASSES = 5
SIZE = 64


def tiny_deeplab(seed: int = 0) -> nn.Module:
    """A DeepLabV3 with a one-block-per-stage ResNet, eval mode, BatchNorm statistics made non-trivial."""
    torch.manual_seed(seed)
    with pytest.MonkeyPatch.context() as mp:
        # Expansion 1 instead of 4 makes the stage outputs 64..512 wide (torchvision reads it only while
        # building), so the modules stay genuine Bottlenecks at a quarter of the cost.
        mp.setattr(Bottleneck, "expansion", 1)
        resnet = ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=16,
                        replace_stride_with_dilation=[False, True, True])
    backbone = ResNetFeatures(resnet, {"layer4": "out", "layer3": "aux"})
    model = DeepLabV3(backbone, DeepLabHead(512, NUM_CLASSES), FCNHead(256, NUM_CLASSES))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # fresh BN is the identity; real statistics exercise folding
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE)


def forward(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)["out"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A checkpoint of the tiny model, a small data root, and the registry patched to build the tiny model."""
    root = tmp_path_factory.mktemp("compress")
    model = tiny_deeplab()
    meta = {"model_name": "tiny_deeplab", "model_options": {}, "num_classes": NUM_CLASSES,
            "classes": [f"c{i}" for i in range(5)], "palette": [[i, i, i] for i in range(5)], "ignore_index": 255,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "eval_size": None, "config": {}}
    training = {"optimizer": {"state": {}}, "scheduler": None, "scaler": None, "epoch": 3, "step": 30,
                "samples_done": 0, "world_size": 1, "global_batch": 8, "best_miou": 0.1, "miou": 0.1}
    save_checkpoint(make_checkpoint(model.state_dict(), meta, training), root / "model.pth")
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        (root / "data" / split).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(
                root / "data" / split / f"img{i}.jpg")
            Image.fromarray(rng.integers(0, NUM_CLASSES, (SIZE, SIZE), dtype=np.uint8)).save(
                root / "data" / split / f"img{i}_mask.png")
    with pytest.MonkeyPatch.context() as mp:  # the registry is where a new architecture goes
        mp.setitem(REGISTRY, "tiny_deeplab", lambda num_classes, weights="none", weights_backbone="none":
                   tiny_deeplab(seed=123))
        yield root, model


def test_kept_count_rounds_to_simd_widths():
    assert kept_count(256, 0.5) == 128
    assert kept_count(64, 0.3) == 48  # 44.8 rounds to the nearest multiple of 8
    assert kept_count(4, 0.5) == 2  # narrower than round_to: plain rounding
    with pytest.raises(PruningError, match="sparsity"):
        kept_count(64, 1.0)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_reaches_sparsity_and_still_predicts(scope):
    model = tiny_deeplab()
    reached = prune_unstructured(model, 0.5, scope)
    assert reached == pytest.approx(0.5, abs=0.005)
    assert weight_sparsity(model) == reached
    if scope == "layer":  # every layer pruned by the same share
        for module, name in prunable_weights(model):
            assert float((getattr(module, name) == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    # Permanent: no masks or re-parametrisation hooks left behind.
    assert not any("weight_orig" in n or "weight_mask" in n for n, _ in model.named_parameters())
    assert not any("weight_mask" in n for n, _ in model.named_buffers())
    assert forward(model, images()).shape == (2, NUM_CLASSES, SIZE, SIZE)


def test_structured_pruning_shrinks_layers_but_not_residual_widths():
    model = tiny_deeplab()
    before = sum(p.numel() for p in model.parameters())
    widths = {g.conv: model.get_submodule(g.conv).out_channels for g in find_channel_groups(model)}
    residual = {n: m.conv3.out_channels for n, m in model.named_modules() if isinstance(m, Bottleneck)}
    channels = prune_channels(model, 0.5)
    assert set(channels) == set(widths)
    assert len(channels) == 4 * 2 + 5 + 1 + 1 + 1  # bottleneck inners, ASPP branches + projection, head, aux head
    for name, kept in channels.items():
        assert model.get_submodule(name).out_channels == kept == widths[name] // 2
    assert residual == {n: m.conv3.out_channels for n, m in model.named_modules() if isinstance(m, Bottleneck)}
    assert sum(p.numel() for p in model.parameters()) < 0.6 * before
    out = model(images())
    assert out["out"].shape == (2, NUM_CLASSES, SIZE, SIZE) and out["aux"].shape == out["out"].shape


def test_structured_pruning_removes_exactly_the_dead_channels():
    """Channels that contribute nothing are the ones removed, so the output does not change at all."""
    model = tiny_deeplab()
    torch.manual_seed(2)
    with torch.no_grad():
        for g in find_channel_groups(model):
            conv, bn = model.get_submodule(g.conv), model.get_submodule(g.bn)
            dead = torch.randperm(conv.out_channels)[: conv.out_channels // 2]
            conv.weight[dead] = 0
            bn.weight[dead], bn.bias[dead], bn.running_mean[dead] = 0, 0, 0
    x = images()
    expected = forward(model, x)
    prune_channels(model, 0.5, criterion="l1")
    torch.testing.assert_close(forward(model, x), expected, rtol=1e-4, atol=1e-5)


def test_untied_relus_change_nothing_but_sharing():
    model = tiny_deeplab()
    x = images()
    expected = forward(model, x)
    untie_relus(model)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert all(not hasattr(b, "relu") and len({id(b.relu1), id(b.relu2), id(b.relu3)}) == 3 for b in blocks)
    torch.testing.assert_close(forward(model, x), expected)


def test_structured_artefact_round_trips_through_load_model(workspace):
    root, model = workspace
    out = root / "structured.pth"
    main(["prune", "--checkpoint", str(root / "model.pth"), "--method", "structured", "--sparsity", "0.5",
          "--out", str(out)])
    assert load_model(root / "model.pth")[1]["compression"] is None
    with pytest.raises(CheckpointError, match="missing.pth"):
        load_model(root / "missing.pth")
    loaded, meta = load_model(out)
    expected = copy.deepcopy(model)
    prune_channels(expected, 0.5)
    x = images()
    torch.testing.assert_close(forward(loaded, x), forward(expected, x))
    assert meta["compression"]["method"] == "structured" and meta["classes"] == [f"c{i}" for i in range(5)]
    assert "optimizer" not in meta and "model" not in meta
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters()) // 2


def test_unstructured_artefact_keeps_its_zeros(workspace):
    root, _ = workspace
    out = root / "unstructured.pth"
    main(["prune", "--checkpoint", str(root / "model.pth"), "--sparsity", "0.7", "--out", str(out)])
    loaded, meta = load_model(out)
    assert weight_sparsity(loaded) == pytest.approx(0.7, abs=0.01)
    assert meta["compression"]["method"] == "unstructured"
    assert forward(loaded, images()).shape == (2, NUM_CLASSES, SIZE, SIZE)


def test_bf16_artefact_returns_float_logits_close_to_fp32(workspace):
    root, model = workspace
    out = root / "bf16.pth"
    main(["quantize", "--checkpoint", str(root / "model.pth"), "--dtype", "bf16", "--out", str(out)])
    loaded, meta = load_model(out)
    x = images()
    got, expected = forward(loaded, x), forward(model, x)
    assert got.dtype == torch.float32 and meta["compression"]["method"] == "bf16"
    assert pixel_agreement(list(got.argmax(1)), list(expected.argmax(1))) > 0.9


def test_finetune_of_unstructured_pruning_is_refused(workspace):
    root, _ = workspace
    with pytest.raises(SystemExit, match="--method structured"):
        main(["prune", "--checkpoint", str(root / "model.pth"), "--method", "unstructured",
              "--finetune-epochs", "1", "--out", str(root / "ft.pth")])
    assert not (root / "ft.pth").exists()


@pytest.fixture(scope="module")
def int8_artefact(workspace):
    root, _ = workspace
    out = root / "int8.pt2"
    main(["quantize", "--checkpoint", str(root / "model.pth"), "--calib-images", "3",
          "--data-root", str(root / "data"), "--out", str(out)])
    return out


def test_int8_artefact_keeps_metadata_and_runs_on_the_cpu_only(int8_artefact):
    _, meta = load_model(int8_artefact, trust_artefact=True, compile=False)
    assert meta["compression"]["method"] == "int8" and meta["compression"]["calib_images"] == 3
    assert meta["num_classes"] == NUM_CLASSES and "model" not in meta
    with pytest.raises(CheckpointError, match="--device cpu"):
        load_model(int8_artefact, device="cuda", trust_artefact=True)


def test_int8_agrees_with_fp32_uncompiled_and_compiled(workspace, int8_artefact):
    _, model = workspace
    x = images(1)
    expected = forward(model, x)
    for compile in (False, True):  # the reference q/dq graph, then the fused oneDNN kernels
        loaded, _ = load_model(int8_artefact, trust_artefact=True, compile=compile)
        loaded.eval()  # callers do this; an exported program must tolerate it
        got = forward(loaded, x)
        assert got.shape == expected.shape
        assert pixel_agreement(list(got.argmax(1)), list(expected.argmax(1))) > 0.97
        # int8 error is a small fraction of the logit range, not a different function.
        assert (got - expected).abs().max() < 0.1 * expected.abs().max()


def test_sweep_prints_miou_for_each_sparsity(workspace, capsys):
    root, _ = workspace
    # Structured, because torch.nn.utils.prune's topk makes nine unstructured passes slow on 2 cores.
    main(["prune", "--checkpoint", str(root / "model.pth"), "--sweep", "--method", "structured",
          "--data-root", str(root / "data"), "--images", "2"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:1] == " " or line[:1].isdigit()]
    rows = [r for r in rows if len(r) == 4 and r[0] != "sparsity"]
    assert [float(r[0]) for r in rows] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    reached = [float(r[1]) for r in rows]
    assert reached == sorted(reached) and reached[0] == 0.0 and reached[-1] > 0.8
    assert float(rows[0][3]) == 1.0 and all(0.0 <= float(r[2]) <= 1.0 for r in rows)


def test_bf16_of_a_pruned_model_keeps_the_pruned_widths(workspace):
    root, model = workspace
    pruned, out = root / "chain_structured.pth", root / "chain_bf16.pth"
    main(["prune", "--checkpoint", str(root / "model.pth"), "--method", "structured", "--sparsity", "0.3",
          "--out", str(pruned)])
    main(["quantize", "--checkpoint", str(pruned), "--dtype", "bf16", "--out", str(out)])
    loaded, meta = load_model(out)
    assert meta["compression"]["method"] == "bf16" and meta["compression"]["previous"]["method"] == "structured"
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())
    assert forward(loaded, images()).shape == (2, NUM_CLASSES, SIZE, SIZE)


def test_cli_refuses_a_suffix_that_would_not_load(workspace):
    root, _ = workspace
    with pytest.raises(SystemExit, match=r"\*\.pt2"):
        main(["quantize", "--checkpoint", str(root / "model.pth"), "--out", str(root / "int8.pth")])


def test_cli_bad_data_root_or_checkpoint_is_a_message_not_a_traceback(workspace, tmp_path):
    root, _ = workspace
    with pytest.raises(SystemExit, match="--data-root"):
        main(["prune", "--checkpoint", str(root / "model.pth"), "--sweep", "--data-root", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="missing.pth"):
        main(["quantize", "--checkpoint", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "q.pt2")])
