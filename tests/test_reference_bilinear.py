"""The reference's two bilinear rules (docs/deform_conv.md, docs/roi.md) against hand-computed values."""

import numpy as np
import pytest

from reference.bilinear import (
    sample_border_clamped,
    sample_zero_padded,
    scatter_to_corners,
)

# X[h, w] = 1 + 3h + w on a 3x3 grid: bilinear sampling of an affine image is exact inside.
AFFINE = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)


def zero_padded(h, w, image=AFFINE):
    return sample_zero_padded(image, 0, np.array([h], float), np.array([w], float))


def border_clamped(y, x, image=AFFINE):
    return sample_border_clamped(image, 0, np.array([y], float), np.array([x], float))


@pytest.mark.parametrize("h, w, expected", [
    (0.5, 0.25, 2.75),          # .375*1 + .125*2 + .375*4 + .125*5
    (1.0, 1.0, 5.0),            # a pixel centre
    (1.75, 0.5, 1 + 3 * 1.75 + 0.5),
    (-0.5, 0.0, 0.5),           # half of X[0, 0]: the row above is zero padding
    (2.5, 2.5, 0.25 * 9),       # only the corner (2, 2) is inside
    (-0.5, -0.5, 0.25 * 1),
    (-1.0, 1.0, 0.0), (3.0, 1.0, 0.0), (1.0, -1.0, 0.0), (1.0, 3.0, 0.0),   # h, w = -1 / H
    (-1.5, 1.0, 0.0), (1.0, 7.0, 0.0),
])
def test_rule_a_values(h, w, expected):
    assert zero_padded(h, w).values[0, 0] == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("sample, h, w, d_dh, d_dw", [
    (zero_padded, 0.5, 0.25, 3.0, 1.0),         # the affine slopes inside
    (zero_padded, -0.5, 1.0, 2.0, 0.5),         # value (1+h) * (1+w) from row 0 alone
    (zero_padded, -0.5, 0.5, 1.5, 0.5),
    (zero_padded, 2.5, 0.0, -7.0, 0.5),         # value (3-h) * (7+w) from row 2 alone
    (zero_padded, -1.0, 1.0, 0.0, 0.0),         # on the boundary: the boundary rule gives 0
    (zero_padded, 3.0, 1.0, 0.0, 0.0),
    (zero_padded, -2.0, 1.5, 0.0, 0.0),
    (border_clamped, 0.5, 0.25, 3.0, 1.0),
    (border_clamped, -0.5, 0.5, 0.0, 1.0),      # y clamped to 0: constant in y
    (border_clamped, 2.5, 1.5, 0.0, 1.0),       # y clamped to H-1
    (border_clamped, 1.5, 2.5, 3.0, 0.0),       # x clamped to W-1
    (border_clamped, -1.5, 1.0, 0.0, 0.0),
])
def test_derivatives(sample, h, w, d_dh, d_dw):
    result = sample(h, w)
    assert result.d_dh[0, 0] == pytest.approx(d_dh, abs=1e-15)
    assert result.d_dw[0, 0] == pytest.approx(d_dw, abs=1e-15)


def test_rule_a_corners():
    corners = zero_padded(-0.25, 1.5).corners
    np.testing.assert_array_equal(corners.valid[:, 0], [False, False, True, True])
    np.testing.assert_array_equal(corners.rows[:, 0], [0, 0, 0, 0])    # row -1 is not read
    np.testing.assert_array_equal(corners.cols[:, 0], [0, 0, 1, 2])
    np.testing.assert_allclose(corners.weights[:, 0], [0, 0, 0.375, 0.375])
    outside = zero_padded(-1.0, 1.5).corners
    assert not outside.valid.any() and not outside.weights.any()
    nan = zero_padded(np.nan, 1.5)
    assert not nan.corners.valid.any() and nan.values[0, 0] == 0


@pytest.mark.parametrize("y, x, expected", [
    (0.5, 0.25, 2.75),          # inside, both rules agree
    (-0.5, 0.0, 1.0),           # X[0, 0] in full (rule A gives 0.5)
    (-1.0, 1.0, 2.0),           # inclusive at -1: clamped to row 0
    (3.0, 1.0, 8.0),            # inclusive at H: clamped to row H-1
    (2.5, 2.5, 9.0),
    (1.0, -1.0, 4.0), (1.0, 3.0, 6.0),
    (2.25, 0.5, 7.5),           # past the last row centre: the last row, interpolated in w
    (-1.001, 1.0, 0.0), (3.001, 1.0, 0.0), (1.0, -1.001, 0.0), (1.0, 3.001, 0.0),
])
def test_rule_b_values(y, x, expected):
    assert border_clamped(y, x).values[0, 0] == pytest.approx(expected, abs=1e-15)


def test_rules_differ_at_minus_half():
    image = np.array([[[[4.0, 8.0], [1.0, 2.0]]]])
    assert border_clamped(-0.5, 0.0, image).values[0, 0] == 4.0
    assert zero_padded(-0.5, 0.0, image).values[0, 0] == 2.0


def test_rule_b_single_row_image():
    image = np.array([[[[2.0, 6.0]]]])
    assert border_clamped(0.7, 0.25, image).values[0, 0] == pytest.approx(3.0)
    assert border_clamped(-0.7, 1.5, image).values[0, 0] == pytest.approx(6.0)


@pytest.mark.parametrize("sample", [sample_zero_padded, sample_border_clamped])
def test_batches_channels_and_derivatives(sample):
    """Every channel and batch entry is read, and d_dh / d_dw are the derivatives of values."""
    rng = np.random.default_rng(1)
    images = rng.standard_normal((3, 2, 4, 5))
    batch_index = np.array([2, 0, 1, 2])
    h = rng.integers(-1, 4, 4) + rng.uniform(0.05, 0.95, 4)
    w = rng.integers(-1, 5, 4) + rng.uniform(0.05, 0.95, 4)
    result = sample(images, batch_index, h, w)
    assert result.values.shape == (4, 2)
    for point in range(4):
        single = sample(images[batch_index[point]][None], 0, h[point:point + 1], w[point:point + 1])
        np.testing.assert_array_equal(result.values[point], single.values[0])
    eps = 1e-6
    d_dh = (sample(images, batch_index, h + eps, w).values
            - sample(images, batch_index, h - eps, w).values) / (2 * eps)
    d_dw = (sample(images, batch_index, h, w + eps).values
            - sample(images, batch_index, h, w - eps).values) / (2 * eps)
    np.testing.assert_allclose(result.d_dh, d_dh, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(result.d_dw, d_dw, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("sample", [sample_zero_padded, sample_border_clamped])
def test_scatter_is_the_adjoint_of_sampling(sample):
    """<scatter(g), X> == <g, sample(X)>: the scatter puts each weight on the right pixel."""
    rng = np.random.default_rng(2)
    images = rng.standard_normal((2, 3, 4, 5))
    batch_index = rng.integers(0, 2, (6, 7))
    h = rng.uniform(-1.5, 4.5, (6, 7))
    w = rng.uniform(-1.5, 5.5, (6, 7))
    result = sample(images, batch_index, h, w)
    grad_values = rng.standard_normal((6, 7, 3))
    grad_images = np.zeros_like(images)
    scatter_to_corners(grad_images, batch_index, result.corners, grad_values)
    assert np.sum(grad_images * images) == pytest.approx(np.sum(grad_values * result.values),
                                                         rel=1e-12)
