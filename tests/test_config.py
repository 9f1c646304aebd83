import dataclasses
from pathlib import Path

import pytest

from conftest import REPO
from segpipe.config import Config, ConfigError, load_config

REQUIRED = ["data.root", "data.classes", "data.ignore_index", "data.mask_format", "data.palette", "data.label_map",
            "data.crop_size", "data.eval_size", "data.num_workers", "model.name", "model.weights", "train.epochs",
            "train.max_steps", "train.batch_size", "train.lr", "output_dir"]


def test_required_keys_exist():
    cfg = dataclasses.asdict(Config())
    for key in REQUIRED:
        node = cfg
        for part in key.split("."):
            assert part in node, key
            node = node[part]


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(REPO / "configs/camvid.yaml", ["train.epochs=2", "data.root=/data/x", "data.crop_size=[128,96]",
                                                     "train.lr=1e-3", "train.max_steps=null"])
    assert cfg.train.epochs == 2 and cfg.data.root == "/data/x" and cfg.data.crop_size == [128, 96]
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.max_steps is None
    assert cfg.data.ignore_index == 11  # from the file, untouched


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"train\.epoch'.*train\.epochs"):
        load_config(None, ["train.epoch=2"])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("data:\n  crop_sise: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"data\.crop_sise.*data\.crop_size"):
        load_config(path)


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"train\.batch_size must be int, got 'eight'"):
        load_config(None, ["train.batch_size=eight"])
    with pytest.raises(ConfigError, match="train.epochs must be int"):
        load_config(None, ["train.epochs=true"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.epochs"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path):
    cfg = load_config(path)
    if cfg.data.classes is not None and cfg.data.palette is not None:
        assert len(cfg.data.palette) == len(cfg.data.classes)


def test_value_outside_choices():
    with pytest.raises(ConfigError, match="train.amp='fp8'; choose one of auto, bf16, fp16, none"):
        load_config(None, ["train.amp=fp8"])


def test_num_workers_auto_fits_the_cpus_of_each_process(monkeypatch):
    import os
    from segpipe.distributed import resolve_num_workers
    assert load_config(None).data.num_workers == "auto"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_num_workers("auto") == 1  # 2 CPUs: the training process and one loader
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert resolve_num_workers("auto") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # torchrun: 16 processes share the 64 CPUs
    assert resolve_num_workers("auto") == 3 and resolve_num_workers(7) == 7
    for bad in ("many", -1):
        with pytest.raises(ConfigError, match="data.num_workers"):
            load_config(None, [f"data.num_workers={bad}"])


def test_base_config_is_merged_one_level(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  root: data/x\n  ignore_index: 11\ntrain:\n  epochs: 100\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ndata:\n  crop_size: [64, 64]\ntrain:\n  epochs: 3\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.lr=0.5"])
    assert cfg.data.root == "data/x" and cfg.data.ignore_index == 11 and cfg.data.crop_size == [64, 64]
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.5
    (tmp_path / "grandchild.yaml").write_text("_base_: child.yaml\n")
    with pytest.raises(ConfigError, match="one level"):
        load_config(tmp_path / "grandchild.yaml")
    (tmp_path / "orphan.yaml").write_text("_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "orphan.yaml")
