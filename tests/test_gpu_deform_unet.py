"""The Deformable U-Net ops on a CUDA GPU: both GPU backends (CuPy RawKernels, Numba CUDA) on CuPy
arrays against the float64 reference for every GPU dtype: deform_conv_transpose2d through the
public op, deform_pool2d through the public op (indices too) and its kernels called directly
with poisoned outputs.

Every test is ``gpu``-marked (skipped without a usable GPU, see conftest.py); the CPU-side twins
are tests/test_cuda_host_shim_deform_unet.py (the CUDA C sources) and
tests/numba_cuda_simulator_deform_unet_checks.py (the Numba CUDA kernels).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydeform.backends import deform_conv2d_kernels, deform_pool2d_kernels
from tests.deform_unet_cases import deform_conv_transpose_cases, deform_pool_cases
from tests.deform_unet_kernel_set_checks import (
    check_pool_kernels_write_every_element, check_pool_matches_reference, check_transpose_matches_reference,
)

pytestmark = pytest.mark.gpu

BACKENDS = ("cupy", "numba")
DTYPES = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20)
@given(data=st.data())
def test_transpose_matches_reference(backend, dtype, data):
    case = data.draw(deform_conv_transpose_cases(dtype=dtype, with_grad=True))
    check_transpose_matches_reference(deform_conv2d_kernels("cupy", backend), case)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20)
@given(data=st.data())
def test_pool_matches_reference(backend, dtype, data):
    case = data.draw(deform_pool_cases(dtype=dtype, with_grad=True))
    check_pool_matches_reference(deform_pool2d_kernels("cupy", backend), case)
    check_pool_kernels_write_every_element(deform_pool2d_kernels("cupy", backend), case)
