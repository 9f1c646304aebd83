"""Int8 post-training static quantization for x86 CPUs: torchao's PT2E flow, saved as an ExportedProgram.

Flow: torch.export -> prepare_pt2e with X86InductorQuantizer -> calibrate on real images -> convert_pt2e
-> export again and torch.export.save. Loading uses torch.export.load and torch.compile (Inductor) with
freezing, which fuses the quantize/dequantize pairs into oneDNN int8 convolutions.

Safety: torch.export.load is not a safe loader. It unpickles entries marked `use_pickle`, custom-object
constants and (when the safe load fails) the sample inputs, and even a pickle-free archive makes it
evaluate strings it carries: Python guard expressions, symbolic shapes through sympy (eval), operator
names resolved with getattr on `torch`. So load_int8 first checks the archive (only plain tensor entries,
sample inputs that load with weights_only=True, no native code) and then loads only when the caller
says the file is trusted (infer.py/evaluate.py --trust-artefact): load only artefacts you made.

What the deploying machine needs: an x86-64 CPU (AVX512-VNNI or AMX make int8 fast; without VNNI
oneDNN may saturate, see torchao's X86InductorQuantizer notes), torch and torchao of the versions
recorded in the artefact, and a C++ compiler (g++), because torch.compile generates C++ on first use.
The first call at a new input shape compiles (10-45 s for DeepLabV3-ResNet50 on 2 cores here, less with
Inductor's on-disk cache warm); later calls are fast.
Without a compiler, load with compile=False: nearly the same numbers (fused kernels round differently),
but quantize/dequantize run as separate reference ops, so expect no speed-up (a check, not for deployment).
"""
from __future__ import annotations

import copy
import io
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from torch.export import Dim
from torchvision.models.resnet import BasicBlock, Bottleneck

from segpipe.checkpoint import CheckpointError

METADATA_FILE = "segpipe.json"
SUFFIX = ".pt2"
MAX_BATCH = 256
# Entries of a torch.export.save archive (below its root folder) made of plain data: JSON, raw tensor bytes,
# the sample inputs (torch.save of tensors). Anything else (pickled legacy weights, custom or opaque objects,
# AOTInductor shared libraries, ExecuTorch programs) is refused.
PLAIN_ENTRIES = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                           r"|models/\w+\.json|data/weights/\w+_weights_config\.json|data/weights/weight_\d+"
                           r"|data/constants/\w+_constants_config\.json|data/constants/tensor_\d+"
                           r"|data/sample_inputs/\w+\.pt|extra/[\w.-]+")
UNTRUSTED = ("{path} is a torch.export archive (.pt2), and loading one evaluates code stored in it (guard "
             "expressions, symbolic shapes, operator names), so a file from elsewhere could run anything on this "
             "machine. Load only int8 artefacts you made with `python -m segpipe.compress quantize`: pass "
             "--trust-artefact (trust=True in Python) for such a file")


class UntiedBottleneck(Bottleneck):
    """torchvision's Bottleneck with one ReLU module per use.

    The original calls self.relu three times; the quantizer groups nodes by the module that made them,
    so a shared ReLU becomes one partition with three outputs and X86InductorQuantizer refuses it
    ("Input partition has more than one output node").
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.relu3(self.bn3(self.conv3(out)) + identity)


class UntiedBasicBlock(BasicBlock):
    """torchvision's BasicBlock (ResNet-18/34) with one ReLU module per use, for the same reason."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + identity)


UNTIED = {Bottleneck: (UntiedBottleneck, ("relu1", "relu2", "relu3")),
          BasicBlock: (UntiedBasicBlock, ("relu1", "relu2"))}


def untie_relus(model: nn.Module) -> nn.Module:
    """Give every ResNet block its own ReLU per use, in place (weights and outputs unchanged)."""
    for module in model.modules():
        if type(module) in UNTIED:
            untied_class, names = UNTIED[type(module)]
            module.__class__ = untied_class
            for name in names:
                setattr(module, name, nn.ReLU(inplace=True))
            del module.relu
    return model


def _dynamic_shapes() -> tuple[dict, ...]:
    """Batch, height and width stay symbolic so one artefact serves every image size."""
    return ({0: Dim("batch", min=1, max=MAX_BATCH), 2: Dim.AUTO, 3: Dim.AUTO},)


