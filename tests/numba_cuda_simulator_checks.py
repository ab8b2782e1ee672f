"""The Numba CUDA kernels of deform_conv2d run by Numba's CUDA simulator on host arrays.

Not collected by a plain pytest run: ``tests/test_numba_cuda_simulator.py`` runs this module in
a process of its own with ``NUMBA_ENABLE_CUDASIM=1`` (the variable must be set before Numba is
imported). The simulator runs every CUDA thread as a Python thread, so the shapes are tiny.
"""

from __future__ import annotations

import numpy as np
import pytest

from pydeform import deform_conv as deform_conv_module
from pydeform.backends.numba_cuda import simulator_enabled
from pydeform.backends.numba_kernels.deform_conv import NumbaCudaDeformConv2dKernels
from tests.kernel_set_checks import assert_unchanged, check_kernels_write_every_element
from tests.strategies import assert_close, assert_grads_close, build_case

if not simulator_enabled():
    raise RuntimeError("run this module with NUMBA_ENABLE_CUDASIM=1 (see tests/test_numba_cuda_simulator.py)")

GEOMETRIES = {
    "groups2-offset-groups2-mask": dict(
        n=2, channels=4, out_channels=4, size=(5, 6), kernel=(2, 3), groups=2, offset_groups=2,
        stride=(1, 2), padding=(1, 1), dilation=(2, 1), with_mask=True, with_bias=True,
    ),
    "offset-groups3-no-mask": dict(
        n=1, channels=3, out_channels=2, size=(4, 4), kernel=(3, 3), offset_groups=3, padding=1,
        with_mask=False, with_bias=True,
    ),
    "1x1-groups2-stride2-mask": dict(
        n=2, channels=2, out_channels=4, size=(6, 5), kernel=(1, 1), groups=2, stride=2,
        with_mask=True, with_bias=False,
    ),
    "empty-batch": dict(n=0, channels=2, out_channels=2, size=(4, 4), kernel=(2, 2), with_mask=True),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_simulated_numba_cuda_kernels_match_reference(geometry, dtype):
    case = build_case(np.random.default_rng(7), dtype=dtype, **geometry)
    kernels = NumbaCudaDeformConv2dKernels(xp=np)
    _, arrays, shape = deform_conv_module._prepare(
        case.input, case.offset, case.weight, case.bias, case.stride, case.padding, case.dilation,
        case.mask, None, grad_output=case.grad_output,
    )
    before = case.map_arrays(np.copy)
    out = deform_conv_module.run_deform_conv2d_forward(
        kernels, arrays["input"], arrays["offset"], arrays["mask"], arrays["weight"], arrays["bias"], shape
    )
    assert out.dtype == np.dtype(dtype)
    assert_close("output", out, case.reference_forward(), dtype)
    grads = deform_conv_module.run_deform_conv2d_backward(
        kernels, arrays["grad_output"], arrays["input"], arrays["offset"], arrays["mask"], arrays["weight"],
        arrays["bias"], shape,
    )
    assert_grads_close(grads, case.reference_backward(), dtype)
    assert_unchanged(case, before)
    check_kernels_write_every_element(kernels, case, seed=8)
