"""Synthetic street scenes in the project's ROOT/SPLIT/NAME.jpg + NAME_mask.png layout, for demos and tests."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

CLASSES: list[str] = ["sky", "road", "building", "vegetation", "car", "person"]
# Cityscapes' colours for the same classes, so pictures look familiar to people who know it.
PALETTE: list[tuple[int, int, int]] = [
    (70, 130, 180), (128, 64, 128), (70, 70, 70), (107, 142, 35), (0, 0, 142), (220, 20, 60),
]
SKY, ROAD, BUILDING, VEGETATION, CAR, PERSON = range(len(CLASSES))

MARKER = ".complete"  # written last: a root without it was never finished
FORMAT_VERSION = 2  # bump when scenes or file names change, so ensure_dataset regenerates old data sets
SPLITS = ("train", "valid")

Colour = tuple[int, int, int]


class _Painter:
    """Draws every shape twice, colour into the image and class id into the mask, so they agree exactly."""

    def __init__(self, image: Image.Image, mask: Image.Image):
        self.image, self.mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)

    def shape(self, kind: str, xy: Sequence, cls: int, colour: Colour, **kw) -> None:
        """A part of an object of class cls: changes the mask."""
        getattr(self.image, kind)(xy, fill=colour, **kw)
        getattr(self.mask, kind)(xy, fill=cls, **kw)

    def detail(self, kind: str, xy: Sequence, colour: Colour, **kw) -> None:
        """Paint inside an already drawn shape (windows, lane marks): the mask stays as it is."""
        getattr(self.image, kind)(xy, fill=colour, **kw)


class _Street:
    """The perspective of one scene: horizon, vanishing point and the road's edges."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.h, self.w = height, width
        self.horizon = height * rng.uniform(0.38, 0.52)
        self.vanish_x = width * rng.uniform(0.38, 0.62)
        # The road meets the horizon as wide as the gap between the two rows of buildings, so every
        # pixel below the horizon is road or building and no sky leaks in under the skyline.
        self.gap = width * rng.uniform(0.05, 0.12)
        self.left_bottom = width * rng.uniform(-0.6, 0.05)
        self.right_bottom = width * rng.uniform(0.95, 1.6)

    def depth(self, y: float) -> float:
        """0 at the horizon, 1 at the bottom row: how near a point on the ground is, and so its scale."""
        return (y - self.horizon) / (self.h - self.horizon)

    def road_x(self, y: float, side: float) -> float:
        """x of the road's left (side=0), centre (0.5) or right (1) edge at image row y."""
        top = self.vanish_x - self.gap + 2 * self.gap * side
        bottom = self.left_bottom + (self.right_bottom - self.left_bottom) * side
        return top + (bottom - top) * self.depth(y)


def _jitter(rng: np.random.Generator, colour: Colour, amount: int) -> Colour:
    """colour with each channel moved by up to +-amount."""
    return tuple(min(255, max(0, c + int(d))) for c, d in zip(colour, rng.integers(-amount, amount + 1, size=3)))


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Unit-variance noise that varies over about `cell` pixels (clouds, stains, foliage)."""
    coarse = rng.standard_normal((height // cell + 2, width // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))


def _sky(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A vertical gradient from a random zenith colour to a paler horizon."""
    zenith = np.array(_jitter(rng, (60, 110, 190), 40), np.float32)
    haze = np.array(_jitter(rng, (190, 205, 220), 30), np.float32)
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None] ** 0.8
    return np.broadcast_to(zenith * (1 - t) + haze * t, (height, width, 3)).copy()


