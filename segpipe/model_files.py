"""Files into models: load_model, the one way a model file becomes a network; load_matching_weights for
initialising a new network from a file (model.weights, model.weights_backbone, train.init_from).

Model files: a segpipe checkpoint (train.py's best.pt/last.pt; pruned or bf16 ones from segpipe.compress carry a
"compression" record), an int8 torch.export archive (.pt2), or an ONNX model (.onnx from segpipe.export, run by
ONNX Runtime; loading one runs no code from it, see segpipe/onnx_runtime.py).
Checkpoints load with weights_only=True: a file from elsewhere cannot run code. Loading a .pt2 can, so it needs
trust_artefact=True (see segpipe/compress/int8.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from segpipe.checkpoint import CheckpointError, load_checkpoint, metadata
from segpipe.compress.bf16 import Bf16Autocast
from segpipe.compress.int8 import SUFFIX as INT8_SUFFIX
from segpipe.compress.int8 import load_int8
from segpipe.compress.structured import shrink_to_channels
from segpipe.models import ModelError, build_model, model_options
from segpipe.onnx_runtime import SUFFIX as ONNX_SUFFIX
from segpipe.onnx_runtime import load_onnx


def load_model(path: str | Path, device: torch.device | str = "cpu", *, trust_artefact: bool = False,
               for_training: bool = False, compile: bool = True) -> tuple[nn.Module, dict]:
    """The model of a file, on device, and its metadata (checkpoint.META_KEYS plus "compression").

    For prediction (default): in eval mode, without training-only heads, bf16 files under bf16 autocast.
    for_training: the float network as train.py continues it (auxiliary head kept, no autocast wrapper);
    int8 and ONNX files are refused, as they cannot be trained. compile=False runs an int8 program without
    torch.compile (slow; for checks).
    """
    path, device = Path(path), torch.device(device)
    if path.suffix in (INT8_SUFFIX, ONNX_SUFFIX) and for_training:
        raise CheckpointError(f"{path} is an {'int8' if path.suffix == INT8_SUFFIX else 'ONNX'} artefact, an "
                              f"inference file that cannot be trained or compressed again; start from the float or "
                              f"pruned checkpoint it was made from, then quantize or export again")
    if path.suffix.lower() == ONNX_SUFFIX:  # run by ONNX Runtime (optional: a clear message when missing)
        model, meta = load_onnx(path, device)
        return model, metadata(meta, path)
    if path.suffix == INT8_SUFFIX:
        if device.type != "cpu":
            raise CheckpointError(f"{path} is an int8 artefact for x86 CPUs; use --device cpu, or the float "
                                  f"checkpoint it was made from on {device}")
        model, meta = load_int8(path, compile=compile, trust=trust_artefact)
        return model, metadata(meta, path)
    ckpt = load_checkpoint(path, map_location="cpu")
    meta = metadata(ckpt, path)
    if not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} holds no model weights (no 'model' state dict); re-train or re-save it")
    model = _network(ckpt, meta, path)
    if not for_training:
        if getattr(model, "aux_classifier", None) is not None:
            model.aux_classifier = None  # a training-only head: prediction reads "out" alone
        if (meta["compression"] or {}).get("method") == "bf16":
            model = Bf16Autocast(model)
        model.eval()
    return model.to(device), meta


def load_float_model(path: str | Path, keep_aux: bool = False) -> tuple[nn.Module, dict]:
    """The float network of a checkpoint (pruned widths kept, no autocast wrapper) in eval mode on the CPU, and
    its metadata: what compression and export start from. keep_aux keeps the auxiliary head (for fine-tuning)."""
    model, meta = load_model(path, for_training=True)
    if not keep_aux and getattr(model, "aux_classifier", None) is not None:
        model.aux_classifier = None
    return model.eval(), meta


def _network(ckpt: dict, meta: dict, path: Path) -> nn.Module:
    """The registry's architecture of a checkpoint (shrunk to pruned widths), with its weights loaded."""
    try:
        model = build_model(meta["model_name"], meta["num_classes"], **meta["model_options"])
    except ModelError as e:
        raise CheckpointError(f"{path}: {e}. The file comes from another segpipe version or was edited") from None
    structured = compression_step(meta["compression"], "structured")
    if structured is not None:
        shrink_to_channels(model, structured["channels"])
    state = ckpt["model"]
    if getattr(model, "aux_classifier", None) is not None and not any(k.startswith("aux_classifier.") for k in state):
        model.aux_classifier = None  # saved without its training-only head
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(
            f"{path}: its weights do not fit {meta['model_name']} with {meta['num_classes']} classes "
            f"({detail[1] if len(detail) > 1 else detail[0]}); the file is damaged or was edited. "
            f"Re-train it or pass another checkpoint") from None
    return model


