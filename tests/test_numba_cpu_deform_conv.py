"""The Numba CPU backend of deform_conv2d (NumPy arrays) against the float64 reference:
forward and every gradient, the kernels one by one, and the op's behaviour at the edges
(empty batch, chunked batches, non-contiguous and non-finite inputs)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

import pydeform
import reference
from pydeform import deform_conv as deform_conv_module
from pydeform import deform_conv2d, deform_conv2d_backward
from pydeform.backends.numba_kernels import deform_conv as deform_conv_kernels
from pydeform.backends.numba_kernels.deform_conv import NumbaCpuDeformConv2dKernels
from tests.kernel_set_checks import (
    CASE_ARRAYS,
    assert_unchanged,
    check_border_rule_with_nan_mask,
    check_kernels_write_every_element,
)
from tests.strategies import (
    ARRAY_NAMES,
    DeformConvCase,
    assert_close,
    assert_grads_close,
    build_case,
    deform_conv_cases,
)

DTYPES = [np.float64, np.float32]


def copies(case: DeformConvCase) -> DeformConvCase:
    return case.map_arrays(np.copy)


def run_forward(case: DeformConvCase, **kwargs):
    return deform_conv2d(**case.arguments(), **kwargs)


def run_backward(case: DeformConvCase, **kwargs):
    return deform_conv2d_backward(case.grad_output, **case.arguments(), **kwargs)


def fixed_case(rng, dtype=np.float64, n=2, with_mask=True) -> DeformConvCase:
    """A gradient case with every dimension > 1: C=4, G=2, Goff=2, a 3x2 kernel on a 7x7 image,
    per-axis padding and dilation, stride 2 -> a 4x3 output."""
    return build_case(
        rng, n=n, channels=4, out_channels=6, size=(7, 7), kernel=(3, 2), groups=2, offset_groups=2,
        stride=2, padding=(1, 0), dilation=(1, 2), with_mask=with_mask, dtype=dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@given(data=st.data())
def test_forward_matches_reference(dtype, data):
    case = data.draw(deform_conv_cases(dtype=dtype))
    before = copies(case)
    out = run_forward(case)
    assert type(out) is np.ndarray and out.dtype == np.dtype(dtype)
    assert_close("output", out, case.reference_forward(), dtype)
    assert_unchanged(case, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@given(data=st.data())
def test_backward_matches_reference(dtype, data):
    case = data.draw(deform_conv_cases(dtype=dtype, with_grad=True))
    before = copies(case)
    grads = run_backward(case)
    for name in ARRAY_NAMES:
        grad = getattr(grads, name)
        if grad is not None:
            assert type(grad) is np.ndarray and grad.dtype == np.dtype(dtype), name
    assert_grads_close(grads, case.reference_backward(), dtype)
    assert_unchanged(case, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_kernels_write_every_element(dtype, data, seed):
    """Each kernel, called directly with NaN-poisoned outputs, writes every element of them,
    with the reference's values, and leaves its inputs alone."""
    case = data.draw(deform_conv_cases(dtype=dtype, with_grad=True))
    check_kernels_write_every_element(NumbaCpuDeformConv2dKernels(), case, seed)


@pytest.mark.parametrize("with_mask", [False, True])
def test_empty_batch(with_mask):
    case = fixed_case(np.random.default_rng(0), n=0, with_mask=with_mask)
    out = run_forward(case)
    assert out.shape == (0, 6, 4, 3) and out.dtype == np.float64
    grads = run_backward(case)
    assert grads.input.shape == case.input.shape
    assert grads.offset.shape == case.offset.shape
    assert grads.mask is None if not with_mask else grads.mask.shape == case.mask.shape
    np.testing.assert_array_equal(grads.weight, np.zeros(case.weight.shape))
    np.testing.assert_array_equal(grads.bias, np.zeros(case.bias.shape))


def record_batch_sizes(monkeypatch) -> list:
    """Wrap every kernel method of the CPU kernel set to log (kernel name, batch size); each
    one's first argument (input or offset) is batch-major."""
    calls = []
    for name in ("forward", "im2col", "col2im_coord", "col2im"):
        original = getattr(NumbaCpuDeformConv2dKernels, name)

        def spy(self, *args, _original=original, _name=name):
            calls.append((_name, args[0].shape[0]))
            return _original(self, *args)

        monkeypatch.setattr(NumbaCpuDeformConv2dKernels, name, spy)
    return calls


