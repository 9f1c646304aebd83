"""Compressed artefacts on disk: what they hold, how to tell them apart, and one loader for all of them.

Two kinds of file:
- a segpipe checkpoint (.pth, torch.save of plain types) with an extra "compression" entry: structured-
  or unstructured-pruned weights, or bf16 (fp32 weights run under bf16 autocast);
- an int8 torch.export archive (.pt2) with the same metadata as JSON inside (see int8.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from segpipe.checkpoint import load_checkpoint, save_checkpoint
from segpipe.compress.int8 import SUFFIX as INT8_SUFFIX
from segpipe.compress.int8 import load_int8, read_int8_metadata
from segpipe.compress.structured import shrink_to_channels
from segpipe.models import build_model

# Entries of a training checkpoint that an inference artefact does not carry.
TRAINING_STATE = ("model", "optimizer", "scheduler", "scaler")
METHODS = ("structured", "unstructured", "bf16", "int8")


def build_float_model(name: str, num_classes: int, options: dict | None = None) -> nn.Module:
    """A randomly initialised model of the registry (no downloads)."""
    return build_model(name, num_classes, weights="none", options=options)


def read_checkpoint(path: str | Path) -> dict:
    """Load a segpipe checkpoint safely (weights_only=True)."""
    return load_checkpoint(path)


def write_checkpoint(obj: dict, path: str | Path) -> None:
    """Save a checkpoint dict atomically."""
    save_checkpoint(obj, path)


def artefact_metadata(checkpoint: dict) -> dict:
    """The checkpoint's self-description (classes, palette, mean/std, ...) without weights or training state."""
    return {k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}


def compressed_checkpoint(checkpoint: dict, model: nn.Module, compression: dict) -> dict:
    """A checkpoint dict for a compressed float model: the source's metadata, new weights, "compression"."""
    return {**artefact_metadata(checkpoint), "model": model.state_dict(), "compression": compression}


def model_from_checkpoint(checkpoint: dict, keep_aux: bool = True) -> nn.Module:
    """Rebuild the float model of a (possibly structured-pruned) checkpoint and load its weights.

    This is what training's init_from should call for a pruned artefact: the pruned widths are not
    the registry's, so the architecture must be shrunk before load_state_dict.
    """
    model = build_float_model(checkpoint["model_name"], checkpoint["num_classes"], checkpoint.get("model_options"))
    structured = _find_step(checkpoint.get("compression"), "structured")
    if structured is not None:
        shrink_to_channels(model, structured["channels"])
    state = checkpoint["model"]
    if getattr(model, "aux_classifier", None) is not None and not any(k.startswith("aux_classifier.") for k in state):
        model.aux_classifier = None  # the artefact was saved without its training-only head
    model.load_state_dict(state)
    if not keep_aux and getattr(model, "aux_classifier", None) is not None:
        model.aux_classifier = None  # inference reads only "out"; the auxiliary head would cost time
    return model


def _find_step(compression: dict | None, method: str) -> dict | None:
    """The record of `method` in a chain of compressions (each keeps the one before it under "previous")."""
    while compression:
        if compression.get("method") == method:
            return compression
        compression = compression.get("previous")
    return None


class Bf16Autocast(nn.Module):
    """Runs a float model under bf16 autocast in channels_last and returns fp32 logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16):
            out = self.model(images.contiguous(memory_format=torch.channels_last))
        return {k: v.float() for k, v in out.items()}


def is_artefact(path: str | Path) -> bool:
    """True for a compressed segpipe artefact; cheap (reads the .pt2 index or memory-maps the checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == INT8_SUFFIX:
        return read_int8_metadata(path) is not None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(obj, dict) and "compression" in obj


def load_artefact(path: str | Path, device: str | torch.device = "cpu", compile: bool = True,
                  trust: bool = False) -> tuple[nn.Module | Callable, dict]:
    """Load any segpipe model file for inference: (model, metadata).

    The model maps a normalised float NCHW batch to {"out": logits at input resolution}; metadata is
    the checkpoint's dict without weights and training state, with "compression" describing what was
    done (absent for a plain checkpoint). Int8 artefacts need an x86 CPU, torchao and a C++ compiler
    (see segpipe/compress/int8.py); compile=False skips torch.compile (slow, for checks only). Loading an int8
    archive can run code stored in it, so it needs trust=True (checkpoints load safely either way).
    """
    path = Path(path)
    if path.suffix == INT8_SUFFIX:
        if torch.device(device).type != "cpu":
            raise ValueError(f"{path} is an int8 artefact for x86 CPUs; load it with device='cpu', or use the "
                             f"float checkpoint it was made from on {device}")
        return load_int8(path, compile=compile, trust=trust)
    checkpoint = read_checkpoint(path)
    model = model_from_checkpoint(checkpoint, keep_aux=False).to(device).eval()
    if (checkpoint.get("compression") or {}).get("method") == "bf16":
        model = Bf16Autocast(model).eval()
    return model, artefact_metadata(checkpoint)
