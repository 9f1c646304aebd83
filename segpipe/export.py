"""Command line: `python -m segpipe.export onnx ...`, a checkpoint to a self-describing, verified ONNX model.

    onnx --checkpoint best.pt --out model.onnx [--opset 17] [--images 32] [--data-root R]
    onnx --checkpoint best.pt --out model.onnx --int8 [--calib-images 64]     also writes model.int8.onnx

The model takes a normalised float batch `images` (N, 3, H, W) of any N, H and W and returns `logits`
(N, C, H, W). The checkpoint's metadata (classes, palette, normalisation, eval size, training config) is stored
in the file's metadata_props, so segpipe.onnx_runtime.load_onnx, infer.py and evaluate.py need nothing else.
Before anything is written, the ONNX model is run by ONNX Runtime on the validation images of the checkpoint's
data.root (or --data-root) and its class maps are compared with PyTorch's: below MIN_AGREEMENT the export fails.
--int8 adds ONNX Runtime's static quantization (QDQ: int8 weights per channel, uint8 activations), calibrated
on training images; its agreement is reported and stored but not required (int8 is meant to differ a little).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from torchvision import tv_tensors

import segpipe
from segpipe.checkpoint import META_KEYS, CheckpointError
from segpipe.compress.quality import calibration_images, labelled_images, mean_iou, pixel_agreement, predict_classes
from segpipe.data import DataError
from segpipe.model_files import load_float_model
from segpipe.onnx_runtime import FORMAT, MARKER, SUFFIX, OnnxError, OnnxModel, decode_metadata, import_onnxruntime
from segpipe.outputs import OutputError, describe, prepare_file
from segpipe.transforms import EvalTransform

MIN_AGREEMENT = 0.999  # share of validation pixels whose ONNX class must equal PyTorch's
DEFAULT_OPSET = 17  # read by ONNX Runtime 1.14 and later
INT8_SUFFIX = ".int8.onnx"
INSTALL = "pip install onnx onnxruntime"
CALIBRATION = ("minmax", "percentile", "entropy")  # onnxruntime.quantization.CalibrationMethod, lower-case


def get_args_parser() -> argparse.ArgumentParser:
    """The onnx sub-command."""
    parser = argparse.ArgumentParser(prog="python -m segpipe.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    onnx = sub.add_parser("onnx", help="ONNX model (fp32, optionally int8 too) for ONNX Runtime")
    onnx.add_argument("--checkpoint", required=True, help="a segpipe checkpoint (best.pt) or pruned/bf16 artefact")
    onnx.add_argument("--out", required=True, help=f"the fp32 model, NAME{SUFFIX}")
    onnx.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    onnx.add_argument("--int8", action="store_true", help=f"also write an int8 model, NAME{INT8_SUFFIX}")
    onnx.add_argument("--calib-images", type=int, default=64, help="int8: training images to calibrate on")
    onnx.add_argument("--calib-method", choices=CALIBRATION, default="minmax",
                      help="int8: activation ranges from each tensor's min/max, or from histograms (percentile, "
                           "entropy: these keep every activation of every calibration image in memory)")
    onnx.add_argument("--images", type=int, default=32, help="validation images to verify on (0: all)")
    onnx.add_argument("--data-root", default=None, help="folder with train/ and valid/ (default: the data.root "
                                                        "the checkpoint was trained on)")
    onnx.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (ONNX Runtime uses as many)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """One line naming the option, instead of a traceback deep in export or calibration."""
    if Path(args.out).suffix != SUFFIX or args.out.endswith(INT8_SUFFIX):
        raise SystemExit(f"error: --out {args.out}: name the fp32 model NAME{SUFFIX} (the int8 one is written "
                         f"next to it as NAME{INT8_SUFFIX})")
    for name, low in (("calib_images", 1), ("images", 0), ("threads", 1), ("opset", 11)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise SystemExit(f"error: --{name.replace('_', '-')} {value}: must be {low} or more")


def int8_path(out: str | Path) -> Path:
    """Where --int8 writes: NAME.int8.onnx next to NAME.onnx."""
    out = Path(out)
    return out.with_name(out.name[: -len(SUFFIX)] + INT8_SUFFIX)


class LogitsOnly(nn.Module):
    """The model's "out" alone: an ONNX graph returns tensors, not dicts."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["out"]


