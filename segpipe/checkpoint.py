"""The checkpoint format: its keys (declared once), building and checking it, atomic saves, safe loads.

A checkpoint is a dict of plain types written by torch.save and read with weights_only=True:
  "format", "version", "versions"      what wrote it;
  META_KEYS                            what rebuilds the network and predicts with it (no config file needed);
  "model"                              the weights;
  TRAINING_KEYS                        last.pt/best.pt of train.py only: enough to continue the run;
  "compression"                        pruned or bf16 files only: what segpipe.compress did (see model_files).
int8 .pt2 archives carry the same metadata as JSON inside (segpipe/compress/int8.py).
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy
import PIL
import torch
import torchvision

FORMAT = "segpipe-checkpoint"
FINISHED = "finished.json"  # written into a run folder when training ends normally; removed when it starts again


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used or written, with the reason and the fix."""


VERSION = 1
# What rebuilds the network and turns its output into class maps; every model file carries these.
META_KEYS = ("model_name", "model_options", "num_classes", "classes", "palette", "ignore_index", "mean", "std",
             "eval_size", "config")
_OPTIONAL_META = ("model_options", "palette", "config")  # older files may lack them
# What last.pt holds besides, to continue a run where it stopped (train.py writes them; resume reads them).
TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "epoch", "step", "samples_done", "world_size", "global_batch",
                 "best_miou", "miou")
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "best_miou")  # needed; the rest: defaults


def make_checkpoint(model_state: dict, meta: dict, training: Optional[dict] = None,
                    compression: Optional[dict] = None) -> dict:
    """The checkpoint dict: metadata (exactly META_KEYS), weights, and optionally training state (exactly
    TRAINING_KEYS) and a compression record."""
    _exactly(meta, META_KEYS, "metadata")
    ckpt = {"format": FORMAT, "version": VERSION, **{k: meta[k] for k in META_KEYS}, "model": model_state,
            "versions": versions()}
    if training is not None:
        _exactly(training, TRAINING_KEYS, "training state")
        ckpt.update(training)
    if compression:
        ckpt["compression"] = compression
    return ckpt


def _exactly(given: dict, keys: tuple, what: str) -> None:
    if set(given) != set(keys):
        raise ValueError(f"checkpoint {what}: missing {sorted(set(keys) - set(given))}, "
                         f"unknown {sorted(set(given) - set(keys))}")


def metadata(ckpt: dict, path: str | Path) -> dict:
    """The checked META_KEYS of a checkpoint (or of an artefact's metadata), plus its compression record.

    Raises CheckpointError when a required key is missing or the class list does not fit num_classes."""
    missing = [k for k in META_KEYS if k not in ckpt and k not in _OPTIONAL_META]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: it was not written by segpipe's train.py "
                              f"(raw weights go to training as model.weights={path})")
    if len(ckpt["classes"]) != ckpt["num_classes"]:
        raise CheckpointError(f"{path}: num_classes={ckpt['num_classes']} but {len(ckpt['classes'])} class "
                              f"names; the file was edited or is damaged")
    meta = {k: ckpt.get(k) for k in META_KEYS}
    meta["config"], meta["model_options"] = meta["config"] or {}, meta["model_options"] or {}
    return meta | {"compression": ckpt.get("compression")}


def versions() -> dict:
    """Library versions recorded in every checkpoint."""
    from segpipe import __version__
    return {"segpipe": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "numpy": numpy.__version__, "pillow": PIL.__version__}


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """Write obj to path via a temp file in the same folder and os.replace: a kill or a full disk never leaves half
    a file, and the previous checkpoint stays until the new one is complete."""
    _write_atomically(path, lambda f: torch.save(obj, f))


def copy_checkpoint(source: str | Path, path: str | Path) -> None:
    """Copy a just-written checkpoint file (best.pt from last.pt), as atomically as save_checkpoint writes."""
    with open(source, "rb") as src:
        _write_atomically(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))


def _write_atomically(path: str | Path, write: Callable) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a save that was killed
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open with 0o666 lets the umask set the permissions, as for every other output (mkstemp would give 0600).
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError, the OSError inside
        tmp.unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is None:
            raise
        reason = "no space left on device" if cause.errno in (errno.ENOSPC, errno.EDQUOT) else \
            (cause.strerror or str(cause)).lower()
        raise CheckpointError(f"cannot save {path}: {reason}. The partial file was removed and the previous "
                              f"{path.name} (if any) is unchanged; free space, or write to another disk") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _is_export_archive(path: Path) -> bool:
    """A torch.export.save archive (a zip with an archive_format entry), whatever its suffix."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/archive_format") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _os_error(error: BaseException) -> Optional[OSError]:
    """The OSError behind an exception (itself, or the one it was raised while handling), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a segpipe checkpoint with weights_only=True, so a file from elsewhere cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `python train.py --config ...` "
                              f"or pass --checkpoint PATH")
    if _is_export_archive(path):
        renamed = "" if path.suffix == ".pt2" else f", renamed to {path.suffix or 'no suffix'}"
        raise CheckpointError(f"{path} is an int8 artefact (a torch.export archive{renamed}), not a checkpoint: "
                              f"pruning, quantizing and training start from the float checkpoint it was made from; "
                              f"infer.py and evaluate.py read it as NAME.pt2 with --trust-artefact")
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


def _resume_fix(path: str | Path) -> str:
    return (f"delete {path} to start afresh, or set output_dir to a new folder (or train.resume to the "
            f"checkpoint of this run)")


def load_resume_checkpoint(path: str | Path) -> dict:
    """A last.pt to continue from, loaded on the CPU; CheckpointError names what the file holds and what to do."""
    try:
        ckpt = load_checkpoint(path, "cpu")
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume: {e}; {_resume_fix(path)}") from None
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"cannot resume from {path}: it holds {_holds(ckpt)} but no training state "
                              f"({', '.join(missing)} missing; an inference artefact?); {_resume_fix(path)}")
    return ckpt


def restore_training(ckpt: dict, path: str | Path, run: str, model: torch.nn.Module, optimizer, scheduler) -> None:
    """Load a last.pt's weights, optimizer and schedule into this run's objects; run describes this run's model.

    Raises CheckpointError naming what the file holds and what to do, instead of pages of state-dict keys.
    """
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), "")
        raise CheckpointError(f"cannot resume from {path}: it holds {_holds(ckpt)}, this run trains {run} "
                              f"({detail[:150]}); {_resume_fix(path)}") from None
    try:
        optimizer.load_state_dict(ckpt["optimizer"])  # moves the moments to the parameters' device
        scheduler.load_state_dict(ckpt["scheduler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"cannot resume from {path}: its optimizer or schedule state does not fit this run "
                              f"({str(e).splitlines()[0][:150]}; was train.optimizer changed?); "
                              f"{_resume_fix(path)}") from None


def _holds(ckpt: dict) -> str:
    return f"a {ckpt.get('model_name', 'model of unknown architecture')} with {ckpt.get('num_classes', '?')} classes"


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
