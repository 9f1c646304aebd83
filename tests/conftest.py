"""Shared fixtures: tiny data sets written by the tests themselves, and the CamVid location."""
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "data" / "camvid"
sys.path.insert(0, str(REPO))


def write_pair(folder: Path, name: str, mask: np.ndarray, rgb_palette=None, ext=".jpg") -> None:
    """An image whose colour encodes the mask (so alignment is checkable), and its mask PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    image = np.stack([mask * 40 % 256, 255 - mask * 60 % 256, mask * 90 % 256], -1).astype(np.uint8)
    Image.fromarray(image).save(folder / f"{name}{ext}", quality=95)
    if rgb_palette is None:
        Image.fromarray(mask.astype(np.uint8), mode="L").save(folder / f"{name}_mask.png")
    else:
        Image.fromarray(np.asarray(rgb_palette, dtype=np.uint8)[mask]).save(folder / f"{name}_mask.png")


def random_mask(rng, h: int, w: int, num_classes: int) -> np.ndarray:
    """Blocky class maps (regions, not noise), so resizing keeps most pixels interior."""
    small = rng.integers(0, num_classes, size=(-(-h // 8), -(-w // 8)))
    return np.kron(small, np.ones((8, 8), dtype=np.int64))[:h, :w]


@pytest.fixture
def make_dataset(tmp_path):
    """make_dataset(n_train, n_valid, size=(h, w), num_classes=3, rgb_palette=None) -> root folder."""
    def make(n_train=4, n_valid=3, size=(40, 56), num_classes=3, rgb_palette=None, seed=0, root=None):
        rng = np.random.default_rng(seed)
        root = Path(root or tmp_path / "data")
        for split, n in (("train", n_train), ("valid", n_valid)):
            for i in range(n):
                write_pair(root / split, f"img{i:03d}", random_mask(rng, *size, num_classes), rgb_palette)
        return root
    return make


def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    return unused_port()


needs_camvid = pytest.mark.skipif(not (CAMVID / "train").is_dir(), reason=f"CamVid not found at {CAMVID}")


def run_env() -> dict:
    """Environment for subprocesses: one thread each, so two processes share two cores fairly."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
