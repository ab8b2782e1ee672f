"""docs/deform_conv_sampling.py: the positions it draws are where pydeform's deform_conv2d
samples (tests/test_docs_figures.py draws the figure)."""

import numpy as np
import pytest

import pydeform
from tests.docs_figures import load_script


@pytest.fixture(scope="module")
def figure():
    return load_script("deform_conv_sampling")


def sampled_positions(figure, mask):
    """pydeform's deform_conv2d on the images x and y of each pixel's own coordinates, with a
    weight that copies channel c at kernel point ij to output channel c*9 + ij: since bilinear
    sampling is exact on affine images inside the map, the output holds the read positions
    (times the mask). Returns w, h, each [9, H, W]."""
    rows, columns = np.mgrid[: figure.MAP_SIZE, : figure.MAP_SIZE].astype(np.float64)
    images = np.stack([columns, rows])[None]
    output_channels = 2 * figure.POINTS
    weight = np.eye(output_channels).reshape(output_channels, 2, figure.KERNEL, figure.KERNEL)
    out = pydeform.deform_conv2d(
        images, figure.OFFSET[None], weight, stride=figure.STRIDE, padding=figure.PADDING,
        dilation=figure.DILATION, mask=None if mask is None else mask[None],
    )[0]
    return out[: figure.POINTS], out[figure.POINTS :]


def test_drawn_positions_lie_inside_the_map(figure):
    moves = []
    for y, x in figure.PIXELS:
        for positions in figure.sampling_positions(y, x):
            assert positions.min() >= 0 and positions.max() <= figure.MAP_SIZE - 1
        moves.append(np.subtract(figure.sampling_positions(y, x), figure.regular_grid(y, x)))
    # Every drawn pixel's grid is deformed, and some samples fall between pixel centres.
    assert all(np.abs(move).max() > 0.5 for move in moves)
    assert np.any(np.array(moves) % 1 != 0)


def test_deformed_positions_are_pydeforms(figure):
    w, h = sampled_positions(figure, mask=None)
    for y, x in figure.PIXELS:
        expected_h, expected_w = figure.sampling_positions(y, x)
        np.testing.assert_allclose(h[:, y, x], expected_h.ravel(), rtol=1e-12)
        np.testing.assert_allclose(w[:, y, x], expected_w.ravel(), rtol=1e-12)


def test_modulated_samples_are_pydeforms(figure):
    w, h = sampled_positions(figure, mask=figure.MASK)
    for y, x in figure.PIXELS:
        expected_h, expected_w = figure.sampling_positions(y, x)
        np.testing.assert_allclose(h[:, y, x], figure.MASK[:, y, x] * expected_h.ravel(), rtol=1e-12)
        np.testing.assert_allclose(w[:, y, x], figure.MASK[:, y, x] * expected_w.ravel(), rtol=1e-12)


def test_zero_offsets_read_the_regular_grid(figure):
    """Everywhere but the drawn pixels the offsets are zero: the ordinary convolution's grid
    (first panel), wherever the grid lies inside the map."""
    w, h = sampled_positions(figure, mask=None)
    y, x = 7, 2  # not a drawn pixel, grid inside the map
    assert (y, x) not in figure.PIXELS
    regular_h, regular_w = figure.regular_grid(y, x)
    np.testing.assert_array_equal(h[:, y, x], regular_h.ravel())
    np.testing.assert_array_equal(w[:, y, x], regular_w.ravel())
