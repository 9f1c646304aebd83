"""Hostile files and careless commands: code in artefacts never runs, ground truth is never overwritten, odd but
genuine files load, and every mistake is one line naming the file or value (no traceback)."""
import builtins
import io
import json
import pickle
import runpy
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, random_mask, run_env, write_pair
from test_predict import tiny_checkpoint

SIZE = (40, 56)
METADATA = {"model_name": "lraspp_mobilenet_v3_large", "num_classes": 3, "classes": ["a", "b", "c"],
            "palette": None, "ignore_index": 255, "mean": [0.5] * 3, "std": [0.2] * 3, "eval_size": None,
            "config": {}, "compression": {"method": "int8"}}


def run(script: str, *args, cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    """An entry script as a process, as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """Failed, with no traceback, and the last line says each of words."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in last_line(result), result.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A labelled data root (train and valid, 3 classes) and a tiny checkpoint trained on nothing."""
    base = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("valid", 2)):
        for i in range(n):
            write_pair(base / "data" / split, f"img{i:03d}", random_mask(rng, *SIZE, 3))
    return base / "data", tiny_checkpoint(base / "run" / "best.pt", data_root=base / "data")


# -- 1. a crafted .pt2 never runs its code ------------------------------------------------------------------------


class Marker:
    """Unpickling this creates the marker file: what a hostile archive would do instead."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def crafted_pt2(path: Path, marker: Path, where: str) -> Path:
    """A genuine torch.export archive with the segpipe metadata, altered so a pickle creates marker on load.

    where: "sample_inputs" (unpickled when the safe load fails), "weights" (a weight marked use_pickle),
    "opaque" (an opaque-object constant), or "none" (unaltered, pickle-free).
    """
    program = torch.export.export(torch.nn.Conv2d(3, 3, 1).eval(), (torch.zeros(1, 3, 4, 4),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"segpipe.json": json.dumps(METADATA)})
    genuine = zipfile.ZipFile(buffer)
    entries = {name: genuine.read(name) for name in genuine.namelist()}
    if where == "sample_inputs":
        entries["archive/data/sample_inputs/model.pt"] = pickled(((Marker(marker),), {}))
    elif where == "weights":
        config = json.loads(entries["archive/data/weights/model_weights_config.json"])
        payload = next(iter(config["config"].values()))
        payload["use_pickle"] = True
        entries[f"archive/data/weights/{payload['path_name']}"] = pickled(Marker(marker))
        entries["archive/data/weights/model_weights_config.json"] = json.dumps(config)
    elif where == "opaque":
        config = {"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                      "tensor_meta": None}}}
        entries["archive/data/constants/model_constants_config.json"] = json.dumps(config)
        entries["archive/data/constants/opaque_obj_0"] = pickle.dumps(Marker(marker))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:  # stored, as torch writes them
        for name, content in entries.items():
            archive.writestr(name, content)
    return path


def test_crafted_pt2_would_run_code_in_torch_export_load(tmp_path):
    """The threat is real: torch.export.load itself unpickles the crafted sample inputs (so the tests below
    would notice a loader that reached it)."""
    marker = tmp_path / "marker"
    try:
        torch.export.load(crafted_pt2(tmp_path / "evil.pt2", marker, "sample_inputs"))
    except RuntimeError:
        pass  # the altered program may fail to build after the pickle ran
    assert marker.exists()


def test_a_crafted_pt2_never_runs_its_pickle_in_infer_or_evaluate(data, tmp_path):
    root, _ = data
    marker = tmp_path / "marker"
    evil = crafted_pt2(tmp_path / "evil.pt2", marker, "sample_inputs")
    # Without --trust-artefact it is refused; with it, the inspection still refuses the pickle.
    result = run("infer.py", root / "valid" / "img000.jpg", "--checkpoint", evil, "--out", tmp_path / "out",
                 cwd=tmp_path)
    assert_one_line_error(result, "evil.pt2", "refused")
    assert not marker.exists()
    result = run("evaluate.py", "--checkpoint", evil, "--data-root", root, "--trust-artefact", cwd=tmp_path)
    assert_one_line_error(result, "evil.pt2", "refused", "sample inputs")
    assert not marker.exists()


@pytest.mark.parametrize("where", ["weights", "opaque"])
def test_pickled_weights_or_opaque_constants_are_refused_even_when_trusted(tmp_path, where):
    from segpipe.checkpoint import CheckpointError
    from segpipe.compress import load_artefact
    marker = tmp_path / "marker"
    with pytest.raises(CheckpointError, match="refused"):
        load_artefact(crafted_pt2(tmp_path / "evil.pt2", marker, where), trust=True)
    assert not marker.exists()


def test_pt2_is_refused_without_trust_and_says_why(tmp_path):
    """Even a pickle-free archive makes torch.export.load evaluate its strings: loading needs trust."""
    from segpipe.checkpoint import CheckpointError
    from segpipe.compress import load_artefact
    with pytest.raises(CheckpointError, match="--trust-artefact") as info:
        load_artefact(crafted_pt2(tmp_path / "plain.pt2", tmp_path / "marker", "none"))
    assert "run anything" in str(info.value) and "\n" not in str(info.value)
    model, meta = load_artefact(tmp_path / "plain.pt2", trust=True, compile=False)  # a genuine file still loads
    assert meta["num_classes"] == 3 and model(torch.zeros(1, 3, 4, 4)).shape == (1, 3, 4, 4)


# -- 2. infer.py never destroys ground truth or earlier predictions ---------------------------------------------------


def run_in_process(script: str, argv: list, cwd: Path, monkeypatch) -> None:
    """An entry script in this process, as `python script argv...` from cwd would run it."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    runpy.run_path(str(REPO / script), run_name="__main__")