def _building(rng: np.random.Generator, paint: _Painter, x0: float, x1: float, top: float, bottom: int) -> None:
    """A facade from x0 to x1 with a grid of windows, some of them lit."""
    families = [(150, 80, 60), (200, 185, 150), (120, 120, 125), (170, 170, 160), (100, 90, 80)]
    wall = _jitter(rng, families[rng.integers(len(families))], 20)
    paint.shape("rectangle", [x0, top, x1, bottom], BUILDING, wall)
    win_w, win_h = int(rng.integers(2, 6)), int(rng.integers(3, 7))
    step_x, step_y = win_w + int(rng.integers(2, 6)), win_h + int(rng.integers(2, 6))
    glass = _jitter(rng, (45, 55, 70), 15)
    for y in np.arange(top + 3, bottom - win_h - 2, step_y):
        for x in np.arange(x0 + 3, x1 - win_w - 2, step_x):
            lit = rng.random() < 0.15
            paint.detail("rectangle", [x, y, x + win_w - 1, y + win_h - 1], (220, 200, 120) if lit else glass)


def _buildings(rng: np.random.Generator, paint: _Painter, street: _Street) -> None:
    """Two rows of facades, left and right of the gap above the road, reaching down to the image bottom."""
    for x_start, x_end in ((0.0, street.vanish_x - street.gap), (street.vanish_x + street.gap, float(street.w))):
        cuts = np.sort(rng.uniform(x_start, x_end, size=rng.integers(0, 3)))
        edges = [x_start, *cuts, x_end]
        for x0, x1 in zip(edges[:-1], edges[1:]):
            top = street.horizon - street.h * rng.uniform(0.08, 0.42)
            _building(rng, paint, round(x0), round(x1), round(top), street.h)


def _road(rng: np.random.Generator, paint: _Painter, street: _Street) -> None:
    """Asphalt from the horizon to the bottom edge, with a dashed centre line in perspective."""
    corners = [(street.road_x(street.horizon, 0), street.horizon), (street.road_x(street.horizon, 1), street.horizon),
               (street.right_bottom, street.h), (street.left_bottom, street.h)]
    paint.shape("polygon", corners, ROAD, _jitter(rng, (85, 85, 90), 15))
    paint_colour = (235, 235, 225) if rng.random() < 0.7 else (225, 190, 60)
    period, phase = rng.uniform(1.5, 2.5), rng.uniform(0, 1)
    for k in range(40):
        # Equal steps in distance are steps in 1/y on the image: dashes shorten towards the horizon.
        near, far = 1 + (k + phase) * period, 1 + (k + phase + 0.5) * period
        y_near = street.horizon + (street.h - street.horizon) / near
        y_far = street.horizon + (street.h - street.horizon) / far
        if y_near - y_far < 1:
            break
        half_near, half_far = 0.012 * street.w / near, 0.012 * street.w / far
        x_near, x_far = street.road_x(y_near, 0.5), street.road_x(y_far, 0.5)
        paint.detail("polygon", [(x_far - half_far, y_far), (x_far + half_far, y_far),
                                 (x_near + half_near, y_near), (x_near - half_near, y_near)], paint_colour)


def _tree(rng: np.random.Generator, paint: _Painter, x: float, base: float, size: float) -> None:
    """A trunk under a canopy of a few overlapping ellipses."""
    bark, leaves = _jitter(rng, (90, 65, 40), 15), _jitter(rng, (60, 110, 40), 25)
    trunk_w, trunk_h = max(1.5, size * 0.08), size * 0.55
    paint.shape("rectangle", [x - trunk_w, base - trunk_h, x + trunk_w, base], VEGETATION, bark)
    for _ in range(3):
        cx, cy = x + rng.uniform(-0.2, 0.2) * size, base - trunk_h - rng.uniform(0.05, 0.3) * size
        rx, ry = size * rng.uniform(0.2, 0.35), size * rng.uniform(0.18, 0.3)
        paint.shape("ellipse", [cx - rx, cy - ry, cx + rx, cy + ry], VEGETATION, leaves)


