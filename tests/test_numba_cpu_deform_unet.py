"""The Deformable U-Net ops on the CPU (Numba kernels, NumPy arrays) against the float64
reference: deform_conv_transpose2d (on deform_conv2d's CPU kernel set) and deform_pool2d
(its own kernels, called directly with poisoned outputs too), max-mode ties and NaN, the
edges (empty batch, batch chunks, non-contiguous inputs) and every argument check."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydeform
from pydeform import deform_conv as deform_conv_module
from pydeform.backends.numba_kernels.deform_conv import NumbaCpuDeformConv2dKernels
from pydeform.backends.numba_kernels.deform_pool import NumbaCpuDeformPool2dKernels
from tests.deform_unet_cases import (
    deform_conv_transpose_cases, deform_pool_cases, pool_case_from, transpose_case_from,
)
from tests.deform_unet_kernel_set_checks import (
    check_pool_kernels_write_every_element, check_pool_matches_reference, check_transpose_matches_reference,
)
from tests.strategies import assert_close, build_case
from tests.test_reference_deform_unet import tie_problem

DTYPES = [np.float64, np.float32]
DTYPE_IDS = ["float64", "float32"]


def fixed_conv_case(seed, n=2, dtype=np.float64, with_mask=True):
    return build_case(np.random.default_rng(seed), n=n, channels=4, out_channels=6, size=(7, 7), kernel=(3, 2),
                      groups=2, offset_groups=2, stride=2, padding=(1, 0), dilation=(1, 2), with_mask=with_mask,
                      dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@settings(max_examples=25)
@given(data=st.data())
def test_transpose_matches_reference(dtype, data):
    case = data.draw(deform_conv_transpose_cases(dtype=dtype, with_grad=True))
    check_transpose_matches_reference(NumbaCpuDeformConv2dKernels(), case)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@settings(max_examples=25)
@given(data=st.data())
def test_pool_matches_reference(dtype, data):
    case = data.draw(deform_pool_cases(dtype=dtype, with_grad=True))
    check_pool_matches_reference(NumbaCpuDeformPool2dKernels(), case)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@settings(max_examples=20)
@given(data=st.data())
def test_pool_kernels_write_every_element(dtype, data):
    case = data.draw(deform_pool_cases(dtype=dtype, with_grad=True))
    check_pool_kernels_write_every_element(NumbaCpuDeformPool2dKernels(), case)


@pytest.mark.parametrize("values, index", [
    ([1.0, 3.0, 3.0, 2.0], 1), ([-2.0, -2.0, -2.0], 0), ([1.0, np.nan, 5.0, np.nan], 1),
    ([np.inf, np.nan], 1), ([-np.inf, -5.0], 1), ([0.0, -0.0], 0),
])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_max_ties_and_nan(values, index, dtype):
    """Ties go to the lowest kernel point, a NaN sample wins (the first one), and the gradient
    goes through that point only."""
    problem = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in tie_problem(values).items()}
    out, indices = pydeform.deform_pool2d(**problem, return_indices=True)
    assert indices.dtype == np.int32 and indices[0, 0, 0, 0] == index
    np.testing.assert_array_equal(out[0, 0, 0, 0], np.asarray(values[index], dtype))
    grads = pydeform.deform_pool2d_backward(np.ones((1, 1, 1, 1), dtype), **problem)
    expected_mask = np.zeros(len(values))
    expected_mask[index] = 1.0
    np.testing.assert_array_equal(grads.mask.ravel(), expected_mask)
    assert not grads.offset.reshape(-1, 2)[np.arange(len(values)) != index].any()


def test_nan_input_propagates():
    case = pool_case_from(fixed_conv_case(1), "max", np.random.default_rng(1))
    input = case.input.copy()
    input[0, 0] = np.nan
    for mode in ("avg", "max"):
        out = pydeform.deform_pool2d(**{**case.arguments(), "input": input, "mode": mode})
        reference_out = pydeform.deform_pool2d(**{**case.arguments(), "mode": mode})
        touched = np.isnan(out[0, 0])
        assert touched.any() and not np.isnan(out[1]).any()
        np.testing.assert_array_equal(out[0, 0][~touched], reference_out[0, 0][~touched])
    transpose = transpose_case_from(fixed_conv_case(2), np.random.default_rng(2))
    x = transpose.input.copy()
    x[1, 0, 1, 1] = np.nan
    out = pydeform.deform_conv_transpose2d(**{**transpose.arguments(), "input": x})
    assert np.isnan(out[1]).any() and not np.isnan(out[0]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty_batch(dtype):
    conv = fixed_conv_case(3, n=0, dtype=dtype)
    transpose = transpose_case_from(conv, np.random.default_rng(3))
    out = pydeform.deform_conv_transpose2d(**transpose.arguments())
    assert out.shape == transpose.grad_output.shape and out.dtype == np.dtype(dtype)
    grads = pydeform.deform_conv_transpose2d_backward(transpose.grad_output, **transpose.arguments())
    for name in ("input", "offset", "weight", "bias", "mask"):
        assert getattr(grads, name).shape == getattr(transpose, name).shape
    assert not grads.weight.any() and not grads.bias.any()
    for mode in ("avg", "max"):
        pool = pool_case_from(conv, mode, np.random.default_rng(3))
        out = pydeform.deform_pool2d(**pool.arguments())
        assert out.shape == pool.grad_output.shape
        grads = pydeform.deform_pool2d_backward(pool.grad_output, **pool.arguments())
        assert grads.input.shape == pool.input.shape and grads.mask.shape == pool.mask.shape


@pytest.mark.parametrize("chunk", [1, 2])
def test_transpose_in_batch_chunks(monkeypatch, chunk):
    """Column buffers of ``chunk`` images split the batch of 3 and change nothing."""
    case = transpose_case_from(fixed_conv_case(4, n=3), np.random.default_rng(4))
    whole_out = pydeform.deform_conv_transpose2d(**case.arguments())
    whole = pydeform.deform_conv_transpose2d_backward(case.grad_output, **case.arguments())
    image_bytes = 6 * 3 * 2 * 7 * 7 * 8  # C_out * kh * kw * H_out * W_out columns of one image, float64
    monkeypatch.setattr(deform_conv_module, "COLUMN_BUFFER_BYTES", 2 * chunk * image_bytes)
    assert_close("output", pydeform.deform_conv_transpose2d(**case.arguments()), whole_out, np.float64)
    chunked = pydeform.deform_conv_transpose2d_backward(case.grad_output, **case.arguments())
    for name in ("input", "offset", "weight", "bias", "mask"):
        assert_close(name, getattr(chunked, name), getattr(whole, name), np.float64)


def test_non_contiguous_inputs():
    case = transpose_case_from(fixed_conv_case(5), np.random.default_rng(5))

    def strided(a):
        spread = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        spread[..., ::2] = a
        return spread[..., ::2]

    args = case.arguments()
    moved = {k: (strided(v) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    np.testing.assert_array_equal(pydeform.deform_conv_transpose2d(**moved), pydeform.deform_conv_transpose2d(**args))
    pool = pool_case_from(fixed_conv_case(5), "max", np.random.default_rng(5))
    args = pool.arguments()
    moved = {k: (strided(v) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    np.testing.assert_array_equal(pydeform.deform_pool2d(**moved), pydeform.deform_pool2d(**args))


# Argument checks: each bad call raises the given exception naming the argument, and no
# argument array is modified.

def transpose_arguments():
    case = transpose_case_from(fixed_conv_case(6), np.random.default_rng(6))
    return {**case.arguments(), "grad_output": case.grad_output}


def pool_arguments():
    case = pool_case_from(fixed_conv_case(7), "max", np.random.default_rng(7))
    return {**case.arguments(), "grad_output": case.grad_output}


def _replace(name, value):
    return lambda a: {**a, name: value(a) if callable(value) else value}


TRANSPOSE_ERRORS = {
    "input-rank": (_replace("input", lambda a: a["input"][0]), ValueError, "input: expected a 4-d"),
    "offset-dtype": (_replace("offset", lambda a: a["offset"].astype(np.float32)), TypeError,
                     "offset: expected dtype float64 like"),
    "input-int": (_replace("input", lambda a: a["input"].astype(np.int64)), TypeError, "input: expected a floating"),
    "offset-list": (_replace("offset", lambda a: a["offset"].tolist()), TypeError, "offset: expected a NumPy"),
    "offset-channels": (_replace("offset", lambda a: a["offset"][:, :5]), ValueError, "offset: shape[1]"),
    "offset-grid": (_replace("offset", lambda a: a["offset"][:, :, :-1]), ValueError, "offset: expected shape"),
    "offset-groups": (_replace("offset", lambda a: np.concatenate([a["offset"]] * 2, 1)[:, :36]), ValueError,
                      "offset: 3 offset groups"),
    "weight-rows": (_replace("weight", lambda a: a["weight"][:-1]), ValueError, "weight: shape[0]"),
    "groups": (_replace("groups", 4), ValueError, "groups: 4 must divide"),
    "groups-type": (_replace("groups", 2.0), TypeError, "groups: expected an int"),
    "bias": (_replace("bias", lambda a: a["bias"][:-1]), ValueError, "bias: expected shape"),
    "mask": (_replace("mask", lambda a: a["mask"][:, :-1]), ValueError, "mask: expected shape"),
    "output-padding": (_replace("output_padding", 2), ValueError, "output_padding: expected values smaller"),
    "stride": (_replace("stride", 0), ValueError, "stride: expected positive"),
    "padding": (_replace("padding", (1, -1)), ValueError, "padding: expected values >= 0"),
    "dilation": (_replace("dilation", "2"), TypeError, "dilation: expected an int or a pair"),
    "empty-output": (_replace("padding", 9), ValueError, "gives an empty output"),
    "backend": (_replace("backend", "cupy"), ValueError, "backend: 'cupy' runs on CuPy arrays only"),
    "grad-output": (_replace("grad_output", lambda a: a["grad_output"][:, :, 1:]), ValueError,
                    "grad_output: expected shape"),
}


@pytest.mark.parametrize("name", TRANSPOSE_ERRORS)
def test_transpose_argument_errors(name):
    change, error, message = TRANSPOSE_ERRORS[name]
    good = transpose_arguments()
    bad = change(good)
    before = {k: np.copy(v) for k, v in bad.items() if isinstance(v, np.ndarray)}
    forward_args = {k: v for k, v in bad.items() if k != "grad_output"}
    calls = [lambda: pydeform.deform_conv_transpose2d_backward(**bad)]
    if name != "grad-output":
        calls.append(lambda: pydeform.deform_conv_transpose2d(**forward_args))
    for call in calls:
        with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(")):
            call()
    for k, v in before.items():
        np.testing.assert_array_equal(bad[k], v, err_msg=f"{k} was modified")


POOL_ERRORS = {
    "input-rank": (_replace("input", lambda a: a["input"][None]), ValueError, "input: expected a 4-d"),
    "mask-dtype": (_replace("mask", lambda a: a["mask"].astype(np.float32)), TypeError,
                   "mask: expected dtype float64 like"),
    "offset-channels": (_replace("offset", lambda a: a["offset"][:, :7]), ValueError, "offset: shape[1]"),
    "offset-grid": (_replace("offset", lambda a: a["offset"][:, :, :, :-1]), ValueError, "offset: expected shape"),
    "offset-groups": (_replace("offset", lambda a: np.concatenate([a["offset"]] * 2, 1)[:, :36]), ValueError,
                      "offset: 3 offset groups"),
    "mask": (_replace("mask", lambda a: a["mask"][:1]), ValueError, "mask: expected shape"),
    "kernel-size": (_replace("kernel_size", 0), ValueError, "kernel_size: expected positive"),
    "kernel-size-type": (_replace("kernel_size", 2.5), TypeError, "kernel_size: expected an int or a pair"),
    "stride": (_replace("stride", (1, 2, 3)), TypeError, "stride: expected an int or a pair"),
    "padding": (_replace("padding", -1), ValueError, "padding: expected values >= 0"),
    "dilation": (_replace("dilation", 0), ValueError, "dilation: expected positive"),
    "mode": (_replace("mode", "mean"), ValueError, "mode: expected 'avg' or 'max'"),
    "empty-output": (_replace("dilation", 9), ValueError, "gives an empty output"),
    "grad-output": (_replace("grad_output", lambda a: a["grad_output"][:, :1]), ValueError,
                    "grad_output: expected shape"),
    "offset-none": (_replace("offset", None), TypeError, "offset: expected an array, got None"),
}


@pytest.mark.parametrize("name", POOL_ERRORS)
def test_pool_argument_errors(name):
    change, error, message = POOL_ERRORS[name]
    bad = change(pool_arguments())
    before = {k: np.copy(v) for k, v in bad.items() if isinstance(v, np.ndarray)}
    forward_args = {k: v for k, v in bad.items() if k != "grad_output"}
    calls = [lambda: pydeform.deform_pool2d_backward(**bad)]
    if name != "grad-output":
        calls.append(lambda: pydeform.deform_pool2d(**forward_args))
    for call in calls:
        with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(")):
            call()
    for k, v in before.items():
        np.testing.assert_array_equal(bad[k], v, err_msg=f"{k} was modified")


def test_pool_indices_errors():
    args = pool_arguments()
    _, indices = pydeform.deform_pool2d(**{k: v for k, v in args.items() if k != "grad_output"},
                                        return_indices=True)
    with pytest.raises(ValueError, match="return_indices: the arg-max indices exist in mode='max' only"):
        pydeform.deform_pool2d(**{k: v for k, v in args.items() if k not in ("grad_output", "mode")}, mode="avg",
                               return_indices=True)
    with pytest.raises(TypeError, match="return_indices: expected a bool"):
        pydeform.deform_pool2d(**{k: v for k, v in args.items() if k != "grad_output"}, return_indices=1)
    with pytest.raises(ValueError, match="indices: the arg-max indices exist in mode='max' only"):
        pydeform.deform_pool2d_backward(**{**args, "mode": "avg"}, indices=indices)
    with pytest.raises(TypeError, match="indices: expected dtype int32"):
        pydeform.deform_pool2d_backward(**args, indices=indices.astype(np.int64))
    with pytest.raises(ValueError, match="indices: expected shape"):
        pydeform.deform_pool2d_backward(**args, indices=indices[:, :1])
    bad = indices.copy()
    bad[0, 0, 0, 0] = 6  # a 3x2 kernel has points 0..5
    with pytest.raises(ValueError, match=r"indices: expected kernel point indices in \[0, 6\)"):
        pydeform.deform_pool2d_backward(**args, indices=bad)
    with pytest.raises(TypeError, match="indices: expected a NumPy or CuPy array"):
        pydeform.deform_pool2d_backward(**args, indices=indices.tolist())
