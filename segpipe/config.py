"""YAML configuration with dotted command-line overrides, validated into plain dataclasses."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration key or value the user must fix."""


@dataclass
class DataConfig:
    root: str = "data"
    # None: discovered from the training masks once and stored in the index (named class_0, ...).
    classes: Optional[list] = None
    ignore_index: int = 255
    mask_format: str = "index"  # index | rgb
    palette: Optional[list] = None  # one [r, g, b] per class; required for rgb masks
    palette_ignore: Optional[list] = None  # rgb colours mapped to ignore_index
    label_map: Optional[dict] = None  # raw mask id -> class index (or ignore_index)
    crop_size: list = field(default_factory=lambda: [360, 480])  # [h, w] of training crops
    train_size: Optional[list] = None  # [h, w] the random scale is relative to; None = stored size
    eval_size: Optional[list] = None  # [h, w] the model sees at evaluation; None = stored size
    scale_range: list = field(default_factory=lambda: [0.5, 2.0])
    hflip_prob: float = 0.5
    blur_prob: float = 0.5
    blur_kernel: int = 5
    blur_sigma: list = field(default_factory=lambda: [0.1, 2.0])
    color_jitter: float = 0.0  # strength for brightness/contrast/saturation; 0 disables
    # Where blur + normalisation run: workers (the loader), device (the training step, on the batch), or
    # auto (device when training on a GPU and color_jitter is off, else workers).
    augment_on: str = "auto"
    mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet
    std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_workers: Union[int, str] = "auto"  # loader processes per training process; auto: what the CPUs allow
    cache_dir: Optional[str] = None  # where the file index goes if ROOT is read-only
    skip_unpaired: bool = False  # images without a mask: False = stop with an error, True = warn and skip
    synthetic: bool = False  # generate the built-in synthetic street scenes at data.root if missing


@dataclass
class ModelConfig:
    name: str = "deeplabv3_resnet50"
    weights: str = "none"  # none | imagenet | coco | path/to/weights.pth
    aux_weight: float = 0.5  # weight of the auxiliary head's loss, where the model has one
    sync_bn: bool = True  # only applies on CUDA with world size > 1
    channels_last: bool = True
    # BatchNorm momentum of every BN layer; null keeps the architecture's own. 0.1 (torch's default) for all:
    # MobileNetV3's 0.01 leaves the running statistics far behind in short runs, so eval-mode predictions
    # collapse to one class.
    bn_momentum: Optional[float] = 0.1
    # Architecture options (null keeps the model's default; setting one a model does not read is an error):
    encoder: Optional[str] = None  # unet: resnet18 | resnet34 | resnet50 (default)
    output_stride: Optional[int] = None  # resnet50_convhead: 8 (default) or 16
    head_depth: Optional[int] = None  # resnet50_convhead: conv3x3-BN-ReLU layers in the head (default 3)
    head_width: Optional[int] = None  # resnet50_convhead: their channels (default 256)


@dataclass
class TrainConfig:
    epochs: int = 50
    max_steps: Optional[int] = None  # stop after this many optimizer steps (smoke runs)
    batch_size: int = 8  # per process; the global batch is batch_size * world_size * accum_steps
    lr: float = 0.01  # for a global batch of lr_reference_batch; scaled linearly to the real one
    lr_reference_batch: Optional[int] = 8  # None: use lr as given, whatever the global batch
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    poly_power: float = 0.9
    loss: str = "ce"  # ce | dice | ce+dice
    class_weights: Optional[Any] = None  # None | list of floats | "median_freq"
    amp: str = "auto"  # auto | bf16 | fp16 | none
    accum_steps: int = 1
    grad_clip: Optional[float] = None  # max global grad norm; None disables
    seed: int = 0
    resume: Optional[str] = None  # None | auto | path/to/last.pt
    init_from: Optional[str] = None  # start from these model weights (e.g. a pruned artefact)
    val_every: int = 1  # epochs between validations
    log_every: int = 20  # steps between plain log lines and TensorBoard scalars
    num_vis: int = 4  # image | truth | prediction panels written to TensorBoard per validation
    backend: Optional[str] = None  # None: nccl on CUDA, gloo on CPU
    device: Optional[str] = None  # None: cuda if available, else cpu


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/default"


# Keys whose value must be one of a few words; checked when the config is read, not deep in training.
CHOICES = {"data.mask_format": ("index", "rgb"), "data.augment_on": ("auto", "workers", "device"),
           "train.optimizer": ("sgd", "adamw"),
           "train.loss": ("ce", "dice", "ce+dice"), "train.amp": ("auto", "bf16", "fp16", "none")}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply `section.key=value` overrides and validate into a Config."""
    raw: dict = {}
    if path is not None:
        raw = _read_yaml(Path(path))
        if "_base_" in raw:  # one level of inheritance: the file's keys override its base's, section by section
            base_path = Path(path).parent / str(raw.pop("_base_"))
            base = _read_yaml(base_path)
            if "_base_" in base:
                raise ConfigError(f"{base_path} (the _base_ of {path}) has a _base_ itself; configs inherit one "
                                  f"level only: copy what it inherits into {base_path}")
            raw = _merge(base, raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    return _build(Config, raw, prefix="")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; the configs/ folder has examples")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def _merge(base: dict, child: dict) -> dict:
    """base with child's keys on top: sections (data, model, train) merge key by key; values, mappings such as
    data.label_map included, are replaced whole."""
    merged = dict(base)
    for key, value in child.items():
        merged[key] = base[key] | value if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts (for checkpoints, logs and YAML)."""
    return dataclasses.asdict(cfg)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[last] = value


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(prefix + n for n in names)}"
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} must be a section (mapping), got {value!r}")
            kwargs[key] = _build(hint_type, value, prefix=f"{dotted}.")
        else:
            kwargs[key] = _check_type(dotted, value, hint_type)
            if dotted == "data.num_workers" and (value != "auto" if isinstance(value, str) else value < 0):
                raise ConfigError(f"data.num_workers={value!r}; use auto or a number of processes (0 or more)")
            if dotted in CHOICES and value not in CHOICES[dotted]:
                raise ConfigError(f"{dotted}={value!r}; choose one of {', '.join(CHOICES[dotted])}")
    return cls(**kwargs)


def _check_type(key: str, value: Any, hint: Any) -> Any:
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in allowed:
        if option is Any or (option is type(None) and value is None):
            return value
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
            except ValueError:
                pass
        if base is int and isinstance(value, bool):
            continue
        if base is not type(None) and isinstance(value, base):
            return value
    names = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in allowed)
    raise ConfigError(f"{key} must be {names}, got {value!r} ({type(value).__name__})")