def _car(rng: np.random.Generator, paint: _Painter, x: float, base: float, width: float) -> None:
    """A car seen from behind: wheels, a rounded body, a narrower cabin, rear window and lights."""
    height = width * rng.uniform(0.55, 0.7)
    body = _jitter(rng, [(200, 30, 30), (230, 230, 235), (30, 30, 35), (40, 70, 160), (150, 155, 160),
                         (230, 200, 40)][rng.integers(6)], 20)
    wheel_h, wheel_w = height * 0.2, width * 0.16
    for side in (-1, 1):
        wx = x + side * width * 0.33
        paint.shape("rectangle", [wx - wheel_w / 2, base - wheel_h, wx + wheel_w / 2, base], CAR, (20, 20, 20))
    body_top, body_bottom = base - height * 0.62, base - wheel_h * 0.5
    paint.shape("rounded_rectangle", [x - width / 2, body_top, x + width / 2, body_bottom], CAR, body,
                radius=max(1, int(height * 0.1)))
    roof = base - height
    cabin = [(x - width * 0.4, body_top + 1), (x - width * 0.3, roof), (x + width * 0.3, roof),
             (x + width * 0.4, body_top + 1)]
    paint.shape("polygon", cabin, CAR, body)
    inset = max(1.0, height * 0.06)
    window = [(x - width * 0.4 + 2 * inset, body_top), (x - width * 0.3 + inset, roof + inset),
              (x + width * 0.3 - inset, roof + inset), (x + width * 0.4 - 2 * inset, body_top)]
    paint.detail("polygon", window, _jitter(rng, (40, 50, 65), 10))
    light_w, light_h = width * 0.12, max(1.0, height * 0.08)
    light_y = body_top + height * 0.08
    for side in (-1, 1):
        lx = x + side * (width / 2 - inset - light_w / 2)
        paint.detail("rectangle", [lx - light_w / 2, light_y, lx + light_w / 2, light_y + light_h], (190, 20, 20))
    plate_w, plate_y = width * 0.12, light_y + height * 0.18
    paint.detail("rectangle", [x - plate_w, plate_y, x + plate_w, plate_y + max(1.0, height * 0.08)], (235, 235, 235))


def _person(rng: np.random.Generator, paint: _Painter, x: float, base: float, height: float) -> None:
    """Two legs, a thin ellipse for the body and a circle for the head."""
    shirt = _jitter(rng, [(200, 40, 40), (40, 60, 150), (230, 230, 230), (40, 40, 40), (60, 140, 70)]
                    [rng.integers(5)], 25)
    trousers = _jitter(rng, (50, 50, 70), 25)
    skin = _jitter(rng, [(240, 200, 170), (200, 150, 110), (130, 90, 60)][rng.integers(3)], 10)
    leg_w, hip = max(1.0, height * 0.06), base - height * 0.47
    stride = rng.uniform(0, 0.12) * height
    for side in (-1, 1):
        foot = x + side * (height * 0.05 + stride / 2)
        paint.shape("polygon", [(x + side * height * 0.05 - leg_w, hip), (x + side * height * 0.05 + leg_w, hip),
                                (foot + leg_w, base), (foot - leg_w, base)], PERSON, trousers)
    body_w = height * rng.uniform(0.12, 0.16)
    paint.shape("ellipse", [x - body_w, base - height * 0.82, x + body_w, hip + height * 0.04], PERSON, shirt)
    head = max(1.5, height * 0.09)
    head_y = base - height * 0.9
    paint.shape("ellipse", [x - head, head_y - head, x + head, head_y + head], PERSON, skin)


