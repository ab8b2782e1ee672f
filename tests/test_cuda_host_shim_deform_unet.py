"""The CuPy RawKernel sources behind the Deformable U-Net ops, run on the CPU through the host
shim (tests/host_shim.py) in float32 and float64 against the float64 reference:
deform_conv_transpose2d on deform_conv.cu (every kernel call checked by the deform_conv2d shim
tests' CheckedKernels: poisoned outputs fully written, inputs unchanged) and deform_pool.cu,
its kernels called directly with poisoned outputs and through the public op."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pydeform
from tests import host_shim
from tests.deform_unet_cases import deform_conv_transpose_cases, deform_pool_cases
from tests.deform_unet_kernel_set_checks import (
    check_pool_kernels_write_every_element, check_pool_matches_reference, check_transpose_matches_reference,
    kernel_sets,
)
from tests.test_cuda_host_shim import checked_shim_kernels
from tests.test_reference_deform_unet import tie_problem

pytestmark = pytest.mark.skipif(not host_shim.compiler_available(), reason="needs g++")

DTYPES = (np.float32, np.float64)


@settings(max_examples=20, deadline=None)
@given(case=st.sampled_from(DTYPES).flatmap(lambda d: deform_conv_transpose_cases(dtype=d, with_grad=True)))
def test_transpose_matches_reference(case):
    check_transpose_matches_reference(checked_shim_kernels(), case)


@settings(max_examples=25, deadline=None)
@given(case=st.sampled_from(DTYPES).flatmap(lambda d: deform_pool_cases(dtype=d, with_grad=True)))
def test_pool_matches_reference(case):
    check_pool_matches_reference(host_shim.HostShimDeformPool2dKernels(), case)


@settings(max_examples=25, deadline=None)
@given(case=st.sampled_from(DTYPES).flatmap(lambda d: deform_pool_cases(dtype=d, with_grad=True)))
def test_pool_kernels_write_every_element(case):
    check_pool_kernels_write_every_element(host_shim.HostShimDeformPool2dKernels(), case)


@pytest.mark.parametrize("values, index", [
    ([1.0, 3.0, 3.0, 2.0], 1), ([-2.0, -2.0, -2.0], 0), ([1.0, np.nan, 5.0, np.nan], 1), ([np.inf, np.nan], 1),
    ([-np.inf, -5.0], 1),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_ties_and_nan(values, index, dtype):
    problem = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in tie_problem(values).items()}
    with kernel_sets(pool=host_shim.HostShimDeformPool2dKernels()):
        out, indices = pydeform.deform_pool2d(**problem, return_indices=True)
        grads = pydeform.deform_pool2d_backward(np.ones((1, 1, 1, 1), dtype), **problem, indices=indices)
    assert indices[0, 0, 0, 0] == index
    np.testing.assert_array_equal(out[0, 0, 0, 0], np.asarray(values[index], dtype))
    expected_mask = np.zeros(len(values))
    expected_mask[index] = 1.0
    np.testing.assert_array_equal(grads.mask.ravel(), expected_mask)
