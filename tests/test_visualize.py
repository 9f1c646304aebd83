"""Tests of the palette, colourised masks, overlay legend, confusion-matrix picture and panels."""
import numpy as np
import pytest
from PIL import Image

from segpipe.visualize import (colorize, confusion_matrix_image, default_palette, legend_entries, overlay, panels,
                               row_normalised)

NAMES = ["a", "b", "c", "d"]


def test_default_palette_is_distinct_deterministic_and_never_black():
    palette = default_palette(200)
    assert len(set(palette)) == 200 and (0, 0, 0) not in palette
    assert default_palette(5) == palette[:5]
    assert all(0 <= v <= 255 for colour in palette for v in colour)


def test_colorize_keeps_indices_and_carries_the_palette():
    mask = np.array([[0, 1], [2, 255]])
    image = colorize(mask, [(10, 20, 30), (40, 50, 60), (70, 80, 90)], ignore_index=255)
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), np.array([[0, 1], [2, 255]], dtype=np.uint8))
    assert image.convert("RGB").getpixel((0, 1)) == (70, 80, 90)
    assert image.convert("RGB").getpixel((1, 1)) == (0, 0, 0)


def test_colorize_accepts_palettes_as_lists_and_other_ignore_values():
    image = colorize(np.array([[-1, 1]]), [[1, 2, 3], [4, 5, 6]], ignore_index=-1)
    assert image.convert("RGB").getpixel((0, 0)) == (0, 0, 0)
    assert image.convert("RGB").getpixel((1, 0)) == (4, 5, 6)


def test_colorize_names_an_id_without_colour():
    with pytest.raises(ValueError, match="class id 7 .* 3 colours"):
        colorize(np.array([[0, 7]]), default_palette(3))


def test_colorize_falls_back_to_rgb_beyond_255_classes():
    palette = default_palette(300)
    image = colorize(np.array([[299, 0]]), palette)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == palette[299]


def test_legend_lists_exactly_the_present_classes():
    mask = np.zeros((30, 40), dtype=np.int64)
    mask[10:, 20:] = 3
    mask[0, 0] = 255
    assert legend_entries(mask, NAMES, ignore_index=255) == [(0, "a"), (3, "d")]


def test_overlay_blends_and_puts_the_legend_below():
    mask = np.zeros((30, 40), dtype=np.int64)
    mask[:, 20:] = 1
    mask[0, 0] = 255
    image = Image.new("RGB", (40, 30), (100, 100, 100))
    out = overlay(image, mask, [(200, 0, 0), (0, 200, 0), (0, 0, 200), (9, 9, 9)], NAMES, alpha=0.5, ignore_index=255)
    assert out.width == 40 and out.height > 30
    assert out.getpixel((5, 5)) == (150, 50, 50)
    assert out.getpixel((30, 5)) == (50, 150, 50)
    assert out.getpixel((0, 0)) == (100, 100, 100)  # ignored pixels keep the picture


def test_overlay_legend_widens_for_long_names_on_tiny_images():
    out = overlay(Image.new("RGB", (8, 8)), np.zeros((8, 8), int), default_palette(1), ["a-rather-long-class-name"])
    assert out.width > 8


def test_overlay_rejects_a_mask_of_another_size():
    with pytest.raises(ValueError, match="nearest"):
        overlay(Image.new("RGB", (40, 30)), np.zeros((31, 40), int), default_palette(4), NAMES)


def test_row_normalised_matches_a_hand_count_and_leaves_empty_rows_zero():
    matrix = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    np.testing.assert_allclose(row_normalised(matrix), [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0.25, 0.5]])


def test_confusion_matrix_image_grows_with_classes():
    small = confusion_matrix_image(np.array([[3, 1], [0, 0]]), ["x", "y"])
    large = confusion_matrix_image(np.ones((5, 5)), list("abcde"))
    assert large.width > small.width and large.height > small.height


def test_confusion_matrix_image_checks_the_shape():
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        confusion_matrix_image(np.ones((2, 2)), list("abc"))


def test_panels_width_is_the_sum_of_widths():
    out = panels([Image.new("RGB", (10, 8)), Image.new("P", (12, 6))], ["image", "a title far too long to fit"])
    assert out.width == 22 and out.height > 8 and out.mode == "RGB"


def test_colorize_rejects_float_masks():
    with pytest.raises(ValueError, match="argmax"):
        colorize(np.zeros((2, 2), np.float32), default_palette(2))
