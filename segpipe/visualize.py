"""Pictures people look at: class palettes, colourised masks, overlays with a legend, confusion matrices, panels."""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]

IGNORE_SLOT = 255  # palette slot of ignored pixels in colourised masks; always black
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
PAD = 4
FONT_SIZE = 10


@functools.lru_cache(maxsize=8)
def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font: needs no font file on any machine (fixed size if Pillow lacks FreeType)."""
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def _font_size_for(width: int) -> int:
    """Text size for a picture of this width: 10 px on small images, larger on big ones so it stays legible."""
    return max(FONT_SIZE, round(width / 60))


def _text_size(text: str, size: int = FONT_SIZE) -> tuple[int, int]:
    """Width and height in pixels of text in the default font."""
    left, top, right, bottom = _font(size).getbbox(text)
    return right - left, bottom


def _line_height(size: int = FONT_SIZE) -> int:
    """Height of one line of text, the same for every string so rows line up."""
    return _text_size("Ag|", size)[1] + 2


def default_palette(num_classes: int) -> list[Colour]:
    """num_classes distinct colours by Pascal VOC's bit-interleaving, skipping VOC's black for class 0."""
    palette = []
    # VOC's colour 0 is black, which we keep for ignored pixels, so class i gets VOC colour i + 1.
    for label in range(1, num_classes + 1):
        rgb = [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((label >> (3 * bit + channel)) & 1) << (7 - bit)
        palette.append(tuple(rgb))
    return palette


def _class_ids(mask: np.ndarray, num_colours: int, ignore_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    """mask as an integer array and a boolean array of its ignored pixels; raises on ids without a colour."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D array of class ids (H, W), got shape {mask.shape}; "
                         f"for a batch, pass one mask at a time")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise ValueError(f"mask must hold integer class ids, got dtype {mask.dtype}; for logits or "
                         f"probabilities pass their argmax over the class axis")
    ignored = mask == ignore_index if ignore_index is not None else np.zeros(mask.shape, bool)
    kept = mask[~ignored]
    if kept.size and (kept.min() < 0 or kept.max() >= num_colours):
        bad = kept.min() if kept.min() < 0 else kept.max()
        raise ValueError(f"mask holds class id {bad} but the palette has {num_colours} colours; pass "
                         f"ignore_index={bad} if it marks unlabelled pixels, or a longer palette "
                         f"(default_palette(n))")
    return mask, ignored


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int | None = None) -> Image.Image:
    """A P-mode image whose pixel values are the class ids and whose palette holds their colours; ignored black.

    A P image has 256 slots and one is kept for ignored pixels, so with more than 255 classes this
    returns the colours as an RGB image instead.
    """
    mask, ignored = _class_ids(mask, len(palette), ignore_index)
    if len(palette) > IGNORE_SLOT:
        colours = np.asarray(palette, dtype=np.uint8)[np.where(ignored, 0, mask)]
        return Image.fromarray(np.where(ignored[..., None], np.uint8(0), colours))
    image = Image.fromarray(np.where(ignored, IGNORE_SLOT, mask).astype(np.uint8))  # putpalette makes this L image P
    flat = [int(value) for colour in palette for value in colour]
    image.putpalette(flat + [0] * (3 * 256 - len(flat)))  # the unused slots, IGNORE_SLOT among them, are black
    return image


def legend_entries(mask: np.ndarray, class_names: Sequence[str],
                   ignore_index: int | None = None) -> list[tuple[int, str]]:
    """(class id, name) of each class present in mask, by id: what the overlay's legend lists."""
    mask, ignored = _class_ids(mask, len(class_names), ignore_index)
    return [(int(i), class_names[int(i)]) for i in np.unique(mask[~ignored])]