def export_model(model: nn.Module, sample: torch.Tensor, opset: int = DEFAULT_OPSET):
    """The onnx.ModelProto of a segpipe model, dynamic in batch, height and width.

    TorchScript-based exporter (dynamo=False): these models are plain convolution graphs whose sizes it traces
    symbolically, it exports each in a second or two (the torch.export-based exporter took 10-35 s per model
    here and needs onnxscript) and writes opsets older ONNX Runtimes read. It is deprecated since torch 2.9
    but present in the torch versions segpipe supports (<2.15).
    """
    onnx = _import_onnx()
    from torch.onnx import symbolic_opset11
    # U-Net crops its padded logits with narrow_copy (see unet.py), which this exporter has no rule for;
    # it is narrow with a copy, and narrow's rule emits the same Slice.
    torch.onnx.register_custom_op_symbolic("aten::narrow_copy", symbolic_opset11.narrow, 11)
    dims = {0: "batch", 2: "height", 3: "width"}
    wrapper = LogitsOnly(model).eval()  # eval() on the wrapper: export restores its mode onto the model after
    with warnings.catch_warnings(), torch.no_grad(), io.BytesIO() as buffer:
        warnings.simplefilter("ignore", DeprecationWarning)  # the exporter's own deprecation notice (above)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape arithmetic, traced symbolically
        torch.onnx.export(wrapper, (sample,), buffer, dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": dims, "logits": dims})
        return onnx.load_model_from_string(buffer.getvalue())


def quantize_model(proto, calibration: list[torch.Tensor], method: str = "minmax"):
    """ONNX Runtime static int8 quantization (QDQ) of an fp32 model, calibrated on normalised 1x3xHxW images."""
    onnx = _import_onnx()
    import_onnxruntime()
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch.numpy()}

    with tempfile.TemporaryDirectory(prefix="segpipe-int8-") as folder:
        fp32, prepared, int8 = (Path(folder) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        onnx.save(_without_metadata(proto), fp32)
        # Shape inference and graph fusions first, as ONNX Runtime's quantization guide asks.
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(int8), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method={"minmax": CalibrationMethod.MinMax,
                                          "percentile": CalibrationMethod.Percentile,
                                          "entropy": CalibrationMethod.Entropy}[method])
        return onnx.load(str(int8))


def _without_metadata(proto):
    copy = type(proto)()
    copy.CopyFrom(proto)
    del copy.metadata_props[:]
    return copy