def quantize_int8(model: nn.Module, calibration: Iterable[torch.Tensor]) -> torch.export.ExportedProgram:
    """Quantize a float model (forward: normalised NCHW batch -> dict of logits) with calibration batches."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ValueError("int8 calibration got no images; check --data-root and --calib-images")
    # A batch of 2 keeps export from specialising the batch dimension to 1.
    example = (torch.cat([first[:1], first[:1]]),)
    model = untie_relus(copy.deepcopy(model).eval())
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    with torch.no_grad():
        graph = torch.export.export(model, example, dynamic_shapes=_dynamic_shapes(), strict=False).module()
        prepared = prepare_pt2e(graph, quantizer)
        prepared(first)
        for batch in batches:
            prepared(batch)
        converted = convert_pt2e(prepared)
        _drop_unused_attributes(converted)
        return torch.export.export(converted, example, dynamic_shapes=_dynamic_shapes(), strict=False)


def _drop_unused_attributes(graph: torch.fx.GraphModule) -> None:
    """Delete parameters and buffers the graph no longer reads.

    After BatchNorm folding and weight quantization, the original fp32 weights stay attached to the
    module; export would save them too (a 200 MB file instead of 42 MB for DeepLabV3-ResNet50).
    """
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in list(graph.named_parameters()) + list(graph.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, attr)


def save_int8(program: torch.export.ExportedProgram, path: str | Path, metadata: dict) -> None:
    """Write the program and its JSON metadata into one .pt2 archive."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"--out {path}: int8 artefacts are torch.export archives; name the file *{SUFFIX}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{SUFFIX}")  # torch.export.save wants the .pt2 suffix
    torch.export.save(program, tmp, extra_files={METADATA_FILE: json.dumps(metadata, default=str)})
    tmp.replace(path)


def read_int8_metadata(path: str | Path) -> dict | None:
    """The metadata inside a .pt2 archive without loading the program; None if it has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_FILE}")), None)
            return None if name is None else json.loads(archive.read(name))
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError):
        return None


class CompiledInt8(nn.Module):
    """Runs the loaded int8 program through torch.compile with Inductor freezing on."""

    def __init__(self, program: nn.Module, compile: bool = True):
        super().__init__()
        self.program = program
        self.compiled = torch.compile(program) if compile else program

    def train(self, mode: bool = True) -> "CompiledInt8":
        """Only flips the flag: an exported program has no train mode, and callers often call .eval()."""
        self.training = mode
        return self

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch._inductor.config as inductor_config
        # Freezing turns weights into constants so Inductor can prepack them for the oneDNN int8 kernels;
        # patched per call because compilation happens lazily, at the first call for each shape.
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.compiled(images)


def check_archive(data: bytes, path: str | Path) -> None:
    """Refuse an archive with anything but plain entries, pickled payloads, or sample inputs needing pickle."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path} is not a .pt2 archive (not a zip file); it is damaged or was renamed") from None
    with archive:
        names = archive.namelist()
        roots = {name.split("/", 1)[0] for name in names}
        entries = {name.split("/", 1)[-1]: name for name in names if not name.endswith("/")}
        odd = [name for name in entries if not PLAIN_ENTRIES.fullmatch(name)]
        if len(roots) != 1 or "archive_version" not in entries or odd:
            raise CheckpointError(f"{path}: refused, the archive holds entries a segpipe int8 artefact never has "
                                  f"({', '.join(odd[:3]) or 'no single root folder with archive_version'}); "
                                  f"they could run code when loaded. Re-make it with `python -m segpipe.compress "
                                  f"quantize`")
        for name, full in entries.items():
            if name.endswith(("_weights_config.json", "_constants_config.json")):
                _check_payloads(json.loads(archive.read(full)), path, name)
            elif name.startswith("data/sample_inputs/"):
                try:  # torch.export.load tries this same safe load first, and falls back to pickle only if it fails
                    torch.load(io.BytesIO(archive.read(full)), weights_only=True)
                except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
                    raise CheckpointError(f"{path}: refused, its sample inputs ({name}) are not plain tensors "
                                          f"({str(e).splitlines()[0][:200]}); loading them would unpickle "
                                          f"arbitrary objects") from None


def _check_payloads(config: dict, path: str | Path, name: str) -> None:
    """Every weight and constant of a payload config must be raw tensor bytes, not a pickle or an object."""
    for fqn, payload in (config.get("config") or {}).items():
        if payload.get("use_pickle") or not str(payload.get("path_name", "")).startswith(("weight_", "tensor_")):
            raise CheckpointError(f"{path}: refused, {name} stores {fqn} as a pickled or custom object "
                                  f"({payload.get('path_name')}); loading it could run code")


def load_int8(path: str | Path, compile: bool = True, trust: bool = False) -> tuple[nn.Module, dict]:
    """Load an int8 .pt2 artefact, checked and trusted (see the module docstring), as a module mapping a
    normalised batch to {"out": logits}."""
    metadata = read_int8_metadata(path)
    if metadata is None:
        raise CheckpointError(f"{path} is not a segpipe int8 artefact (no {METADATA_FILE} inside); make one with "
                              f"`python -m segpipe.compress quantize --checkpoint P --out {Path(path).name}`")
    data = Path(path).read_bytes()  # checked and loaded from the same bytes: the file cannot change in between
    check_archive(data, path)
    if not trust:
        raise CheckpointError(UNTRUSTED.format(path=path))
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401  registers the quantized_decomposed ops
    program = torch.export.load(io.BytesIO(data)).module()
    return CompiledInt8(program, compile=compile), metadata