def compression_step(compression: Optional[dict], method: str) -> Optional[dict]:
    """The record of `method` in a chain of compressions (each keeps the one before it under "previous")."""
    while compression:
        if compression.get("method") == method:
            return compression
        compression = compression.get("previous")
    return None


def build_initial_model(model_config, num_classes: int, init_from: Optional[str] = None) -> tuple[nn.Module, dict]:
    """The network a training run starts from, and its compression record (a pruned init_from keeps its widths).

    model.weights / model.weights_backbone name torchvision weights (downloaded by the registry) or local files
    (their matching tensors are loaded here); train.init_from is a model file, a pruned one included.
    """
    if init_from and _is_segpipe_model(init_from):
        model, meta = load_model(init_from, for_training=True)
        if (meta["model_name"], meta["num_classes"]) != (model_config.name, num_classes):
            raise CheckpointError(f"train.init_from={init_from} is a {meta['model_name']} with {meta['num_classes']} "
                                  f"classes, but the config trains a {model_config.name} with {num_classes}; set "
                                  f"model.name and data.classes to match it")
        return model, meta["compression"]  # pruned: its widths are not the registry's, so the record travels along
    files = {key: value for key, value in (("model.weights_backbone", model_config.weights_backbone),
                                           ("model.weights", model_config.weights)) if _is_file_value(value)}
    model = build_model(model_config.name, num_classes,
                        "none" if "model.weights" in files else model_config.weights,
                        "none" if "model.weights_backbone" in files else model_config.weights_backbone,
                        **model_options(model_config))
    for key, path in files.items():
        load_matching_weights(model, path, key)
    if init_from:
        load_matching_weights(model, init_from, "train.init_from")
    return model, None


def _is_file_value(value: str) -> bool:
    """A model.weights* value that names a file rather than torchvision weights."""
    return value not in ("none", "imagenet", "coco", "DEFAULT") and ("/" in value or "\\" in value or
                                                                   Path(value).suffix in (".pth", ".pt"))


def _is_segpipe_model(path: str) -> bool:
    """A file load_model reads whole (a segpipe checkpoint or artefact), rather than a bare state dict."""
    if Path(path).suffix in (INT8_SUFFIX, ONNX_SUFFIX):
        return True
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(obj, dict) and "model_name" in obj and "compression" in obj


def load_matching_weights(model: nn.Module, path: str, key: str) -> None:
    """Load the tensors of a .pth file that fit model; key names the config entry for messages.

    model.weights and train.init_from: a whole-model state dict or a segpipe checkpoint; tensors that do not fit
    (new heads for other class counts) keep their initial values. model.weights_backbone: a bare backbone file
    (torchvision's ImageNet ResNet or MobileNetV3), which must fill the whole backbone.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{key}={path}: no such file; give a .pth state dict or a segpipe checkpoint") from None
    except Exception as e:
        raise ModelError(f"{key}={path} is not a loadable state dict ({str(e).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    own = model.state_dict()
    if key == "model.weights_backbone" or (not any(k in own for k in state) and any(f"backbone.{k}" in own
                                                                                   for k in state)):
        # A bare backbone file: ResNet keys sit under backbone., MobileNetV3's features.N under backbone.N.
        state = {f"backbone.{k.removeprefix('features.')}": v for k, v in state.items()}
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if key == "model.weights_backbone":
        backbone = [k for k in own if k.startswith("backbone.")]
        unfilled = [k for k in backbone if k not in matched]
        if unfilled:
            raise ModelError(f"{key}={path} does not fit the backbone of {type(model).__name__}: {len(unfilled)} of "
                             f"{len(backbone)} backbone tensors are missing or of another shape (e.g. "
                             f"{unfilled[0]}); is it the ImageNet file of another architecture?")
    if not matched:
        raise ModelError(f"{key}={path}: none of its tensors fit {type(model).__name__}; "
                         f"is it for another architecture?")
    model.load_state_dict(matched, strict=False)
    print(f"loaded {len(matched)} tensors from {path}; {len(own) - len(matched)} left at their initial values "
          f"(e.g. new heads)")
