import numpy as np
from PIL import Image

from segpipe.visualize import (colorize, confusion_matrix_image, default_palette, legend_entries, overlay, panels,
                               row_normalised)


def test_default_palette_is_distinct_and_never_black():
    palette = default_palette(40)
    assert len(set(palette)) == 40 and (0, 0, 0) not in palette


def test_colorize_keeps_indices_and_carries_the_palette():
    mask = np.array([[0, 1], [2, 255]])
    image = colorize(mask, [(10, 20, 30), (40, 50, 60), (70, 80, 90)], ignore_index=255)
    assert image.mode == "P"
    assert np.array_equal(np.asarray(image), np.array([[0, 1], [2, 255]], dtype=np.uint8))
    assert image.convert("RGB").getpixel((0, 1)) == (70, 80, 90)
    assert image.convert("RGB").getpixel((1, 1)) == (0, 0, 0)


def test_overlay_legend_lists_exactly_the_present_classes():
    mask = np.zeros((30, 40), dtype=np.int64)
    mask[10:, 20:] = 3
    mask[0, 0] = 255
    assert legend_entries(mask, ["a", "b", "c", "d"], ignore_index=255) == [0, 3]
    out = overlay(Image.new("RGB", (40, 30)), mask, default_palette(4), ["a", "b", "c", "d"], ignore_index=255)
    assert out.width == 40 and out.height > 30


def test_confusion_matrix_is_row_normalised_and_grows_with_classes():
    matrix = np.array([[3, 1], [0, 0]])
    assert np.allclose(row_normalised(matrix), [[0.75, 0.25], [0, 0]])
    small = confusion_matrix_image(matrix, ["x", "y"])
    large = confusion_matrix_image(np.ones((5, 5)), list("abcde"))
    assert large.width > small.width and large.height > small.height


def test_panels_width_is_the_sum_of_widths():
    out = panels([Image.new("RGB", (10, 8)), Image.new("RGB", (12, 8))], ["image", "truth"])
    assert out.width == 22 and out.height > 8
