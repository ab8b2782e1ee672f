"""The CuPy RawKernel sources of deform_conv2d, run on the CPU through the host shim
(tests/host_shim.py), against the float64 NumPy reference in float32 and float64: the three
kernels on their own, and the whole public op with the shim as its kernel set (validation,
driver, GEMMs and batch chunking included).

Every kernel call goes through CheckedKernels: outputs are poisoned with NaN first and must be
fully written (inputs are finite), and no input may change.
"""

import collections
import contextlib
import dataclasses
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydeform.deform_conv as deform_conv_module
from pydeform import deform_conv2d, deform_conv2d_backward
from pydeform.deform_conv import DeformConv2dGeometry
from tests import host_shim
from tests.kernel_set_checks import check_border_rule_with_nan_mask
from tests.strategies import DeformConvCase, assert_close, assert_grads_close, deform_conv_cases

pytestmark = pytest.mark.skipif(not host_shim.compiler_available(), reason="needs g++")

# The host shim instantiates the kernels for float and double only.
DTYPES = (np.float32, np.float64)


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
        self.direct_forward = kernels.direct_forward
        self.workspace = kernels.workspace
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


def checked_shim_kernels():
    return CheckedKernels(host_shim.HostShimDeformConv2dKernels())


@contextlib.contextmanager
def shim_backend():
    """The public op, for NumPy arrays, runs on the host shim's kernels; yields the kernel set."""
    kernels = checked_shim_kernels()
    with mock.patch.object(deform_conv_module, "deform_conv2d_kernels", lambda library, backend: kernels):
        yield kernels


def run_forward(case):
    with shim_backend():
        out = deform_conv2d(**case.arguments())
    assert out.dtype == case.input.dtype
    return out


def run_backward(case):
    with shim_backend():
        return deform_conv2d_backward(case.grad_output, **case.arguments())


def pair(value):
    return (value, value) if np.isscalar(value) else tuple(value)


def geometry_of(case):
    _, channels, height, width = case.input.shape
    out_channels, _, kernel_h, kernel_w = case.weight.shape
    return DeformConv2dGeometry(
        channels, height, width, out_channels, kernel_h, kernel_w, *pair(case.stride),
        *pair(case.padding), *pair(case.dilation), case.groups, case.offset_groups,
        *case.offset.shape[2:],
    )


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
@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_kernels_match_reference_columns(data, dtype):
    """Each kernel on its own against the reference run with a column-selecting weight, where
    the output is the columns and grad_output the column gradient."""
    case = data.draw(deform_conv_cases(dtype=dtype, with_grad=True))
    weight = column_selecting_weight(geometry_of(case)).astype(dtype)
    g = geometry_of(case)._replace(out_channels=weight.shape[0])
    n, out_size = case.input.shape[0], g.out_h * g.out_w
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    grad_columns = rng.standard_normal((n, weight.shape[0], out_size)).astype(dtype)
    case = dataclasses.replace(
        case, weight=weight, bias=None,
        grad_output=grad_columns.reshape(n, g.out_channels, g.out_h, g.out_w),
    )
    kernels = checked_shim_kernels()

    columns = np.empty_like(grad_columns)
    kernels.im2col(case.input, case.offset, case.mask, columns, g)
    assert_close("columns", columns, case.reference_forward().reshape(columns.shape), dtype)

    grad_offset = np.empty_like(case.offset)
    grad_mask = None if case.mask is None else np.empty_like(case.mask)
    kernels.col2im_coord(case.input, case.offset, case.mask, grad_columns, grad_offset, grad_mask, g)
    grad_input = np.zeros_like(case.input)
    kernels.col2im(case.offset, case.mask, grad_columns, grad_input, g)
    expected = case.reference_backward()
    assert_close("grad offset", grad_offset, expected["offset"], dtype)
    if case.mask is not None:
        assert_close("grad mask", grad_mask, expected["mask"], dtype)
    assert_close("grad input", grad_input, expected["input"], dtype)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_forward_matches_reference(data, dtype):
    case = data.draw(deform_conv_cases(dtype=dtype))
    assert_close("output", run_forward(case), case.reference_forward(), dtype)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_backward_matches_reference(data, dtype):
    case = data.draw(deform_conv_cases(dtype=dtype, with_grad=True))
    assert_grads_close(run_backward(case), case.reference_backward(), dtype)