def _legend_strip(entries: list[tuple[int, str]], palette: Sequence[Sequence[int]], width: int) -> Image.Image:
    """Swatch + name for each entry, wrapped into as many rows of the given width as needed."""
    size = _font_size_for(width)
    line, swatch = _line_height(size), _line_height(size) - 2
    items = [(tuple(int(v) for v in palette[i]), name, swatch + 3 + _text_size(name, size)[0]) for i, name in entries]
    width = max([width] + [w + 2 * PAD for _, _, w in items])
    rows, x = [[]], PAD
    for colour, name, w in items:
        if x + w > width - PAD and rows[-1]:
            rows.append([])
            x = PAD
        rows[-1].append((x, colour, name))
        x += w + 2 * PAD
    strip = Image.new("RGB", (width, PAD + len(rows) * (line + 2) + PAD), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        y = PAD + r * (line + 2)
        for x, colour, name in row:
            # The outline keeps white or pale swatches visible on the white strip.
            draw.rectangle([x, y + 1, x + swatch - 1, y + swatch], fill=colour, outline=INK)
            draw.text((x + swatch + 3, y), name, fill=INK, font=_font(size))
    return strip


def overlay(image: Image.Image, mask: np.ndarray, palette: Sequence[Sequence[int]], class_names: Sequence[str],
            alpha: float = 0.5, ignore_index: int | None = None) -> Image.Image:
    """image with mask's colours blended in at alpha and a legend of the present classes in a strip below."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be between 0 (image only) and 1 (mask only)")
    if len(palette) < len(class_names):
        raise ValueError(f"{len(class_names)} class names but only {len(palette)} palette colours; "
                         f"use default_palette({len(class_names)})")
    mask, ignored = _class_ids(mask, len(class_names), ignore_index)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from image size (H, W) = {rgb.shape[:2]}; "
                         f"resize the mask with nearest-neighbour interpolation first")
    colours = np.asarray(palette, dtype=np.float32)[np.where(ignored, 0, mask)]
    blended = np.where(ignored[..., None], rgb, (1 - alpha) * rgb + alpha * colours)  # ignored: picture only
    picture = Image.fromarray(blended.round().astype(np.uint8))
    legend = _legend_strip(legend_entries(mask, class_names, ignore_index), palette, picture.width)
    canvas = Image.new("RGB", (legend.width, picture.height + legend.height), BACKGROUND)
    canvas.paste(picture, (0, 0))
    canvas.paste(legend, (0, picture.height))
    return canvas


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row of a confusion matrix divided by its sum (truth -> prediction rates); all-zero rows stay 0."""
    matrix = np.asarray(matrix, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def _shade(value: float) -> Colour:
    """White for 0 to dark blue for 1, like matplotlib's Blues."""
    low, high = np.array([247, 251, 255]), np.array([8, 48, 107])
    return tuple(int(c) for c in (low + (high - low) * value).round())


def _vertical_text(text: str, colour: Colour = INK) -> Image.Image:
    """text rendered bottom-to-top as an RGBA image, for column and axis labels."""
    w, h = _text_size(text)
    label = Image.new("RGBA", (w + 1, h + 1), (0, 0, 0, 0))
    ImageDraw.Draw(label).text((0, 0), text, fill=colour + (255,), font=_font())
    return label.rotate(90, expand=True)


def confusion_matrix_image(matrix: np.ndarray, class_names: Sequence[str]) -> Image.Image:
    """Row-normalised confusion matrix (rows truth, columns prediction) as shaded cells with their values."""
    matrix = np.asarray(matrix)
    n = len(class_names)
    if matrix.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {matrix.shape} but there are {n} class names; "
                         f"expected ({n}, {n}) with rows = truth and columns = prediction")
    rates, empty = row_normalised(matrix), matrix.sum(axis=1) == 0
    cell = max(_text_size("0.00")[0] + 2 * PAD, _line_height() + 2 * PAD)
    line = _line_height()
    name_w = max(_text_size(name)[0] for name in class_names)
    left = PAD + line + PAD + name_w + PAD  # axis title "truth", then row names
    top = PAD
    grid_w = grid_h = n * cell
    bottom = PAD + name_w + PAD + line + PAD  # column names, then axis title "prediction"
    image = Image.new("RGB", (left + grid_w + PAD, top + grid_h + bottom), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for t in range(n):
        y = top + t * cell
        draw.text((left - PAD - _text_size(class_names[t])[0], y + (cell - line) // 2 + 1), class_names[t],
                  fill=INK, font=_font())
        for p in range(n):
            x = left + p * cell
            # A class that never occurs in the truth has no rates: grey with a dash, not a row of zeros.
            fill = (225, 225, 225) if empty[t] else _shade(rates[t, p])
            text = "-" if empty[t] else f"{rates[t, p]:.2f}"
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fill, outline=(200, 200, 200))
            tw = _text_size(text)[0]
            colour = (255, 255, 255) if not empty[t] and rates[t, p] > 0.55 else INK
            draw.text((x + (cell - tw) // 2, y + (cell - line) // 2 + 1), text, fill=colour, font=_font())
    for p, name in enumerate(class_names):
        label = _vertical_text(name)
        image.paste(label, (left + p * cell + (cell - label.width) // 2, top + grid_h + PAD), label)
    pw = _text_size("prediction")[0]
    draw.text((left + (grid_w - pw) // 2, top + grid_h + PAD + name_w + PAD), "prediction", fill=INK, font=_font())
    title = _vertical_text("truth")
    image.paste(title, (PAD, top + (grid_h - title.height) // 2), title)
    return image


def _fit(text: str, width: int, size: int = FONT_SIZE) -> str:
    """text shortened with '..' until it fits in width pixels."""
    if _text_size(text, size)[0] <= width:
        return text
    while text and _text_size(text + "..", size)[0] > width:
        text = text[:-1]
    return text + ".." if text else ""


def panels(images: Sequence[Image.Image], titles: Sequence[str]) -> Image.Image:
    """images side by side (e.g. image | truth | prediction) under their titles, a white line between; width = sum."""
    if len(images) != len(titles) or not images:
        raise ValueError(f"panels needs one title per image and at least one image; "
                         f"got {len(images)} images and {len(titles)} titles")
    size = _font_size_for(min(im.width for im in images))
    strip = _line_height(size) + PAD
    canvas = Image.new("RGB", (sum(im.width for im in images), strip + max(im.height for im in images)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for image, title in zip(images, titles):
        text = _fit(title, image.width - 2, size)
        draw.text((x + (image.width - _text_size(text, size)[0]) // 2, PAD // 2), text, fill=INK, font=_font(size))
        canvas.paste(image.convert("RGB"), (x, strip))
        if x:  # truth and prediction share colours: without a divider they read as one picture
            draw.line([(x, strip), (x, canvas.height - 1)], fill=BACKGROUND)
        x += image.width
    return canvas
