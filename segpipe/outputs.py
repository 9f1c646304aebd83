"""Where results go: output folders checked before any work, and infer.py's files told apart from the user's."""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Optional

from PIL import Image, PngImagePlugin

from segpipe.data import IMAGE_EXTS, MASK_SUFFIX

RUN_LOCK = ".segpipe-train.lock"  # held by the train.py that writes a run folder
# infer.py writes this text chunk (PNG) or comment (JPEG) into every file; it replaces only files that carry it.
PREDICTION_TAG = "segpipe-prediction"


class OutputError(ValueError):
    """An output path that cannot be used, with the reason and the fix."""


def describe(error: OSError) -> str:
    """An OSError's reason in words, without the path (the caller names it)."""
    return error.strerror or os.strerror(error.errno or 0) or str(error)


def prepare_dir(path: str | Path, option: str) -> Path:
    """Create the folder (and parents) and prove it writable now, before hours of work would fail to save."""
    return _make_writable(Path(path), f"{option}={path}", option)


def lock_run_dir(folder: Path):
    """An open file holding an exclusive lock on FOLDER/RUN_LOCK, naming this process; the lock ends when the file
    is closed or the process ends, however it ends. None where the file system has no locks (some network mounts).
    OutputError naming the process that holds it."""
    import fcntl
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        f = open(Path(folder) / RUN_LOCK, "a+")
    except OSError as e:
        raise OutputError(f"output_dir={folder} cannot be written ({describe(e)}); choose another output_dir") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise OutputError(f"output_dir={folder} is in use by another training run (process {holder}); wait for it "
                          f"to end, or choose another output_dir") from None
    except OSError:
        f.close()
        return None
    f.truncate(0)
    f.write(f"{os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def prepare_file(path: str | Path, option: str) -> Path:
    """The folder of an output file, prepared as prepare_dir does; the path itself must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option}={path} is a folder; give a file name, e.g. {path / 'model.pth'}")
    _make_writable(path.parent, f"{option}={path}: the folder {path.parent}", option)
    return path


def _make_writable(folder: Path, subject: str, option: str) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # os.access trusts permission bits (root passes them) and ignores read-only mounts: write a file instead.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except FileExistsError:
        raise OutputError(f"{subject} is a file, not a folder; choose another {option}") from None
    except OSError as e:
        raise OutputError(f"{subject} cannot be written ({describe(e)}); choose another {option}") from None
    return folder


def split_folder_holding(path: str | Path) -> Optional[Path]:
    """The data split folder (images with NAME_mask.png masks beside them) that path is or lies in, if any."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if folder.is_dir() and _holds_pairs(folder):
            return folder
    return None


def _holds_pairs(folder: Path) -> bool:
    try:
        names = {entry.name for entry in os.scandir(folder)}
    except OSError:
        return False  # an unreadable folder holds nothing we could overwrite
    for name in names:
        if name.lower().endswith(MASK_SUFFIX):
            stem = name[: -len(MASK_SUFFIX)]
            paired = any(stem + ext in names or stem + ext.upper() in names for ext in IMAGE_EXTS)
            if paired and not is_prediction(folder / name):  # photos next to their predictions are not data
                return True
    return False


def is_prediction(path: str | Path) -> bool:
    """True for a file infer.py wrote (it carries PREDICTION_TAG)."""
    try:
        with Image.open(path) as image:
            info = image.info
    except (OSError, SyntaxError, ValueError):
        return False  # not an image at all: certainly not ours
    comment = info.get("comment", b"")
    return info.get(PREDICTION_TAG) is not None or (isinstance(comment, bytes) and comment == PREDICTION_TAG.encode())


def save_prediction(image: Image.Image, path: Path, **options) -> None:
    """Save an infer.py output with PREDICTION_TAG, so a later run knows it may replace it. Written to a temporary
    name and renamed: a file under the final name is always complete, so a rerun may skip it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if path.suffix.lower() == ".png":
            info = PngImagePlugin.PngInfo()
            info.add_text(PREDICTION_TAG, "written by infer.py")
            image.save(tmp, format="PNG", pnginfo=info, **options)
        else:
            image.save(tmp, format="JPEG", comment=PREDICTION_TAG, **options)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
