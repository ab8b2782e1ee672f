"""Checks of the Deformable U-Net ops on a given kernel set, shared by the tests of every backend
(NumPy or CuPy arrays, through ``kernels.xp``): the deform_pool2d kernels called directly with
poisoned outputs, and both public ops run with their kernel sets replaced (deform_conv_transpose2d
runs on a deform_conv2d kernel set), against the float64 reference."""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np

import pydeform
from pydeform import deform_unet as deform_unet_module
from tests.deform_unet_cases import POOL_ARRAYS, TRANSPOSE_ARRAYS, PoolCase, TransposeCase
from tests.strategies import assert_close, to_numpy

#: Written into int32 index outputs before a kernel runs: no kernel point has it.
POISON_INDEX = -7


@contextlib.contextmanager
def kernel_sets(pool=None, conv=None):
    """Within the block the public ops run on the given kernel sets (None: the usual one)."""
    with contextlib.ExitStack() as stack:
        if pool is not None:
            stack.enter_context(mock.patch.object(deform_unet_module, "deform_pool2d_kernels", lambda *_: pool))
        if conv is not None:
            stack.enter_context(mock.patch.object(deform_unet_module, "deform_conv2d_kernels", lambda *_: conv))
        yield


def assert_unchanged(case, before, names) -> None:
    for name in names + ("grad_output",):
        if getattr(case, name) is not None:
            np.testing.assert_array_equal(to_numpy(getattr(case, name)), to_numpy(getattr(before, name)),
                                          err_msg=f"{name} was modified")


def assert_dict_close(grads, expected: dict, dtype) -> None:
    for name, value in expected.items():
        got = getattr(grads, name)
        if value is None:
            assert got is None, f"{name}: expected None (argument absent), got an array"
        else:
            assert_close(f"grad {name}", got, value, dtype)


def check_transpose_matches_reference(conv_kernels, case: TransposeCase) -> None:
    """deform_conv_transpose2d forward and backward on ``conv_kernels`` (a deform_conv2d kernel
    set) against the reference; the case's arrays are moved to ``conv_kernels.xp`` and must
    come back unchanged."""
    dtype = case.input.dtype
    device_case = case.map_arrays(conv_kernels.xp.array)
    with kernel_sets(conv=conv_kernels):
        out = pydeform.deform_conv_transpose2d(**device_case.arguments())
        grads = pydeform.deform_conv_transpose2d_backward(device_case.grad_output, **device_case.arguments())
    assert out.dtype == dtype and type(out) is type(device_case.input)
    assert_close("output", out, case.reference_forward(), dtype)
    assert_dict_close(grads, case.reference_backward(), dtype)
    assert_unchanged(device_case, case, TRANSPOSE_ARRAYS)


def check_pool_matches_reference(pool_kernels, case: PoolCase) -> None:
    """deform_pool2d forward (with its indices in max mode) and backward (with and without
    the indices) on ``pool_kernels`` against the reference; inputs unchanged."""
    dtype = case.input.dtype
    device_case = case.map_arrays(pool_kernels.xp.array)
    max_mode = case.mode == "max"
    with kernel_sets(pool=pool_kernels):
        out = pydeform.deform_pool2d(**device_case.arguments())
        grads = pydeform.deform_pool2d_backward(device_case.grad_output, **device_case.arguments())
        if max_mode:
            out_again, indices = pydeform.deform_pool2d(**device_case.arguments(), return_indices=True)
            grads_from_indices = pydeform.deform_pool2d_backward(
                device_case.grad_output, **device_case.arguments(), indices=indices)
    assert out.dtype == dtype
    assert_close("output", out, case.reference_forward(), dtype)
    expected = case.reference_backward()
    assert_dict_close(grads, expected, dtype)
    if max_mode:
        _, expected_indices = case.reference_forward(return_indices=True)
        assert indices.dtype == np.int32
        np.testing.assert_array_equal(to_numpy(indices), expected_indices)
        np.testing.assert_array_equal(to_numpy(out_again), to_numpy(out))
        for name in ("input", "offset", "mask"):
            if expected[name] is not None:
                np.testing.assert_array_equal(to_numpy(getattr(grads_from_indices, name)),
                                              to_numpy(getattr(grads, name)), err_msg=name)
    assert_unchanged(device_case, case, POOL_ARRAYS)


def check_pool_kernels_write_every_element(kernels, case: PoolCase) -> None:
    """Each deform_pool2d kernel of ``kernels``, called directly with NaN-poisoned outputs
    (indices poisoned with POISON_INDEX; the input gradient, which is accumulated into, starts
    at zero), writes every element with the reference's value and leaves its inputs alone."""
    xp = kernels.xp
    device_case = case.map_arrays(xp.array)
    # Geometry from the shapes alone: the kernel sets take float16 host arrays (under the CUDA
    # simulator), which the public ops refuse on the CPU.
    geometry = deform_unet_module.deform_pool2d_geometry(
        {"input": case.input.shape, "offset": case.offset.shape}, case.kernel_size, case.stride, case.padding,
        case.dilation)
    input, offset, mask, grad_output = (
        None if a is None else xp.ascontiguousarray(a)
        for a in (device_case.input, device_case.offset, device_case.mask, device_case.grad_output))
    dtype = case.input.dtype
    acc = np.float64 if dtype == np.float64 else np.float32
    max_mode = case.mode == "max"
    out = xp.full(grad_output.shape, np.nan, dtype=dtype)
    indices = xp.full(grad_output.shape, POISON_INDEX, dtype=np.int32) if max_mode else None
    kernels.forward(input, offset, mask, out, indices, geometry, max_mode)
    if max_mode:
        expected_out, expected_indices = case.reference_forward(return_indices=True)
        np.testing.assert_array_equal(to_numpy(indices), expected_indices)
    else:
        expected_out = case.reference_forward()
    assert_close("output", out, expected_out, dtype)

    expected = case.reference_backward()
    grad_offset = xp.full(case.offset.shape, np.nan, dtype=dtype)
    grad_mask = None if mask is None else xp.full(case.mask.shape, np.nan, dtype=dtype)
    kernels.backward_coord(input, offset, mask, grad_output, indices, grad_offset, grad_mask, geometry, max_mode)
    assert_close("grad offset", grad_offset, expected["offset"], dtype)
    if mask is not None:
        assert_close("grad mask", grad_mask, expected["mask"], dtype)
    grad_input = xp.zeros(case.input.shape, dtype=acc)
    kernels.backward_input(offset, mask, grad_output, indices, grad_input, geometry, max_mode)
    assert_close("grad input", grad_input, expected["input"], dtype)
    assert_unchanged(device_case, case, POOL_ARRAYS)
