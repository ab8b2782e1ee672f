"""The CuPy RawKernel sources of deform_conv2d, run on the CPU through the host shim
(tests/host_shim.py), against the float64 NumPy reference: the three kernels on their own, and
the whole op through the shared driver, in float32 and float64.

Every kernel call goes through CheckedKernels: outputs are poisoned with NaN first and must be
fully written (all inputs are finite), and no input may change.
"""

import collections
import contextlib
import math
from typing import NamedTuple, Optional

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydeform.deform_conv as deform_conv_module
import reference
from pydeform.deform_conv import (
    DeformConv2dGeometry,
    run_deform_conv2d_backward,
    run_deform_conv2d_forward,
)
from tests import host_shim

pytestmark = pytest.mark.skipif(not host_shim.compiler_available(), reason="needs g++")

DTYPES = (np.float32, np.float64)
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}
GRAD_NAMES = ("input", "offset", "weight", "bias", "mask")


@contextlib.contextmanager
def unchanged(**arrays):
    before = {name: a.copy() for name, a in arrays.items() if a is not None}
    yield
    for name, copy in before.items():
        assert np.array_equal(arrays[name], copy, equal_nan=True), f"kernel wrote its input {name}"


def assert_written(**arrays):
    for name, a in arrays.items():
        if a is not None:
            assert np.isfinite(a).all(), f"{name}: {np.isnan(a).sum()} of {a.size} elements not written"


class CheckedKernels:
    """A kernel set wrapper that poisons outputs, checks they are fully written and that the
    inputs are unchanged, and records the batch size of each call."""

    def __init__(self, kernels):
        self._kernels = kernels
        self.xp = kernels.xp
        self.batch_sizes = collections.defaultdict(list)

    def im2col(self, input, offset, mask, columns, geom):
        self.batch_sizes["im2col"].append(input.shape[0])
        columns.fill(np.nan)
        with unchanged(input=input, offset=offset, mask=mask):
            self._kernels.im2col(input, offset, mask, columns, geom)
        assert_written(columns=columns)

    def col2im_coord(self, input, offset, mask, grad_columns, grad_offset, grad_mask, geom):
        self.batch_sizes["col2im_coord"].append(input.shape[0])
        assert (grad_mask is None) == (mask is None)
        grad_offset.fill(np.nan)
        if grad_mask is not None:
            grad_mask.fill(np.nan)
        with unchanged(input=input, offset=offset, mask=mask, grad_columns=grad_columns):
            self._kernels.col2im_coord(input, offset, mask, grad_columns, grad_offset, grad_mask, geom)
        assert_written(grad_offset=grad_offset, grad_mask=grad_mask)

    def col2im(self, offset, mask, grad_columns, grad_input, geom):
        # grad_input is accumulated into (the caller zero-fills it), so it cannot be poisoned.
        self.batch_sizes["col2im"].append(offset.shape[0])
        with unchanged(offset=offset, mask=mask, grad_columns=grad_columns):
            self._kernels.col2im(offset, mask, grad_columns, grad_input, geom)
        assert_written(grad_input=grad_input)


class Problem(NamedTuple):
    geometry: DeformConv2dGeometry
    input: np.ndarray
    offset: np.ndarray
    mask: Optional[np.ndarray]
    weight: np.ndarray
    bias: Optional[np.ndarray]
    grad_output: np.ndarray

    @property
    def options(self):
        g = self.geometry
        return {
            "stride": (g.stride_h, g.stride_w),
            "padding": (g.pad_h, g.pad_w),
            "dilation": (g.dilation_h, g.dilation_w),
        }


def output_size(size, kernel, stride, pad, dilation):
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


@st.composite
def axes(draw):
    """(size, kernel, stride, pad, dilation) of one spatial axis with a non-empty output."""
    kernel, stride = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pad, dilation = draw(st.integers(0, 2)), draw(st.integers(1, 2))
    out = draw(st.integers(1, 4))
    # The smallest size giving `out` outputs, plus a remainder the stride skips; at least 1,
    # which can only make the output larger.
    size = (out - 1) * stride + dilation * (kernel - 1) + 1 - 2 * pad + draw(st.integers(0, stride - 1))
    return max(size, 1), kernel, stride, pad, dilation


def make_geometry(channels, out_channels, groups, offset_groups, axis_h, axis_w):
    (height, kh, sh, ph, dh), (width, kw, sw, pw, dw) = axis_h, axis_w
    return DeformConv2dGeometry(
        channels, height, width, out_channels, kh, kw, sh, sw, ph, pw, dh, dw, groups,
        offset_groups, output_size(*axis_h), output_size(*axis_w),
    )