def _objects(rng: np.random.Generator, street: _Street) -> list[tuple[float, Callable[[_Painter], None]]]:
    """Trees, cars and people, each as (base row, draw function), so nearer ones can be drawn last."""
    objects = []
    for _ in range(rng.integers(0, 3)):
        base = street.horizon + (street.h - street.horizon) * rng.uniform(0.15, 0.8)
        size = street.h * street.depth(base) * rng.uniform(0.6, 0.9)
        side = int(rng.integers(2))
        # On the pavement: just outside the road edge, in front of the buildings.
        x = street.road_x(base, side) + (1 if side else -1) * size * rng.uniform(0.05, 0.3)
        objects.append((base, lambda p, x=x, b=base, s=size: _tree(rng, p, x, b, s)))
    for _ in range(rng.integers(0, 4)):
        base = street.horizon + (street.h - street.horizon) * rng.uniform(0.2, 1.05)
        width = street.w * street.depth(base) * rng.uniform(0.3, 0.42)
        x = rng.uniform(street.road_x(base, 0.1), street.road_x(base, 0.9))
        objects.append((base, lambda p, x=x, b=base, s=width: _car(rng, p, x, b, s)))
    for _ in range(rng.integers(0, 4)):
        base = street.horizon + (street.h - street.horizon) * rng.uniform(0.35, 1.0)
        height = street.w * street.depth(base) * rng.uniform(0.28, 0.38)
        side = rng.uniform(-0.08, 0.08) if rng.random() < 0.5 else rng.uniform(0.92, 1.08)
        objects.append((base, lambda p, x=street.road_x(base, side), b=base, s=height: _person(rng, p, x, b, s)))
    return objects


# Per-class texture as (fine-grain noise std, blotch std, blotch size in px): asphalt is grainy,
# foliage blotchy, car paint smooth; this is what makes classes separable by more than flat colour.
_TEXTURE = {SKY: (1.5, 10.0, 24), ROAD: (9.0, 8.0, 10), BUILDING: (6.0, 6.0, 16), VEGETATION: (12.0, 22.0, 4),
            CAR: (3.0, 3.0, 16), PERSON: (5.0, 4.0, 8)}


def _texture_and_light(rng: np.random.Generator, image: Image.Image, labels: np.ndarray) -> Image.Image:
    """Per-class texture, then one lighting change and sensor noise over the whole picture."""
    h, w = labels.shape
    grain = rng.standard_normal((h, w), dtype=np.float32)
    texture = np.zeros((h, w), np.float32)
    for cls, (grain_std, blotch_std, cell) in _TEXTURE.items():
        where = labels == cls
        if not where.any():
            continue
        field = grain_std * grain + blotch_std * _smooth_noise(rng, h, w, cell)
        if cls == SKY:  # clouds whiten rather than darken
            field = np.abs(field)
        np.copyto(texture, field, where=where)
    gain = rng.uniform(0.75, 1.2) * rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    sensor = rng.uniform(2, 6) * rng.standard_normal((h, w, 3), dtype=np.float32)
    pixels = (np.asarray(image, dtype=np.float32) + texture[..., None]) * gain + sensor
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_scene(rng: np.random.Generator, height: int, width: int) -> tuple[Image.Image, Image.Image]:
    """One street scene: an RGB image and its mode-L mask of indices into CLASSES."""
    if height < 16 or width < 16:
        raise ValueError(f"scene size {height}x{width} is too small to draw a street; use at least 16x16")
    street = _Street(rng, height, width)
    image = Image.fromarray(_sky(rng, height, width).astype(np.uint8))
    mask = Image.new("L", (width, height), SKY)
    paint = _Painter(image, mask)
    _buildings(rng, paint, street)
    _road(rng, paint, street)
    for _, draw in sorted(_objects(rng, street), key=lambda item: item[0]):
        draw(paint)
    return _texture_and_light(rng, image, np.asarray(mask)), mask


def _spec(n_train: int, n_valid: int, size: tuple[int, int], seed: int) -> dict:
    """What a data set was made from; stored in the marker so a changed request is noticed."""
    return {"generator": "segpipe.synthetic", "version": FORMAT_VERSION, "n_train": int(n_train),
            "n_valid": int(n_valid), "size": [int(size[0]), int(size[1])], "seed": int(seed), "classes": CLASSES}


def _stem(split: str, i: int) -> str:
    """File name of scene i without extension: train_0000, as the README's examples."""
    return f"{split}_{i:04d}"