def regular_case(dtype, n, seed, image=(7, 5)):
    """C=6 in 2 weight groups and 3 offset groups, 3x2 kernel, per-axis stride / padding /
    dilation; offsets an integer plus a fraction in [0.05, 0.95]."""
    rng = np.random.default_rng(seed)
    out = ((image[0] + 2 - 3) // 2 + 1, (image[1] + 2 - 3) // 1 + 1)
    offset_shape = (n, 2 * 3 * 6, *out)
    arrays = dict(
        input=rng.standard_normal((n, 6, *image)),
        offset=rng.integers(-3, 4, offset_shape) + rng.uniform(0.05, 0.95, offset_shape),
        weight=rng.standard_normal((4, 3, 3, 2)),
        bias=rng.standard_normal(4),
        mask=rng.uniform(-0.5, 1.5, (n, 3 * 6, *out)),
        grad_output=rng.standard_normal((n, 4, *out)),
    )
    return DeformConvCase(
        **{name: a.astype(dtype) for name, a in arrays.items()},
        stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=2, offset_groups=3,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype):
    case = regular_case(dtype, n=0, seed=0)
    assert run_forward(case).shape == case.output_shape
    grads = run_backward(case)
    for name in ("input", "offset", "weight", "bias", "mask"):
        assert getattr(grads, name).shape == getattr(case, name).shape, name


@pytest.mark.parametrize("dtype", DTYPES)
def test_uneven_batch_chunks(monkeypatch, dtype):
    """A column-buffer budget of two images for the backward's two buffers (four for the
    forward's one) splits a batch of 5 into chunks 2, 2, 1 (4, 1)."""
    case = regular_case(dtype, n=5, seed=1)
    g = geometry_of(case)
    image_columns_bytes = (
        g.in_channels * g.kernel_h * g.kernel_w * g.out_h * g.out_w * np.dtype(dtype).itemsize
    )
    monkeypatch.setattr(deform_conv_module, "COLUMN_BUFFER_BYTES", 4 * image_columns_bytes + 1)

    with shim_backend() as kernels:
        out = deform_conv2d(**case.arguments())
    assert_close("output", out, case.reference_forward(), dtype)
    assert kernels.batch_sizes["im2col"] == [4, 1]

    with shim_backend() as kernels:
        grads = deform_conv2d_backward(case.grad_output, **case.arguments())
    assert_grads_close(grads, case.reference_backward(), dtype)
    for kernel in ("im2col", "col2im_coord", "col2im"):
        assert kernels.batch_sizes[kernel] == [2, 2, 1], kernel


# Sampling positions (h, w) on a 4 x 3 image: on and just inside the edges of (-1, H) x (-1, W),
# on integer coordinates, and NaN; `outside` marks those rule A maps to 0.
BOUNDARY_POSITIONS = (
    ((-1.0, 0.5), True), ((-0.5, 0.5), False), ((-1.0 + 1e-9, 1.25), False), ((3.0, 2.0), False),
    ((3.5, -0.5), False), ((4.0, 1.0), True), ((1.5, -1.0), True), ((2.25, 3.0), True),
    ((0.5, 3.0 - 1e-9), False), ((2.0, -1.0 + 1e-9), False), ((0.0, 0.0), False),
    ((np.nan, np.nan), True),
)


def test_sampling_boundaries():
    rng = np.random.default_rng(2)
    offset = np.empty((1, 2, 4, 3))
    outside = np.empty((4, 3), dtype=bool)
    # A 1x1 kernel without padding: output pixel (y, x) samples at (y + dy, x + dx).
    for pixel, ((h, w), is_outside) in enumerate(BOUNDARY_POSITIONS):
        y, x = divmod(pixel, 3)
        offset[0, :, y, x] = (h - y, w - x)
        outside[y, x] = is_outside
    case = DeformConvCase(
        input=rng.standard_normal((1, 2, 4, 3)), offset=offset,
        weight=rng.standard_normal((2, 2, 1, 1)), bias=None,
        mask=rng.uniform(0.0, 1.0, (1, 1, 4, 3)), grad_output=rng.standard_normal((1, 2, 4, 3)),
        stride=1, padding=0, dilation=1, groups=1, offset_groups=1,
    )
    output = run_forward(case)
    assert_close("output", output, case.reference_forward(), np.float64)
    assert (output[0][:, outside] == 0).all()
    grads = run_backward(case)
    assert_grads_close(grads, case.reference_backward(), np.float64)
    assert (grads.offset[0][:, outside] == 0).all() and (grads.mask[0][:, outside] == 0).all()


def test_border_rule_with_nan_mask():
    """deform_conv.cu's offset and mask gradients at border samples (the unchecked kernel set:
    CheckedKernels requires finite results)."""
    check_border_rule_with_nan_mask(kernels=host_shim.HostShimDeformConv2dKernels())
