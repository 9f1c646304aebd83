"""YAML configuration with dotted command-line overrides, validated into plain dataclasses."""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration key or value the user must fix."""


def allowed(check: Callable[[Any], bool], wanted: str) -> dict:
    """Field metadata: the value (when not null) must pass check; `wanted` says what is allowed."""
    return {"allowed": (check, wanted)}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


POSITIVE = allowed(lambda v: v > 0, "a number above 0")
AT_LEAST_1 = allowed(lambda v: v >= 1, "1 or more")
AT_LEAST_0 = allowed(lambda v: v >= 0, "0 or more")
PROBABILITY = allowed(lambda v: 0 <= v <= 1, "between 0 and 1")
SIZE = allowed(lambda v: len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v),
               "[height, width]: two whole numbers above 0")
RANGE = allowed(lambda v: len(v) == 2 and all(_number(x) and x > 0 for x in v) and v[0] <= v[1],
                "[low, high]: two numbers above 0 with low <= high")


def one_of(choices: tuple) -> dict:
    """Field metadata: the value must be one of these words (the one declaration other modules read too)."""
    return {"allowed": (lambda v: v in choices, f"one of {', '.join(choices)}"), "choices": choices}


def some_of(choices: tuple) -> dict:
    """Field metadata: one of these words, or a list of distinct ones (the value's words are checked in _build)."""
    return {"allowed": (lambda v: v in choices if isinstance(v, str) else len(set(v)) == len(v),
                        f"one of {', '.join(choices)}, or a list of them without repeats"), "each_of": choices}


# The words a key accepts, declared once: the fields below and the modules that act on them use these.
MASK_FORMATS = ("index", "rgb")
AUGMENT_ON = ("auto", "workers", "device")
OPTIMIZERS = ("sgd", "adamw")
LOSSES = ("ce", "dice", "ce+dice")
AMP_MODES = ("auto", "bf16", "fp16", "none")
SIZE_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
              "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text: Union[str, int]) -> int:
    """Bytes in a size such as 256MB, 20GB, 1.5TiB or 1000000 (decimal units, or binary with an i); ValueError else."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or (unit and unit not in SIZE_UNITS):
        raise ValueError(f"{text!r} is not a size; write it as 256MB, 20GB or 1.5TiB")
    return int(float(match.group(1)) * SIZE_UNITS[unit or "B"])


def _positive_size(v) -> bool:
    try:
        return parse_size(v) > 0
    except ValueError:
        return False


BYTE_SIZE = allowed(_positive_size, "a size above 0 such as 500MB, 20GB or 1.5TiB")
TRACKERS = ("tensorboard", "mlflow", "wandb")  # segpipe.tracking has one backend for each
CLASS_WEIGHTS = allowed(lambda v: v == "median_freq" or (isinstance(v, list) and all(_number(x) and x >= 0 for x in v)),
                        "median_freq or a list of one weight (a number >= 0) per class")


@dataclass
class DataConfig:
    # A folder holding train/ and valid/, or a shard descriptor written by `python -m segpipe.shards write`:
    # its path (OUT/shards.json) or URL (https://, http://, s3://, gs://; needs pip install segpipe[shards]).
    root: str = "data"
    # None: discovered from the training masks once and stored in the index (named class_0, ...).
    classes: Optional[list] = None
    ignore_index: int = 255
    mask_format: str = field(default="index", metadata=one_of(MASK_FORMATS))
    palette: Optional[list] = None  # one [r, g, b] per class; required for rgb masks
    palette_ignore: Optional[list] = None  # rgb colours mapped to ignore_index
    label_map: Optional[dict] = None  # raw mask id -> class index (or ignore_index)
    crop_size: list = field(default_factory=lambda: [360, 480], metadata=SIZE)  # [h, w] of training crops
    train_size: Optional[list] = field(default=None, metadata=SIZE)  # [h, w] the random scale is relative to; None = stored size
    eval_size: Optional[list] = field(default=None, metadata=SIZE)  # [h, w] the model sees at evaluation; None = stored size
    scale_range: list = field(default_factory=lambda: [0.5, 2.0], metadata=RANGE)
    hflip_prob: float = field(default=0.5, metadata=PROBABILITY)
    blur_prob: float = field(default=0.5, metadata=PROBABILITY)
    blur_kernel: int = field(default=5, metadata=allowed(lambda v: v > 0 and v % 2 == 1, "an odd number above 0"))
    blur_sigma: list = field(default_factory=lambda: [0.1, 2.0], metadata=RANGE)
    color_jitter: float = field(default=0.0, metadata=AT_LEAST_0)  # strength for brightness/contrast/saturation; 0 disables
    # Where the pixel work (blur, colour jitter, normalisation) runs: workers (the loader), device (the training
    # step, on the batch), or auto (device when training on a GPU, else workers).
    augment_on: str = field(default="auto", metadata=one_of(AUGMENT_ON))
    mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet
    std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_workers: Union[int, str] = "auto"  # loader processes per training process; auto: what the CPUs allow
    cache_dir: Optional[str] = None  # where the file index goes if ROOT is read-only, and where remote shards are cached
    cache_limit: Union[str, int] = field(default="20GB", metadata=BYTE_SIZE)  # disk for cached remote shards, LRU
    # Shards whose samples are shuffled together (their order is shuffled too); a window covering every shard
    # gives exactly the order of the same data as a folder.
    shuffle_window: int = field(default=4, metadata=AT_LEAST_1)
    skip_unpaired: bool = False  # images without a mask: False = stop with an error, True = warn and skip
    synthetic: bool = False  # generate the built-in synthetic street scenes at data.root if missing


WHOLE_MODEL_WEIGHTS = allowed(lambda v: v != "imagenet", "none, coco, a torchvision weights name or a file: ImageNet "
                                                       "weights are for the backbone, model.weights_backbone=imagenet")


@dataclass
class ModelConfig:
    name: str = "deeplabv3_resnet50"
    # The whole model's weights: none | coco | another name of torchvision's weights enum for the model (DEFAULT,
    # ...) | path/to/file.pth (a state dict or segpipe checkpoint; the tensors that fit are loaded).
    weights: str = field(default="none", metadata=WHOLE_MODEL_WEIGHTS)
    weights_backbone: str = "none"  # the backbone's: none | imagenet | path/to/file.pth (torchvision's ImageNet file)
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
    epochs: int = field(default=50, metadata=AT_LEAST_1)
    max_steps: Optional[int] = field(default=None, metadata=AT_LEAST_1)  # stop after this many optimizer steps (smoke runs)
    batch_size: int = field(default=8, metadata=AT_LEAST_1)  # per process; the global batch is batch_size * world_size * accum_steps
    lr: float = field(default=0.01, metadata=POSITIVE)  # for a global batch of lr_reference_batch; scaled linearly to the real one
    lr_reference_batch: Optional[int] = field(default=8, metadata=AT_LEAST_1)  # None: use lr as given, whatever the global batch
    optimizer: str = field(default="sgd", metadata=one_of(OPTIMIZERS))
    momentum: float = field(default=0.9, metadata=AT_LEAST_0)
    weight_decay: float = field(default=1e-4, metadata=AT_LEAST_0)
    warmup_steps: int = field(default=100, metadata=AT_LEAST_0)
    poly_power: float = 0.9
    loss: str = field(default="ce", metadata=one_of(LOSSES))
    class_weights: Optional[Any] = field(default=None, metadata=CLASS_WEIGHTS)  # None | list of floats | "median_freq"
    amp: str = field(default="auto", metadata=one_of(AMP_MODES))
    accum_steps: int = field(default=1, metadata=AT_LEAST_1)
    grad_clip: Optional[float] = field(default=None, metadata=POSITIVE)  # max global grad norm; None disables
    seed: int = 0
    resume: Optional[str] = None  # None | auto | path/to/last.pt
    init_from: Optional[str] = None  # start from these model weights (e.g. a pruned artefact)
    val_every: int = field(default=1, metadata=AT_LEAST_1)  # epochs between validations
    log_every: int = field(default=20, metadata=AT_LEAST_1)  # steps between plain log lines and tracked scalars
    num_vis: int = field(default=4, metadata=AT_LEAST_0)  # image | truth | prediction panels tracked per validation
    # Where rank 0 logs params, scalars, panels and (MLflow, W&B) the final artefacts: one of TRACKERS or a list,
    # e.g. [tensorboard, mlflow]; [] logs nowhere. MLflow and W&B are optional packages (pip install mlflow / wandb).
    tracker: Union[str, list] = field(default="tensorboard", metadata=some_of(TRACKERS))
    experiment: Optional[str] = None  # MLflow experiment / W&B project; None: the name of output_dir's folder
    backend: Optional[str] = None  # None: nccl on CUDA, gloo on CPU
    # How long a rank waits for the others in a collective before failing (a first index scan on a network
    # file system can take minutes while the other ranks wait).
    dist_timeout_s: float = 600.0
    save_every: Optional[int] = None  # also save last.pt every N optimizer steps (preemptible machines)
    device: Optional[str] = None  # None: cuda if available, else cpu


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/default"


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
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); quote strings, "
                              f"write lists as [a, b]") from None
        _set_dotted(raw, key.strip(), parsed)
    cfg = _build(Config, raw, prefix="")
    if cfg.data.classes is not None:
        check_class_weights(cfg.train.class_weights, len(cfg.data.classes))
    return cfg


def check_class_weights(weights: Any, num_classes: int) -> None:
    """A list of class weights must have one entry per class (checked as soon as the classes are known)."""
    if isinstance(weights, list) and len(weights) != num_classes:
        raise ConfigError(f"train.class_weights has {len(weights)} weights but there are {num_classes} classes; "
                          f"give one per class (in data.classes order) or use median_freq")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """YAML's complaint and where, on one line."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or 'syntax error'}{where}"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; the configs/ folder has examples")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({_yaml_problem(e)}); fix that line") from None
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
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
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
            choices = fields[key].metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(f"{dotted}={value!r}; choose one of {', '.join(choices)}")
            each_of = fields[key].metadata.get("each_of")  # a word or a list of words, each one of these
            words = [value] if isinstance(value, str) else value
            unknown = [word for word in words if word not in each_of] if each_of else []
            if unknown:
                raise ConfigError(f"{dotted}={value!r}: {unknown[0]!r} is not one of {', '.join(each_of)}; give one "
                                  f"of them or a list, e.g. {dotted}=[{each_of[0]},{each_of[1]}]")
            check, wanted = fields[key].metadata.get("allowed", (None, None))
            if check is not None and kwargs[key] is not None and not _passes(check, kwargs[key]):
                raise ConfigError(f"{dotted}={value!r} is not allowed; it must be {wanted}")
    return cls(**kwargs)


def _passes(check: Callable[[Any], bool], value: Any) -> bool:
    """check(value), where a value of the wrong shape (a list too short, a string compared to 0) fails."""
    try:
        return bool(check(value))
    except (TypeError, IndexError):
        return False


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
