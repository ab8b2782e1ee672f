"""Checks of a deform_conv2d *kernel set* (im2col, col2im_coord, col2im), called directly,
against the float64 reference; shared by the tests of every backend (NumPy or CuPy arrays,
through ``kernels.xp``)."""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np

import pydeform
import reference
from pydeform import deform_conv as deform_conv_module
from pydeform.deform_conv import _prepare
from tests.strategies import ARRAY_NAMES, DeformConvCase, assert_close, to_numpy

CASE_ARRAYS = ARRAY_NAMES + ("grad_output",)


def assert_unchanged(case: DeformConvCase, before: DeformConvCase) -> None:
    """Every array of ``case`` (NumPy or CuPy) still equals its copy in ``before`` (NumPy)."""
    for name in CASE_ARRAYS:
        if getattr(case, name) is not None:
            np.testing.assert_array_equal(
                to_numpy(getattr(case, name)), to_numpy(getattr(before, name)), err_msg=f"{name} was modified"
            )


def identity_weight(case: DeformConvCase) -> np.ndarray:
    """weight [C*K, C, kh, kw] whose output channel c*K + ij is input channel c sampled at kernel
    point ij: the reference's output with it is im2col's column matrix, and its backward with a
    gradient g of that output is what col2im / col2im_coord make of grad_columns = g."""
    channels = case.input.shape[1]
    kernel_h, kernel_w = case.weight.shape[2:]
    rows = channels * kernel_h * kernel_w
    return np.eye(rows).reshape(rows, channels, kernel_h, kernel_w)


def check_kernels_write_every_element(kernels, case: DeformConvCase, seed: int) -> None:
    """Run each kernel of ``kernels`` once on ``case`` (moved to ``kernels.xp``) with
    NaN-poisoned outputs (the input gradient, which col2im accumulates into, starts at zero);
    check every element was written with the reference's value and the inputs are unchanged."""
    xp = kernels.xp
    device_case = case.map_arrays(xp.array)  # copies, compared with ``case`` at the end
    _, arrays, geometry = _prepare(
        device_case.input, device_case.offset, device_case.weight, device_case.bias, case.stride,
        case.padding, case.dilation, device_case.mask, None,
    )
    input, offset, mask = arrays["input"], arrays["offset"], arrays["mask"]
    dtype = case.input.dtype
    acc = np.float64 if dtype == np.float64 else np.float32
    n, rows, pixels = case.input.shape[0], identity_weight(case).shape[0], geometry.out_h * geometry.out_w
    selector = dict(weight=identity_weight(case), mask=case.mask, **case.options())
    grad_columns = np.random.default_rng(seed).standard_normal((n, rows, pixels)).astype(acc)
    expected = reference.deform_conv2d_backward(
        grad_columns.reshape(n, rows, geometry.out_h, geometry.out_w), case.input, case.offset, **selector
    )

    if kernels.direct_forward:
        out = xp.full((n, case.weight.shape[0], geometry.out_h, geometry.out_w), np.nan, dtype=dtype)
        kernels.forward(input, offset, mask, arrays["weight"], arrays["bias"], out, geometry)
        assert_close("output", out, case.reference_forward(), dtype)

    columns = xp.full((n, rows, pixels), np.nan, dtype=acc)
    kernels.im2col(input, offset, mask, columns, geometry)
    expected_columns = reference.deform_conv2d(case.input, case.offset, **selector).reshape(n, rows, pixels)
    assert_close("columns", columns, expected_columns, dtype)

    device_grad_columns = xp.asarray(grad_columns)
    grad_offset = xp.full(case.offset.shape, np.nan, dtype=dtype)
    grad_mask = None if mask is None else xp.full(case.mask.shape, np.nan, dtype=dtype)
    kernels.col2im_coord(input, offset, mask, device_grad_columns, grad_offset, grad_mask, geometry)
    assert_close("grad offset", grad_offset, expected["offset"], dtype)
    if mask is not None:
        assert_close("grad mask", grad_mask, expected["mask"], dtype)

    grad_input = xp.zeros(case.input.shape, dtype=acc)
    kernels.col2im(offset, mask, device_grad_columns, grad_input, geometry)
    assert_close("grad input", grad_input, expected["input"], dtype)
    np.testing.assert_array_equal(to_numpy(device_grad_columns), grad_columns, err_msg="grad_columns was modified")
    assert_unchanged(device_case, case)


def one_row_problem(sample_h, sample_w):
    """A 1x1 kernel with stride (3, 1) on a 3 x P image, P = len(sample_h): one output row,
    whose pixel x samples (sample_h[x], sample_w[x])."""
    rng = np.random.default_rng(5)
    points = len(sample_h)
    offset = np.zeros((1, 2, 1, points))
    offset[0, 0, 0] = sample_h
    offset[0, 1, 0] = np.asarray(sample_w) - np.arange(points)
    return {"input": rng.standard_normal((1, 2, 3, points)),
            "offset": offset,
            "weight": rng.standard_normal((3, 2, 1, 1)),
            "bias": rng.standard_normal(3),
            "mask": rng.uniform(0.5, 1.5, (1, 1, 1, points)),
            "stride": (3, 1)}


def check_border_rule_with_nan_mask(module=pydeform, kernels=None) -> None:
    """``module``'s deform_conv2d and its backward (run by ``kernels`` when given) with a NaN mask
    on a 3 x 7 image: the output is NaN (m * B, also where B is 0 outside), but samples on or
    outside the border of (-1, H) x (-1, W), h = -1 exactly among them, get 0 offset and mask
    gradients (the sample does not depend on their position there) and add nothing to the input
    gradient, whose NaN are exactly the pixels of the two samples just inside the border; their
    offset gradients are NaN."""
    problem = one_row_problem(sample_h=[-1.0, 3.0, 1.0, 1.0, -1.5, -0.999, 2.9],
                              sample_w=[1.0, 2.0, -1.0, 8.0, 1.0, 1.0, 2.0])
    problem["mask"][...] = np.nan
    grad_output = np.ones((1, 3, 1, 7))
    context = (mock.patch.object(deform_conv_module, "deform_conv2d_kernels", lambda library, backend: kernels)
               if kernels else contextlib.nullcontext())
    with context:
        output = to_numpy(module.deform_conv2d(**problem))
        grads = module.deform_conv2d_backward(grad_output, **problem)
    grads = {name: to_numpy(grads[name] if isinstance(grads, dict) else getattr(grads, name))
             for name in ("input", "offset", "mask", "weight")}
    assert np.isnan(output).all() and np.isnan(grads["weight"]).all()
    np.testing.assert_array_equal(grads["offset"][..., :5], 0.0)
    np.testing.assert_array_equal(grads["mask"][..., :5], 0.0)
    assert np.isnan(grads["offset"][..., 5:]).all()
    # (-0.999, 1) reads pixels (0, 1) and (0, 2), (2.9, 2) pixels (2, 2) and (2, 3); row 1 none.
    np.testing.assert_array_equal(np.argwhere(np.isnan(grads["input"][0, 0])), [[0, 1], [0, 2], [2, 2], [2, 3]])