@pytest.mark.parametrize("chunk, sizes", [(1, [1] * 5), (2, [2, 2, 1]), (3, [3, 2])])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_chunked_batches_match_reference(monkeypatch, chunk, sizes, dtype):
    """With column buffers that hold ``chunk`` images, the backward of N=5 runs in those chunks
    and still matches the reference; the direct forward has no column buffer and runs the
    batch whole."""
    case = fixed_case(np.random.default_rng(1), dtype=dtype, n=5)
    calls = record_batch_sizes(monkeypatch)
    acc_itemsize = 8 if np.dtype(dtype) == np.float64 else 4
    image_bytes = 4 * 6 * 4 * 3 * acc_itemsize  # C * kh * kw * Ho * Wo columns of one image
    # One byte short of one more image, so the chunk size is rounded down as it must be.
    monkeypatch.setattr(deform_conv_module, "COLUMN_BUFFER_BYTES", (chunk + 1) * image_bytes - 1)
    out = run_forward(case)
    assert calls == [("forward", 5)]
    assert_close("output", out, case.reference_forward(), dtype)

    calls.clear()
    monkeypatch.setattr(deform_conv_module, "COLUMN_BUFFER_BYTES", (chunk + 1) * 2 * image_bytes - 1)
    grads = run_backward(case)
    assert calls == [(name, size) for size in sizes for name in ("col2im_coord", "im2col", "col2im")]
    assert_grads_close(grads, case.reference_backward(), dtype)


def transposed(a):
    """The same values as a view with the last two axes' strides swapped."""
    return np.swapaxes(np.swapaxes(a, -1, -2).copy(), -1, -2) if a.ndim >= 2 else a[::-1].copy()[::-1]


def every_other(a):
    """The same values as a view taking every other element along the last axis."""
    spread = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
    spread[..., ::2] = a
    return spread[..., ::2]


def reversed_axes(a):
    """The same values as a view with negative strides on every axis."""
    flip = (slice(None, None, -1),) * a.ndim
    return a[flip].copy()[flip]


@pytest.mark.parametrize("view", [transposed, every_other, reversed_axes])
def test_non_contiguous_inputs(view):
    case = fixed_case(np.random.default_rng(2))
    views = case.map_arrays(view)
    for name in CASE_ARRAYS:
        assert not getattr(views, name).flags.c_contiguous, name
    before = copies(views)
    np.testing.assert_array_equal(run_forward(views), run_forward(case))
    assert_close("output", run_forward(views), case.reference_forward(), np.float64)
    grads = run_backward(views)
    assert_grads_close(grads, case.reference_backward(), np.float64)
    assert_unchanged(views, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "huge", "-huge"])
def test_non_finite_or_huge_offsets_count_as_outside(dtype, bad):
    """A NaN / inf / huge offset gives what a sample far outside the image gives (0 for that
    sample, 0 offset and mask gradients), with everything finite."""
    case = fixed_case(np.random.default_rng(3), dtype=dtype)
    if isinstance(bad, str):
        bad = np.finfo(dtype).max * (-1.0 if bad.startswith("-") else 1.0)
    offset = case.offset.copy()
    outside = case.offset.copy()
    # dy of some samples, dx of others, in both images and both offset groups.
    poisoned = (np.array([0, 0, 1, 1]), np.array([0, 3, 12, 21]), np.array([0, 1, 3, 2]), np.array([0, 2, 1, 0]))
    offset[poisoned] = bad
    outside[poisoned] = -1e6
    bad_case = dataclasses.replace(case, offset=offset)
    far_case = dataclasses.replace(case, offset=outside)
    assert_close("output", run_forward(bad_case), far_case.reference_forward(), dtype)
    grads = run_backward(bad_case)
    expected = far_case.reference_backward()
    assert_grads_close(grads, expected, dtype)
    # The reference agrees that the poisoned samples have no offset gradient.
    assert np.all(expected["offset"][poisoned] == 0)


