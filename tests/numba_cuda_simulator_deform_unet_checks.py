"""The Numba CUDA kernels behind the Deformable U-Net ops run by Numba's CUDA simulator on host
arrays: deform_conv_transpose2d on deform_conv2d's Numba CUDA kernel set, deform_pool2d's own
kernels through the public op and called directly with poisoned outputs (float16 too).

Not collected by a plain pytest run: ``tests/test_numba_cuda_simulator.py`` runs this module in
a process of its own with ``NUMBA_ENABLE_CUDASIM=1``. The simulator runs every CUDA thread as a
Python thread, so the shapes are tiny.
"""

from __future__ import annotations

import numpy as np
import pytest

from pydeform.backends.numba_cuda import simulator_enabled
from pydeform.backends.numba_kernels.deform_conv import NumbaCudaDeformConv2dKernels
from pydeform.backends.numba_kernels.deform_pool import NumbaCudaDeformPool2dKernels
from tests.deform_unet_cases import pool_case_from, transpose_case_from
from tests.deform_unet_kernel_set_checks import (
    check_pool_kernels_write_every_element, check_pool_matches_reference, check_transpose_matches_reference,
)
from tests.strategies import build_case

if not simulator_enabled():
    raise RuntimeError("run this module with NUMBA_ENABLE_CUDASIM=1 (see tests/test_numba_cuda_simulator.py)")

GEOMETRIES = {
    "groups2-offset-groups2-mask": dict(
        n=2, channels=4, out_channels=4, size=(5, 6), kernel=(2, 3), groups=2, offset_groups=2,
        stride=(1, 2), padding=(1, 1), dilation=(2, 1), with_mask=True, with_bias=True,
    ),
    "offset-groups3-no-mask": dict(
        n=1, channels=3, out_channels=2, size=(4, 4), kernel=(3, 3), offset_groups=3, padding=1, stride=2,
        with_mask=False, with_bias=True,
    ),
    "empty-batch": dict(n=0, channels=2, out_channels=2, size=(4, 4), kernel=(2, 2), with_mask=True),
}


def conv_case(name, dtype):
    return build_case(np.random.default_rng(9), dtype=dtype, **GEOMETRIES[name])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_simulated_transpose_matches_reference(geometry, dtype):
    case = transpose_case_from(conv_case(geometry, dtype), np.random.default_rng(10))
    check_transpose_matches_reference(NumbaCudaDeformConv2dKernels(xp=np), case)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_simulated_pool_matches_reference(geometry, dtype, mode):
    case = pool_case_from(conv_case(geometry, dtype), mode, np.random.default_rng(11))
    check_pool_matches_reference(NumbaCudaDeformPool2dKernels(xp=np), case)
    check_pool_kernels_write_every_element(NumbaCudaDeformPool2dKernels(xp=np), case)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_simulated_pool_kernels_in_float16(mode):
    """float16 arrays, converted to float32 around the launches (the simulator has no bfloat16);
    the kernel-set methods called directly: the ops take float16 on the GPU only."""
    case = pool_case_from(conv_case("groups2-offset-groups2-mask", np.float16), mode, np.random.default_rng(12))
    check_pool_kernels_write_every_element(NumbaCudaDeformPool2dKernels(xp=np), case)
