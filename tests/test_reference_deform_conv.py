"""The reference deformable convolution (docs/deform_conv.md): forward against cases built
independently of it, backward against float64 central finite differences."""

from dataclasses import asdict, dataclass

import numpy as np
import pytest

import reference
from reference import deform_conv2d, deform_conv2d_backward
from tests.kernel_set_checks import check_border_rule_with_nan_mask, one_row_problem


@dataclass(frozen=True)
class Geometry:
    """One deformable-convolution problem; kernel, stride, padding, dilation are (h, w) pairs."""

    n: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple = (3, 3)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    offset_groups: int = 1
    mask: bool = False
    bias: bool = False

    def output_size(self):
        return tuple((size + 2 * pad - (dil * (k - 1) + 1)) // step + 1 for size, pad, dil, k, step
                     in zip((self.height, self.width), self.padding, self.dilation, self.kernel,
                            self.stride))

    def options(self):
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def arrays(self, rng):
        """Random float64 arguments; offsets are an integer in [-2, 1] plus a fraction in
        [0.05, 0.95], so no sample sits on a kink and many fall partly or fully outside."""
        points = self.kernel[0] * self.kernel[1]
        out_h, out_w = self.output_size()
        offset_shape = (self.n, 2 * self.offset_groups * points, out_h, out_w)
        arrays = {
            "input": rng.standard_normal((self.n, self.channels, self.height, self.width)),
            "offset": rng.integers(-2, 2, offset_shape) + rng.uniform(0.05, 0.95, offset_shape),
            "weight": rng.standard_normal(
                (self.out_channels, self.channels // self.groups) + tuple(self.kernel)),
        }
        if self.bias:
            arrays["bias"] = rng.standard_normal(self.out_channels)
        if self.mask:
            arrays["mask"] = rng.uniform(-0.5, 1.5, (self.n, self.offset_groups * points, out_h, out_w))
        return arrays


GEOMETRIES = [
    Geometry(n=1, channels=2, height=5, width=6, out_channels=3),
    Geometry(n=2, channels=3, height=6, width=5, out_channels=2, kernel=(2, 3), stride=(2, 1),
             padding=(1, 2), dilation=(1, 2), mask=True, bias=True),
    Geometry(n=1, channels=4, height=5, width=5, out_channels=4, padding=(1, 1), groups=2,
             mask=True, bias=True),
    Geometry(n=2, channels=4, height=7, width=6, out_channels=3, kernel=(3, 2), stride=(2, 2),
             padding=(2, 1), dilation=(2, 1), offset_groups=2, mask=True),
    Geometry(n=1, channels=8, height=4, width=6, out_channels=6, kernel=(1, 3), groups=2,
             offset_groups=4, mask=True),
    Geometry(n=1, channels=4, height=6, width=6, out_channels=2, stride=(1, 2), padding=(2, 2),
             dilation=(2, 2), groups=2, offset_groups=2, bias=True),
    Geometry(n=3, channels=2, height=3, width=4, out_channels=2, kernel=(1, 1), bias=True),
]


def naive_conv2d(input, weight, bias, stride, padding, dilation):
    """Grouped 2-D convolution (cross-correlation) by loops over its definition."""
    n, channels, height, width = input.shape
    out_channels, group_channels, kh, kw = weight.shape
    out_per_group = out_channels // (channels // group_channels)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    padded = np.pad(input, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, out_channels, out_h, out_w))
    for b, o, y, x in np.ndindex(out.shape):
        first_channel = (o // out_per_group) * group_channels
        for c, i, j in np.ndindex(group_channels, kh, kw):
            out[b, o, y, x] += (weight[o, c, i, j]
                                * padded[b, first_channel + c, y * sh + i * dh, x * sw + j * dw])
    return out if bias is None else out + bias[None, :, None, None]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("unit_mask", [False, True])
def test_zero_offsets_give_an_ordinary_convolution(geometry, unit_mask):
    arrays = geometry.arrays(np.random.default_rng(0))
    arrays["offset"] = np.zeros_like(arrays["offset"])
    arrays.pop("mask", None)
    if unit_mask:
        arrays["mask"] = np.ones_like(arrays["offset"][:, ::2])
    expected = naive_conv2d(arrays["input"], arrays["weight"], arrays.get("bias"),
                            geometry.stride, geometry.padding, geometry.dilation)
    actual = deform_conv2d(**arrays, **geometry.options())
    assert actual.shape == (geometry.n, geometry.out_channels) + geometry.output_size()
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


def test_hand_computed_fractional_offsets():
    # X[h, w] = 1 + 3h + w, so bilinear sampling with all 4 corners inside is exact.
    image = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    offset = np.zeros((1, 2, 3, 3))
    offset[0, :, 0, 0] = (0.5, 0.25)     # samples (0.5, 0.25): 1 + 1.5 + 0.25
    offset[0, :, 1, 1] = (-1.5, 0.0)     # samples (-0.5, 1): half of X[0, 1] = 2
    offset[0, :, 2, 2] = (0.5, 0.5)      # samples (2.5, 2.5): a quarter of X[2, 2] = 9
    mask = np.ones((1, 1, 3, 3))
    mask[0, 0, 0, 0] = 0.5
    sampled = np.array([[2.75, 2.0, 3.0], [4.0, 1.0, 6.0], [7.0, 8.0, 2.25]])
    expected = 2.0 * sampled + 0.5
    expected[0, 0] = 2.0 * 0.5 * 2.75 + 0.5
    actual = deform_conv2d(image, offset, np.full((1, 1, 1, 1), 2.0), np.array([0.5]), mask=mask)
    np.testing.assert_allclose(actual[0, 0], expected, rtol=1e-15)


@pytest.mark.parametrize("point", range(6))
def test_offset_and_mask_channels_of_each_kernel_point(point):
    """A weight that is 1 at one kernel point reads that point's (dy, dx) and mask channels."""
    geometry = Geometry(n=2, channels=1, height=6, width=7, out_channels=1, kernel=(2, 3),
                        stride=(2, 1), padding=(1, 2), dilation=(1, 2), mask=True)
    rng = np.random.default_rng(point)
    arrays = geometry.arrays(rng)
    rows, cols = np.meshgrid(np.arange(6.0), np.arange(7.0), indexing="ij")
    arrays["input"] = np.broadcast_to(0.5 + 2.0 * rows - cols, arrays["input"].shape)
    arrays["weight"] = np.zeros(arrays["weight"].shape)
    i, j = divmod(point, 3)
    arrays["weight"][0, 0, i, j] = 1.0
    out_h, out_w = geometry.output_size()
    # Where the sample lands: anywhere with all 4 corners inside, so the answer is affine.
    target_h = rng.uniform(0, 5, (2, out_h, out_w))
    target_w = rng.uniform(0, 6, (2, out_h, out_w))
    arrays["offset"][:, 2 * point] = target_h - (np.arange(out_h) * 2 - 1 + i)[:, None]
    arrays["offset"][:, 2 * point + 1] = target_w - (np.arange(out_w) - 2 + 2 * j)[None, :]
    expected = arrays["mask"][:, point] * (0.5 + 2.0 * target_h - target_w)
    actual = deform_conv2d(**arrays, **geometry.options())
    np.testing.assert_allclose(actual[:, 0], expected, rtol=1e-12, atol=1e-12)


def test_weight_groups_see_only_their_channels():
    geometry = Geometry(n=2, channels=6, height=5, width=5, out_channels=4, padding=(1, 1),
                        groups=2, mask=True, bias=True)
    arrays = geometry.arrays(np.random.default_rng(3))
    actual = deform_conv2d(**arrays, **geometry.options())
    for group in range(2):
        channels, outputs = slice(3 * group, 3 * group + 3), slice(2 * group, 2 * group + 2)
        alone = deform_conv2d(arrays["input"][:, channels], arrays["offset"],
                              arrays["weight"][outputs], arrays["bias"][outputs],
                              mask=arrays["mask"], **geometry.options())
        np.testing.assert_allclose(actual[:, outputs], alone, rtol=1e-12, atol=1e-12)


def test_offset_groups_split_the_channels():
    geometry = Geometry(n=2, channels=4, height=5, width=6, out_channels=3, kernel=(2, 2),
                        padding=(1, 0), offset_groups=2, mask=True)
    arrays = geometry.arrays(np.random.default_rng(4))
    actual = deform_conv2d(**arrays, **geometry.options())
    # Convolution sums over channels: each offset group's channels form a problem of their own.
    expected = sum(
        deform_conv2d(arrays["input"][:, 2 * g:2 * g + 2], arrays["offset"][:, 8 * g:8 * g + 8],
                      arrays["weight"][:, 2 * g:2 * g + 2], mask=arrays["mask"][:, 4 * g:4 * g + 4],
                      **geometry.options())
        for g in range(2))
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


def test_boundary_samples_and_the_gradient_rule():
    """Samples on or outside the border of (-1, H) x (-1, W) read 0 and get no offset or mask
    gradient, even at h = -1 exactly where the one-sided derivative is not 0; just inside the
    border both gradients are live."""
    problem = one_row_problem(sample_h=[-1.0, 3.0, 1.0, 1.0, -1.5, -0.999, 2.9, 1.5],
                              sample_w=[1.0, 2.0, -1.0, 8.0, 1.0, 1.0, 2.0, 7.99])
    # Output pixels 0..4 sample on or outside the border; 5..7 sample just inside it.
    out = deform_conv2d(**problem)
    np.testing.assert_array_equal(out[0, :, 0, :5], np.repeat(problem["bias"][:, None], 5, 1))
    assert np.all(out[0, :, 0, 5:] != problem["bias"][:, None])
    grads = deform_conv2d_backward(np.ones_like(out), **problem)
    assert not grads["offset"][..., :5].any() and not grads["mask"][..., :5].any()
    assert np.all(grads["mask"][..., 5:] != 0)
    assert np.all(grads["offset"][0, 0, 0, 5:7] != 0) and grads["offset"][0, 1, 0, 7] != 0


def test_empty_batch():
    geometry = Geometry(n=0, channels=4, height=5, width=6, out_channels=2, kernel=(3, 2),
                        stride=(2, 1), groups=2, offset_groups=2, mask=True, bias=True)
    arrays = geometry.arrays(np.random.default_rng(6))
    out = deform_conv2d(**arrays, **geometry.options())
    assert out.shape == (0, 2) + geometry.output_size()
    grads = deform_conv2d_backward(out, **arrays, **geometry.options())
    for name, array in arrays.items():
        assert grads[name].shape == array.shape
    assert not grads["weight"].any() and not grads["bias"].any()


GRADIENT_CASES = [(index, geometry, name) for index, geometry in enumerate(GEOMETRIES)
                  for name in ("input", "offset", "weight", "bias", "mask")
                  if name not in ("bias", "mask") or getattr(geometry, name)]


@pytest.mark.parametrize("index, geometry, name", GRADIENT_CASES,
                         ids=[f"{index}-{name}" for index, _, name in GRADIENT_CASES])
def test_directional_derivatives(index, geometry, name):
    """<grad, v> equals the central difference of <grad_output, forward> along a random v."""
    rng = np.random.default_rng(100 + index)
    arrays = geometry.arrays(rng)
    out_h, out_w = geometry.output_size()
    grad_output = rng.standard_normal((geometry.n, geometry.out_channels, out_h, out_w))
    direction = rng.standard_normal(arrays[name].shape)
    analytic = np.sum(deform_conv2d_backward(grad_output, **arrays, **geometry.options())[name]
                      * direction)

    def loss(step):
        moved = {**arrays, name: arrays[name] + step * direction}
        return np.sum(grad_output * deform_conv2d(**moved, **geometry.options()))

    eps = 1e-6
    numeric = (loss(eps) - loss(-eps)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("geometry", GEOMETRIES[:4])
def test_gradient_cases_reach_past_the_border(geometry):
    """The finite-difference cases do test the boundary rule: some samples are fully outside,
    some only partly, some fully inside (positions as in docs/deform_conv.md)."""
    arrays = geometry.arrays(np.random.default_rng(0))
    kh, kw = geometry.kernel
    out_h, out_w = geometry.output_size()
    offset = arrays["offset"].reshape(geometry.n, -1, kh, kw, 2, out_h, out_w)
    rows = (np.arange(out_h)[None, :] * geometry.stride[0] - geometry.padding[0]
            + np.arange(kh)[:, None] * geometry.dilation[0])
    sample_h = offset[..., 0, :, :] + rows[:, None, :, None]
    outside = (sample_h <= -1) | (sample_h >= geometry.height)
    partly = ((sample_h > -1) & (sample_h < 0)) | ((sample_h > geometry.height - 1)
                                                   & (sample_h < geometry.height))
    assert outside.any() and partly.any() and (~outside & ~partly).any()


def test_border_rule_with_nan_mask():
    check_border_rule_with_nan_mask(reference)