def ordinary_conv2d(input, weight, bias, stride, padding, dilation, groups):
    """Grouped 2-d convolution from sliding windows of the zero-padded input."""
    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = (
        (v, v) if np.isscalar(v) else v for v in (stride, padding, dilation)
    )
    n, channels = input.shape[:2]
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    padded = np.pad(input, ((0, 0), (0, 0), (pad_h, pad_h), (pad_w, pad_w)))
    span = (dil_h * (kernel_h - 1) + 1, dil_w * (kernel_w - 1) + 1)
    windows = sliding_window_view(padded, span, axis=(2, 3))[:, :, ::stride_h, ::stride_w, ::dil_h, ::dil_w]
    out_h, out_w = windows.shape[2:4]
    windows = windows.reshape(n, groups, group_channels, out_h, out_w, kernel_h, kernel_w)
    grouped = weight.reshape(groups, out_channels // groups, group_channels, kernel_h, kernel_w)
    out = np.einsum("ngcyxij,gocij->ngoyx", windows, grouped).reshape(n, out_channels, out_h, out_w)
    return out if bias is None else out + bias[None, :, None, None]


@given(case=deform_conv_cases(), unit_mask=st.booleans())
def test_zero_offsets_and_unit_mask_give_an_ordinary_convolution(case, unit_mask):
    mask = np.ones_like(case.mask) if unit_mask and case.mask is not None else None
    plain = dataclasses.replace(case, offset=np.zeros_like(case.offset), mask=mask)
    expected = ordinary_conv2d(
        case.input, case.weight, case.bias, case.stride, case.padding, case.dilation, case.groups
    )
    assert_close("output", run_forward(plain), expected, np.float64)


def test_backend_numba_is_the_cpu_backend_for_numpy_arrays():
    case = fixed_case(np.random.default_rng(4))
    np.testing.assert_array_equal(run_forward(case, backend="numba"), run_forward(case))
    for got, default in zip(run_backward(case, backend="numba"), run_backward(case)):
        np.testing.assert_array_equal(got, default)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("tile_bytes", [1, 5 * 2**10, deform_conv_kernels.CPU_FORWARD_TILE_BYTES])
@pytest.mark.parametrize(
    "out_channels, groups, offset_groups",
    # 13 and 6 output channels per group: not a multiple of the 4-channel blocks; offset groups
    # of 6 channels crossing weight groups of 4 (C=12); groups = channels (depthwise).
    [(13, 1, 1), (6, 3, 2), (12, 12, 1), (8, 2, 4)],
)
def test_direct_forward_tiles_and_blocks(dtype, tile_bytes, out_channels, groups, offset_groups, monkeypatch):
    """The direct CPU forward against the reference where its tiling has edges: tiles of 2
    pixels up to the default size, a last tile with an odd pixel count (Ho*Wo = 7*5), output
    channels per group that do not fill the 4-channel blocks, and offset groups whose
    channels span two weight groups."""
    monkeypatch.setattr(deform_conv_kernels, "CPU_FORWARD_TILE_BYTES", tile_bytes)
    rng = np.random.default_rng(5)
    channels, kernel, (out_h, out_w) = 12, (3, 2), (7, 5)
    x = rng.standard_normal((2, channels, 9, 6)).astype(dtype)
    offset = rng.uniform(-3, 3, (2, 2 * offset_groups * 6, out_h, out_w)).astype(dtype)
    weight = rng.standard_normal((out_channels, channels // groups) + kernel).astype(dtype)
    bias = rng.standard_normal(out_channels).astype(dtype)
    mask = rng.uniform(0, 1, (2, offset_groups * 6, out_h, out_w)).astype(dtype)
    for b, m in ((bias, mask), (None, None)):
        out = pydeform.deform_conv2d(x, offset, weight, b, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=m)
        expected = reference.deform_conv2d(x, offset, weight, b, mask=m)
        assert out.shape == expected.shape == (2, out_channels, out_h, out_w)
        assert_close("output", out, expected, dtype)


def test_direct_forward_propagates_nan_and_infinity():
    """The forward's sums may be reordered (fastmath reassoc/contract) but never assume finite
    values: an interior NaN input value reaches exactly the outputs whose samples read it (as
    in the reference; away from the border, where the reference's clamped outside corners
    would spread it further), and an infinite bias makes its channel infinite."""
    case = fixed_case(np.random.default_rng(6), n=1)
    x = case.input.copy()
    x[0, 1, 3, 3] = np.nan
    bias = case.bias.copy()
    bias[4] = np.inf
    arguments = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, mask=case.mask)
    offset = np.zeros_like(case.offset)
    out = pydeform.deform_conv2d(x, offset, case.weight, bias, **arguments)
    expected = reference.deform_conv2d(x, offset, case.weight, bias, **arguments)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    assert np.isnan(expected).any() and not np.isnan(expected).all()
    assert np.isposinf(out[0, 4]).all()
    finite = np.isfinite(expected)
    np.testing.assert_allclose(out[finite], expected[finite], rtol=1e-10, atol=1e-10)


def test_direct_forward_is_the_same_on_any_thread_count():
    """Each tile's sums run in a fixed order whatever thread computes them, so the forward is
    bit for bit the same on one thread as on the whole pool (the tile buffers are planned per
    pool thread; fewer threads in use share them out)."""
    import numba

    case = fixed_case(np.random.default_rng(8), dtype=np.float32, n=3)
    everyone = run_forward(case)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        alone = run_forward(case)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(alone, everyone)


def test_border_rule_with_nan_mask():
    check_border_rule_with_nan_mask()
