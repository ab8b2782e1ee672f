"""docs/deform_unet_sampling.py: the positions it draws, which it computes with pydeform's
deform_pool2d and deform_conv_transpose2d, are those of the formulas of docs/deform_unet.md
(tests/test_docs_figures.py draws the figure)."""

import numpy as np
import pytest

from tests.docs_figures import load_script


@pytest.fixture(scope="module")
def figure():
    return load_script("deform_unet_sampling")


def formula_positions(figure, y, x):
    """Regular position plus the offset pair of each kernel point: h, w, each [9]."""
    regular_h, regular_w = figure.regular_grid(y, x)
    return regular_h.ravel() + figure.OFFSET[0::2, y, x], regular_w.ravel() + figure.OFFSET[1::2, y, x]


def test_drawn_pixels_are_deformed_and_stay_inside_the_map(figure):
    for y, x in figure.PIXELS:
        h, w = formula_positions(figure, y, x)
        assert min(h.min(), w.min()) >= 0 and max(h.max(), w.max()) <= figure.MAP_SIZE - 1
        regular_h, regular_w = figure.regular_grid(y, x)
        assert np.abs(h - regular_h.ravel()).max() > 0.5 or np.abs(w - regular_w.ravel()).max() > 0.5
        assert np.any(h % 1 != 0)  # some samples fall between pixel centres


def test_pool_positions_are_the_formulas(figure):
    h, w = figure.pool_positions()
    for y, x in figure.PIXELS:
        expected_h, expected_w = formula_positions(figure, y, x)
        np.testing.assert_allclose(h[:, y, x], expected_h, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(w[:, y, x], expected_w, rtol=1e-12, atol=1e-12)
    # Elsewhere the offsets are zero: the plain pooling window.
    regular_h, regular_w = figure.regular_grid(3, 6)
    assert (3, 6) not in figure.PIXELS
    np.testing.assert_allclose(h[:, 3, 6], regular_h.ravel(), atol=1e-12)
    np.testing.assert_allclose(w[:, 3, 6], regular_w.ravel(), atol=1e-12)


def test_splat_positions_are_the_formulas(figure):
    for y, x in figure.PIXELS + ((3, 6),):
        h, w = figure.splat_positions(y, x)
        offset_h, offset_w = formula_positions(figure, y, x)
        np.testing.assert_allclose(h, offset_h, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(w, offset_w, rtol=1e-12, atol=1e-12)


def test_ringed_point_is_the_largest_sample_of_the_window(figure):
    """The arg-max the figure rings: the kernel point whose bilinear sample of the blob is
    largest (the lowest one on ties)."""
    h, w = figure.pool_positions()
    image = figure.scene()
    argmax = figure.pool_argmax()
    for y, x in figure.PIXELS:
        samples = []
        for k in range(figure.POINTS):
            top, left = int(np.floor(h[k, y, x])), int(np.floor(w[k, y, x]))
            dy, dx = h[k, y, x] - top, w[k, y, x] - left
            patch = image[top:top + 2, left:left + 2]
            samples.append(patch[0, 0] * (1 - dy) * (1 - dx) + patch[0, 1] * (1 - dy) * dx
                           + patch[1, 0] * dy * (1 - dx) + patch[1, 1] * dy * dx)
        assert argmax[y, x] == int(np.argmax(samples))