def _is_complete(root: Path, spec: dict) -> bool:
    """True if root holds a finished data set made from spec, with all its files still there."""
    try:
        if json.loads((root / MARKER).read_text()) != spec:
            return False
    except (OSError, ValueError):
        return False
    for split, n in zip(SPLITS, (spec["n_train"], spec["n_valid"])):
        for i in range(n):
            stem = root / split / _stem(split, i)
            if not (Path(f"{stem}.jpg").is_file() and Path(f"{stem}_mask.png").is_file()):
                return False
    return True


def _check_replaceable(root: Path) -> None:
    """Refuse to delete a folder this module did not write: it may be someone's real data."""
    if root.exists() and not (root / MARKER).exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(
            f"{root} exists but has no {MARKER} marker from segpipe.synthetic, so it may hold real data; "
            f"delete it yourself or choose another --root")


def write_dataset(root: str | os.PathLike, n_train: int = 200, n_valid: int = 50,
                  size: tuple[int, int] = (128, 160), seed: int = 0) -> Path:
    """Write n_train + n_valid scenes of size (height, width) under root, replacing an older synthetic set."""
    root = Path(root)
    spec = _spec(n_train, n_valid, size, seed)
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Built beside root and renamed into place, so an interrupted run never leaves a half-written
    # root; the hidden name keeps loaders that scan the parent folder away from it.
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for split_id, (split, n) in enumerate(zip(SPLITS, (n_train, n_valid))):
            (tmp / split).mkdir()
            for i in range(n):
                # One generator per image: image i is the same whatever n_train is.
                image, mask = make_scene(np.random.default_rng([seed, split_id, i]), *size)
                image.save(tmp / split / f"{_stem(split, i)}.jpg", quality=92)
                mask.save(tmp / split / f"{_stem(split, i)}_mask.png")
        (tmp / MARKER).write_text(json.dumps(spec, indent=1))
        _publish(tmp, root, spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once published
    return root


def _publish(tmp: Path, root: Path, spec: dict) -> None:
    """Move the finished tmp folder to root, replacing an older synthetic set; tolerates a racing writer."""
    old = None
    if root.exists():
        _check_replaceable(root)
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(root, old)
        except FileNotFoundError:  # another process moved it first
            old = None
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process (e.g. another torchrun rank) published first; scenes are deterministic,
        # so its copy is as good as ours.
        if not _is_complete(root, spec):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_dataset(root: str | os.PathLike, n_train: int = 200, n_valid: int = 50,
                   size: tuple[int, int] = (128, 160), seed: int = 0) -> Path:
    """root, after writing the data set unless a complete one made with the same arguments is there."""
    root = Path(root)
    if _is_complete(root, _spec(n_train, n_valid, size, seed)):
        return root
    return write_dataset(root, n_train=n_train, n_valid=n_valid, size=size, seed=seed)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write (or check) a synthetic data set."""
    parser = argparse.ArgumentParser(prog="python -m segpipe.synthetic", description=__doc__)
    parser.add_argument("--root", default="data/synthetic", help="output folder (default: %(default)s)")
    parser.add_argument("--train", type=int, default=200, help="training scenes (default: %(default)s)")
    parser.add_argument("--valid", type=int, default=50, help="validation scenes (default: %(default)s)")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"),
                        help="scene height and width in pixels (default: 128 160)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rewrite even if a complete set is there")
    args = parser.parse_args(argv)
    kw = dict(n_train=args.train, n_valid=args.valid, size=tuple(args.size), seed=args.seed)
    start = time.perf_counter()
    if not args.force and _is_complete(Path(args.root), _spec(**kw)):
        print(f"{args.root}: already complete ({args.train} train + {args.valid} valid); --force rewrites it")
        return
    root = write_dataset(args.root, **kw)
    print(f"{root}: wrote {args.train} train + {args.valid} valid scenes of {args.size[0]}x{args.size[1]}, "
          f"classes {CLASSES} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
