"""Run an ONNX model written by `python -m segpipe.export onnx` with ONNX Runtime, as a drop-in for a torch model.

The file carries its own metadata (metadata_props, each value JSON): the checkpoint's model_name, model_options,
num_classes, classes, palette, ignore_index, mean, std, eval_size and training config, plus MARKER and an
"export" record (precision, pixel agreement with PyTorch, ...). onnxruntime is an optional dependency
(`pip install onnxruntime`, or `onnxruntime-gpu` for CUDA); nothing else in segpipe needs it.

Safety: loading an .onnx file does not run code from it. ONNX graphs hold operators, not programs, and ONNX
Runtime loads no custom-operator library unless the caller registers one (SessionOptions.register_custom_ops_library),
which segpipe never does. External-data references are resolved inside the model's own folder by ONNX Runtime.
What remains is ONNX Runtime's own parser, as for any file format.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

SUFFIX = ".onnx"
MARKER = "segpipe_format"  # a metadata_props key; its value names the layout of the others
FORMAT = "segpipe-onnx/1"
# What a Predictor cannot run without; the rest of the checkpoint's metadata (palette, eval_size, ...) may be null.
NEEDED = ("model_name", "num_classes", "classes", "ignore_index", "mean", "std")
INSTALL = "pip install onnxruntime (or onnxruntime-gpu for CUDA)"


class OnnxError(ValueError):
    """An .onnx file that cannot be used, or a missing onnxruntime, with the reason and the fix."""


def import_onnxruntime():
    """The onnxruntime module, or OnnxError naming the pip command."""
    try:
        import onnxruntime
    except ImportError:
        raise OnnxError(f"running .onnx models needs ONNX Runtime, which is not installed: {INSTALL}") from None
    return onnxruntime


def providers_for(device: str | torch.device) -> list:
    """CUDA then CPU when device is cuda and the CUDA provider is installed, else CPU alone."""
    ort = import_onnxruntime()
    device = torch.device(device)
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        warnings.warn(f"device {device}: this onnxruntime has no CUDA provider, the ONNX model runs on the CPU "
                      f"(pip install onnxruntime-gpu for CUDA)", stacklevel=3)
    return ["CPUExecutionProvider"]


class OnnxModel:
    """An ONNX Runtime session called like segpipe's torch models: float NCHW tensor -> {"out": logits}.

    source: a file path or the serialized model. Inputs may live on any device (they are copied to host
    memory); logits come back on the input's device, at the input's resolution.
    """

    def __init__(self, source: str | Path | bytes, device: str | torch.device = "cpu"):
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same budget as torch gets (--threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
        source = str(source) if isinstance(source, Path) else source
        self.session = ort.InferenceSession(source, options, providers=providers_for(device))
        self.input_name = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = self.session.run(None, {self.input_name: array})[0]
        return {"out": torch.from_numpy(np.ascontiguousarray(logits)).to(images.device)}

    def eval(self) -> OnnxModel:
        """Always in inference mode; here so code written for nn.Module can call it."""
        return self


def decode_metadata(props: dict[str, str], path: str | Path) -> dict:
    """The metadata dict of a segpipe .onnx file from its metadata_props; OnnxError when it is not one."""
    if props.get(MARKER) != FORMAT:
        found = f"format {props[MARKER]!r}" if MARKER in props else "no segpipe metadata"
        raise OnnxError(f"{path} is an ONNX model with {found}: it was not written by `python -m segpipe.export "
                        f"onnx` (classes, normalisation and palette are unknown); export the segpipe checkpoint "
                        f"with that command")
    try:
        meta = {key: json.loads(value) for key, value in props.items() if key != MARKER}
    except ValueError as e:
        raise OnnxError(f"{path}: its segpipe metadata is not valid JSON ({e}); the file was edited or is "
                        f"damaged, export it again") from None
    missing = [key for key in NEEDED if key not in meta]
    if missing:
        raise OnnxError(f"{path}: its segpipe metadata lacks {', '.join(missing)}; the file was edited or is "
                        f"damaged, export it again")
    meta.setdefault("config", {})
    return meta


def load_onnx(path: str | Path, device: str | torch.device = "cpu") -> tuple[OnnxModel, dict]:
    """(model, metadata) of an .onnx file written by segpipe.export, run by ONNX Runtime on device's provider."""
    path = Path(path)
    if not path.is_file():
        raise OnnxError(f"{path} does not exist; export one with `python -m segpipe.export onnx --checkpoint "
                        f"best.pt --out {path.name}`")
    try:
        model = OnnxModel(path, device)
    except OnnxError:
        raise
    except Exception as e:  # ORT raises its own pybind classes (InvalidProtobuf, Fail, ...) for unreadable files
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise OnnxError(f"{path} is not a loadable ONNX model ({reason[:200]}); it is damaged, truncated or not "
                        f"ONNX. Export it again with `python -m segpipe.export onnx`") from None
    meta = decode_metadata(model.session.get_modelmeta().custom_metadata_map, path)
    return model, meta
