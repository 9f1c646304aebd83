"""Atomic checkpoint saves, safe loads (weights_only=True), self-describing contents."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy
import PIL
import torch
import torchvision

FORMAT = "segpipe-checkpoint"
FINISHED = "finished.json"  # written into a run folder when training ends normally; removed when it starts again


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the reason and the fix."""


def versions() -> dict:
    """Library versions recorded in every checkpoint."""
    from segpipe import __version__
    return {"segpipe": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "numpy": numpy.__version__, "pillow": PIL.__version__}


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """Write obj to path via a temp file in the same folder and os.replace: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a segpipe checkpoint with weights_only=True, so a file from elsewhere cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `python train.py --config ...` "
                              f"or pass --checkpoint PATH")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        lines = str(e).splitlines()
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise CheckpointError(f"{path} cannot be loaded safely ({reason[:300]}). It is not a segpipe "
                              f"checkpoint, is damaged, or holds pickled objects that could run code") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a segpipe checkpoint (no format={FORMAT!r} entry); "
                              f"raw weights go to training as model.weights={path}")
    return obj


def mark_finished(run_dir: str | Path, classes: list, best_miou: float) -> None:
    """Record that the run in run_dir ended normally (infer.py and evaluate.py pick only finished runs)."""
    path = Path(run_dir) / FINISHED
    tmp = path.with_name(f".{FINISHED}.tmp")
    tmp.write_text(json.dumps({"classes": list(classes), "best_miou": best_miou}) + "\n")
    os.replace(tmp, path)


def read_finished(run_dir: str | Path) -> dict | None:
    """The finished record of a run folder, or None while it trains, after a stop, or if unreadable."""
    try:
        record = json.loads((Path(run_dir) / FINISHED).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("classes"), list) else None
