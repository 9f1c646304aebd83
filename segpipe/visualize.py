"""Palette, colourised masks, overlays with a legend, confusion-matrix pictures and side-by-side panels (Pillow)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]


def default_palette(num_classes: int) -> list[Colour]:
    """Distinct deterministic colours: the Pascal VOC bit-interleaving scheme."""
    palette = []
    for i in range(num_classes):
        r = g = b = 0
        c = i + 1  # skip black, which marks ignored pixels
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette.append((r, g, b))
    return palette


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: Optional[int] = None) -> Image.Image:
    """A P-mode image of the class indices carrying the palette, so any viewer shows colours; ignored pixels black."""
    mask = np.asarray(mask)
    flat = [0] * 768
    for i, colour in enumerate(palette[:255]):
        flat[3 * i:3 * i + 3] = [int(v) for v in colour]
    indices = mask.astype(np.int64)
    if ignore_index is not None:
        indices = np.where(indices == ignore_index, 255, indices)
    image = Image.fromarray(indices.clip(0, 255).astype(np.uint8), mode="P")
    image.putpalette(flat)
    return image


def legend_entries(mask: np.ndarray, class_names: Sequence[str], ignore_index: Optional[int] = None) -> list[int]:
    """The class indices present in mask (ignore excluded), in class order: what the legend lists."""
    present = np.unique(np.asarray(mask))
    return [int(c) for c in present if c != ignore_index and 0 <= c < len(class_names)]


def overlay(image: Image.Image, mask: np.ndarray, palette: Sequence[Sequence[int]], class_names: Sequence[str],
            alpha: float = 0.5, ignore_index: Optional[int] = None) -> Image.Image:
    """The image blended with the class colours, with a legend strip below naming the classes present."""
    image = image.convert("RGB")
    colours = colorize(mask, palette, ignore_index).convert("RGB").resize(image.size, Image.NEAREST)
    blended = Image.blend(image, colours, alpha)
    if ignore_index is not None:  # keep ignored pixels as they were
        keep = Image.fromarray((np.asarray(mask) == ignore_index).astype(np.uint8) * 255).resize(image.size)
        blended.paste(image, mask=keep)
    return _with_legend(blended, [(class_names[c], tuple(palette[c])) for c in
                                  legend_entries(mask, class_names, ignore_index)])


def _with_legend(image: Image.Image, entries: list[tuple[str, Colour]]) -> Image.Image:
    font = ImageFont.load_default()
    row_h, swatch, pad = 14, 10, 6
    widths = [swatch + 4 + int(ImageDraw.Draw(image).textlength(name, font=font)) + 2 * pad for name, _ in entries]
    rows, x = 1, 0
    for w in widths:  # wrap the legend to the image width
        if x and x + w > image.width:
            rows, x = rows + 1, 0
        x += w
    out = Image.new("RGB", (image.width, image.height + rows * row_h + pad), (255, 255, 255))
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    x, y = pad, image.height + pad // 2
    for (name, colour), w in zip(entries, widths):
        if x > pad and x + w > image.width:
            x, y = pad, y + row_h
        draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=tuple(colour), outline=(0, 0, 0))
        draw.text((x + swatch + 4, y + 1), name, fill=(0, 0, 0), font=font)
        x += w
    return out


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row (truth class) divided by its total; rows with no pixels stay zero."""
    matrix = np.asarray(matrix, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def confusion_matrix_image(matrix: np.ndarray, class_names: Sequence[str], cell: int = 44) -> Image.Image:
    """Row-normalised confusion matrix (rows truth, columns prediction), shaded, with values and class names."""
    norm = row_normalised(matrix)
    n = len(class_names)
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textlength(c, font=font)) for c in class_names) + 10
    top = label_w + 16
    left = label_w + 16
    out = Image.new("RGB", (left + n * cell + 8, top + n * cell + 8), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i in range(n):
        for j in range(n):
            v = norm[i, j]
            shade = int(255 - 200 * v)
            box = [left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1]
            draw.rectangle(box, fill=(shade, shade, 255), outline=(200, 200, 200))
            draw.text((box[0] + 6, box[1] + cell // 2 - 6), f"{v:.2f}", font=font,
                      fill=(255, 255, 255) if v > 0.5 else (0, 0, 0))
        draw.text((4, top + i * cell + cell // 2 - 6), class_names[i], font=font, fill=(0, 0, 0))
    column_labels = Image.new("RGB", (top - 4, n * cell), (255, 255, 255))
    cdraw = ImageDraw.Draw(column_labels)
    for j, name in enumerate(class_names):
        cdraw.text((4, j * cell + cell // 2 - 6), name, font=font, fill=(0, 0, 0))
    out.paste(column_labels.rotate(90, expand=True), (left, 4))
    draw.text((4, 4), "rows: truth", font=font, fill=(0, 0, 0))
    draw.text((4, 16), "cols: prediction", font=font, fill=(0, 0, 0))
    return out


def panels(images: Sequence[Image.Image], titles: Sequence[str]) -> Image.Image:
    """Images side by side with a title above each (e.g. image | truth | prediction)."""
    font = ImageFont.load_default()
    title_h = 16
    height = max(im.height for im in images)
    out = Image.new("RGB", (sum(im.width for im in images), height + title_h), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for im, title in zip(images, titles):
        out.paste(im.convert("RGB"), (x, title_h))
        draw.text((x + 4, 2), title, font=font, fill=(0, 0, 0))
        x += im.width
    return out