def with_metadata(proto, checkpoint: dict, record: dict):
    """proto with the checkpoint's metadata and the export record in metadata_props (each value JSON)."""
    meta = {key: checkpoint.get(key) for key in META_KEYS} | {"config": checkpoint.get("config") or {},
                                                              "export": record}
    del proto.metadata_props[:]
    for key, value in [(MARKER, FORMAT)] + [(k, json.dumps(v)) for k, v in meta.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name, proto.producer_version = "segpipe", segpipe.__version__
    decode_metadata({p.key: p.value for p in proto.metadata_props}, "the exported model")  # readable by load_onnx
    return proto


def write_model(proto, path: Path) -> None:
    """Write proto to path via a temp file in the same folder and os.replace: never half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(proto.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {describe(e).lower()}; nothing was replaced. Free space or "
                          f"choose another --out") from None


def check_replaceable(path: Path) -> None:
    """Refuse to replace a file that is not an ONNX model written by this command."""
    if not path.exists():
        return
    try:
        props = {p.key: p.value for p in _import_onnx().load(str(path), load_external_data=False).metadata_props}
    except Exception:
        props = {}
    if props.get(MARKER) != FORMAT:
        raise OutputError(f"{path} exists and is not an ONNX model written by segpipe.export; it is left as it "
                          f"is. Choose another --out, or delete it first")


def data_root(args: argparse.Namespace, checkpoint: dict) -> str:
    """--data-root, else the root the checkpoint was trained on."""
    return args.data_root or ((checkpoint.get("config") or {}).get("data") or {}).get("root") or "data"


def verify(onnx_model: OnnxModel, reference: list[torch.Tensor], checkpoint: dict,
           images: list[torch.Tensor], masks: list[torch.Tensor]) -> dict:
    """Pixel agreement of the ONNX model's class maps with PyTorch's, and its mIoU, predicted as evaluate.py does."""
    preds = predict_classes(onnx_model, checkpoint, images)
    return {"agreement": pixel_agreement(preds, reference), "images": len(images),
            "miou": mean_iou(preds, masks, checkpoint["num_classes"], checkpoint["ignore_index"])}


def run_onnx(args: argparse.Namespace) -> None:
    """onnx: export, verify against PyTorch on validation images, optionally quantize, write with metadata."""
    outputs = [Path(args.out)] + ([int8_path(args.out)] if args.int8 else [])
    for path in outputs:  # before any work, not after
        prepare_file(path, "--out")
        check_replaceable(path)
    _import_onnx(), import_onnxruntime()
    model, checkpoint = load_float_model(args.checkpoint)
    root = data_root(args, checkpoint)
    images, masks = labelled_images(checkpoint, root, "valid", args.images or None)
    if not images:
        raise DataError(f"{root}/valid holds no images to verify the export on; pass --data-root")
    transform = EvalTransform(checkpoint.get("eval_size"), checkpoint["mean"], checkpoint["std"]).image_transform
    sample = transform(tv_tensors.Image(images[0])).as_subclass(torch.Tensor)[None]
    proto = export_model(model, sample, args.opset)
    reference = predict_classes(model, checkpoint, images)
    torch_miou = mean_iou(reference, masks, checkpoint["num_classes"], checkpoint["ignore_index"])
    print(f"PyTorch: mIoU {torch_miou:.4f} on {len(images)} validation images of {root}", flush=True)
    record = {"precision": "fp32", "opset": args.opset, "source": str(args.checkpoint), "torch": torch.__version__,
              "onnxruntime": import_onnxruntime().__version__, "compression": checkpoint.get("compression"),
              "verified_on": str(root), "torch_miou": torch_miou}
    fp32 = verify(OnnxModel(proto.SerializeToString()), reference, checkpoint, images, masks)
    report("ONNX fp32", fp32)
    if fp32["agreement"] < MIN_AGREEMENT:
        raise OnnxError(f"the ONNX model agrees with PyTorch on only {fp32['agreement']:.4%} of the pixels (at "
                        f"least {MIN_AGREEMENT:.1%} expected); nothing was written. Try another --opset, or "
                        f"report the model and torch/onnxruntime versions")
    if args.int8:
        calibration = list(calibration_images(checkpoint, root, args.calib_images))
        print(f"int8: calibrating on {len(calibration)} training images of {root} ...", flush=True)
        int8 = quantize_model(proto, calibration, args.calib_method)
        int8_record = {**record, "precision": "int8", "calib_images": len(calibration),
                       "quantizer": f"onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 "
                                    f"activations, {args.calib_method} calibration"}
        scores = verify(OnnxModel(int8.SerializeToString()), reference, checkpoint, images, masks)
        report("ONNX int8", scores)
    write_model(with_metadata(proto, checkpoint, record | fp32), outputs[0])
    print(f"wrote {outputs[0]}")
    if args.int8:
        write_model(with_metadata(int8, checkpoint, int8_record | scores), outputs[1])
        print(f"wrote {outputs[1]}")


def report(name: str, scores: dict) -> None:
    """One line: agreement with PyTorch and mIoU."""
    print(f"{name}: {scores['agreement']:.4%} of the pixels agree with PyTorch, mIoU {scores['miou']:.4f}",
          flush=True)


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise OnnxError(f"ONNX export needs the onnx package, which is not installed: {INSTALL}") from None
    return onnx


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, export, verify, write."""
    args = get_args_parser().parse_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run_onnx(args)
    except (DataError, CheckpointError, OnnxError, OutputError) as e:  # the user's files or options: one line
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