@st.composite
def geometries(draw):
    groups, offset_groups = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    channels = math.lcm(groups, offset_groups) * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 2))
    return make_geometry(channels, out_channels, groups, offset_groups, draw(axes()), draw(axes()))


def make_problem(geometry, n, has_mask, has_bias, dtype, seed, weight=None):
    g = geometry
    rng = np.random.default_rng(seed)
    points = g.kernel_h * g.kernel_w
    out = (g.out_h, g.out_w)
    offset_shape = (n, 2 * g.offset_groups * points, *out)
    # Integer parts in [-3, 3] send many samples partly or fully outside the image; fractions
    # in [0.05, 0.95] keep positions off the cell edges, where bilinear sampling has kinks that
    # float32 rounding could put on either side.
    offset = rng.integers(-3, 4, offset_shape) + rng.uniform(0.05, 0.95, offset_shape)
    if weight is None:
        weight = rng.standard_normal((g.out_channels, g.in_channels // g.groups, g.kernel_h, g.kernel_w))
    arrays = dict(
        input=rng.standard_normal((n, g.in_channels, g.height, g.width)),
        offset=offset,
        mask=rng.uniform(0.0, 1.0, (n, g.offset_groups * points, *out)) if has_mask else None,
        weight=weight,
        bias=rng.standard_normal(g.out_channels) if has_bias else None,
        grad_output=rng.standard_normal((n, g.out_channels, *out)),
    )
    cast = {k: None if v is None else np.ascontiguousarray(v, dtype=dtype) for k, v in arrays.items()}
    return Problem(geometry=g, **cast)


@st.composite
def problems(draw, min_batch=0):
    return make_problem(
        draw(geometries()),
        n=draw(st.integers(min_batch, 3)),
        has_mask=draw(st.booleans()),
        has_bias=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def assert_matches(actual, expected, dtype, name):
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert actual.dtype == dtype, (name, actual.dtype)
    tolerance = TOLERANCE[np.dtype(dtype)]
    scale = 1.0 + np.abs(expected).max(initial=0.0)
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * scale, err_msg=name)


def shim_kernels():
    return CheckedKernels(host_shim.HostShimDeformConv2dKernels())


def run_forward(kernels, p):
    return run_deform_conv2d_forward(kernels, p.input, p.offset, p.mask, p.weight, p.bias, p.geometry)


def run_backward(kernels, p):
    return run_deform_conv2d_backward(
        kernels, p.grad_output, p.input, p.offset, p.mask, p.weight, p.bias, p.geometry
    )


def reference_forward(p):
    return reference.deform_conv2d(p.input, p.offset, p.weight, p.bias, mask=p.mask, **p.options)


def reference_backward(p):
    return reference.deform_conv2d_backward(
        p.grad_output, p.input, p.offset, p.weight, p.bias, mask=p.mask, **p.options
    )


def assert_backward_matches(grads, p):
    expected = reference_backward(p)
    for name in GRAD_NAMES:
        actual = getattr(grads, name)
        if expected[name] is None:
            assert actual is None, name
        else:
            assert_matches(actual, expected[name], p.input.dtype, f"grad {name}")


def column_selecting_weight(geometry):
    """The weight whose convolution output is the im2col columns: output channel r of weight
    group grp picks column row r of that group, so out[n, (grp*C/G + c)*K + k] = columns row."""
    g = geometry
    rows = g.in_channels // g.groups * g.kernel_h * g.kernel_w
    weight = np.zeros((g.groups * rows, rows))
    for group in range(g.groups):
        weight[group * rows:(group + 1) * rows] = np.eye(rows)
    return weight.reshape(g.groups * rows, g.in_channels // g.groups, g.kernel_h, g.kernel_w)


@settings(max_examples=30, deadline=None)
@given(geometry=geometries(), n=st.integers(1, 3), has_mask=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_kernels_match_reference_columns(geometry, n, has_mask, dtype, seed):
    """Each kernel on its own against the reference run with a column-selecting weight, where
    the output is the columns and grad_output the column gradient."""
    g = geometry
    weight = column_selecting_weight(g)
    g = g._replace(out_channels=weight.shape[0])
    p = make_problem(g, n, has_mask, has_bias=False, dtype=dtype, seed=seed, weight=weight)
    kernels = shim_kernels()
    out_size = g.out_h * g.out_w
    column_rows = g.in_channels * g.kernel_h * g.kernel_w

    columns = np.empty((n, column_rows, out_size), dtype=dtype)
    kernels.im2col(p.input, p.offset, p.mask, columns, g)
    assert_matches(columns, reference_forward(p).reshape(columns.shape), dtype, "columns")

    grad_columns = p.grad_output.reshape(n, column_rows, out_size)
    grad_offset = np.empty_like(p.offset)
    grad_mask = None if p.mask is None else np.empty_like(p.mask)
    kernels.col2im_coord(p.input, p.offset, p.mask, grad_columns, grad_offset, grad_mask, g)
    grad_input = np.zeros_like(p.input)
    kernels.col2im(p.offset, p.mask, grad_columns, grad_input, g)
    expected = reference_backward(p)
    assert_matches(grad_offset, expected["offset"], dtype, "grad offset")
    if has_mask:
        assert_matches(grad_mask, expected["mask"], dtype, "grad mask")
    assert_matches(grad_input, expected["input"], dtype, "grad input")


@settings(max_examples=30, deadline=None)
@given(p=problems())
def test_forward_through_driver_matches_reference(p):
    assert_matches(run_forward(shim_kernels(), p), reference_forward(p), p.input.dtype, "output")


@settings(max_examples=30, deadline=None)
@given(p=problems())
def test_backward_through_driver_matches_reference(p):
    assert_backward_matches(run_backward(shim_kernels(), p), p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype):
    g = make_geometry(4, 6, 2, 2, (5, 3, 1, 1, 1), (6, 2, 2, 0, 1))
    p = make_problem(g, n=0, has_mask=True, has_bias=True, dtype=dtype, seed=0)
    kernels = shim_kernels()
    assert run_forward(kernels, p).shape == (0, g.out_channels, g.out_h, g.out_w)
    grads = run_backward(kernels, p)
    for name in GRAD_NAMES:
        assert getattr(grads, name).shape == getattr(p, name).shape, name


@pytest.mark.parametrize("dtype", DTYPES)
def test_uneven_batch_chunks(monkeypatch, dtype):
    """A column-buffer budget of two images for the backward's two buffers (four for the
    forward's one) splits a batch of 5 into chunks 2, 2, 1 (4, 1)."""
    g = make_geometry(6, 4, 2, 3, (7, 3, 2, 1, 1), (5, 2, 1, 1, 2))
    p = make_problem(g, n=5, has_mask=True, has_bias=True, dtype=dtype, seed=1)
    image_columns_bytes = g.in_channels * g.kernel_h * g.kernel_w * g.out_h * g.out_w * np.dtype(dtype).itemsize
    monkeypatch.setattr(deform_conv_module, "COLUMN_BUFFER_BYTES", 4 * image_columns_bytes + 1)

    forward_kernels = shim_kernels()
    assert_matches(run_forward(forward_kernels, p), reference_forward(p), dtype, "output")
    assert forward_kernels.batch_sizes["im2col"] == [4, 1]

    backward_kernels = shim_kernels()
    assert_backward_matches(run_backward(backward_kernels, p), p)
    for kernel in ("im2col", "col2im_coord", "col2im"):
        assert backward_kernels.batch_sizes[kernel] == [2, 2, 1], kernel


# Sampling positions (h, w) on a 4 x 3 image: on and just inside the edges of (-1, H) x (-1, W),
# on integer coordinates, and NaN; `outside` marks those rule A maps to 0.
BOUNDARY_POSITIONS = (
    ((-1.0, 0.5), True), ((-0.5, 0.5), False), ((-1.0 + 1e-9, 1.25), False), ((3.0, 2.0), False),
    ((3.5, -0.5), False), ((4.0, 1.0), True), ((1.5, -1.0), True), ((2.25, 3.0), True),
    ((0.5, 3.0 - 1e-9), False), ((2.0, -1.0 + 1e-9), False), ((0.0, 0.0), False),
    ((np.nan, np.nan), True),
)


def test_sampling_boundaries():
    g = make_geometry(2, 2, 1, 1, (4, 1, 1, 0, 1), (3, 1, 1, 0, 1))
    p = make_problem(g, n=1, has_mask=True, has_bias=False, dtype=np.float64, seed=2)
    offset = np.empty_like(p.offset)
    outside = np.empty((g.out_h, g.out_w), dtype=bool)
    # A 1x1 kernel without padding: output pixel (y, x) samples at (y + dy, x + dx).
    for pixel, ((h, w), is_outside) in enumerate(BOUNDARY_POSITIONS):
        y, x = divmod(pixel, g.out_w)
        offset[0, :, y, x] = (h - y, w - x)
        outside[y, x] = is_outside
    p = p._replace(offset=offset)
    kernels = shim_kernels()
    output = run_forward(kernels, p)
    assert_matches(output, reference_forward(p), np.float64, "output")
    assert (output[0][:, outside] == 0).all()
    grads = run_backward(kernels, p)
    assert_backward_matches(grads, p)
    assert (grads.offset[0][:, outside] == 0).all() and (grads.mask[0][:, outside] == 0).all()