def exit_message(script: str, argv: list, cwd: Path, monkeypatch) -> str:
    """The one-line message the script exits with; a traceback instead fails the test."""
    with pytest.raises(SystemExit) as info:
        run_in_process(script, argv, cwd, monkeypatch)
    assert isinstance(info.value.code, str), f"expected an exit message, got {info.value.code!r}"
    assert "\n" not in info.value.code.strip(), info.value.code
    return info.value.code


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_infer_refuses_to_write_into_a_data_split(data, tmp_path):
    root, ckpt = data
    before = snapshot(root / "valid")
    result = run("infer.py", root / "valid", "--checkpoint", ckpt, "--out", root / "valid", cwd=tmp_path)
    assert_one_line_error(result, str(root / "valid"), "ground truth")
    assert snapshot(root / "valid") == before  # no mask replaced, no overlay added


def test_infer_refuses_an_out_below_a_data_split(data, tmp_path, monkeypatch):
    root, ckpt = data
    message = exit_message("infer.py", [root / "valid" / "img000.jpg", "--checkpoint", ckpt,
                                        "--out", root / "valid" / "preds"], tmp_path, monkeypatch)
    assert "inside the data folder" in message and not (root / "valid" / "preds").exists()


def test_infer_replaces_only_its_own_predictions_and_only_with_overwrite(data, tmp_path, monkeypatch):
    root, ckpt = data
    out = tmp_path / "out"
    images = [root / "valid" / "img000.jpg", root / "valid" / "img001.jpg"]
    run_in_process("infer.py", [*images, "--checkpoint", ckpt, "--out", out, "--workers", 0], tmp_path, monkeypatch)
    first = snapshot(out)
    assert sorted(first) == ["img000_mask.png", "img000_overlay.jpg", "img001_mask.png", "img001_overlay.jpg"]
    message = exit_message("infer.py", [*images, "--checkpoint", ckpt, "--out", out], tmp_path, monkeypatch)
    assert "--overwrite" in message and snapshot(out) == first
    run_in_process("infer.py", [*images, "--checkpoint", ckpt, "--out", out, "--overwrite", "--workers", 0],
                   tmp_path, monkeypatch)
    # A file of the user's under an output name is never replaced, --overwrite or not.
    Image.fromarray(np.zeros(SIZE, np.uint8)).save(out / "img001_mask.png")
    users = (out / "img001_mask.png").read_bytes()
    message = exit_message("infer.py", [*images, "--checkpoint", ckpt, "--out", out, "--overwrite"],
                           tmp_path, monkeypatch)
    assert "img001_mask.png" in message and "not written by infer.py" in message
    assert (out / "img001_mask.png").read_bytes() == users
