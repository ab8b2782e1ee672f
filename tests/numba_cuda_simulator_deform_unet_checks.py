"""The Numba CUDA kernels behind the Deformable U-Net ops run by Numba's CUDA simulator on host
arrays: deform_conv_transpose2d on deform_conv2d's Numba CUDA kernel set, deform_pool2d's own
kernels through the public op and called directly with poisoned outputs (float16 too), and its
deterministic input gradient (deform_conv2d's contribution lists, sort and the pool's gather).

Not collected by a plain pytest run: ``tests/test_numba_cuda_simulator.py`` runs this module in
a process of its own with ``NUMBA_ENABLE_CUDASIM=1``. The simulator runs every CUDA thread as a
Python thread, so the shapes are tiny.
"""

from __future__ import annotations

import numpy as np
import pytest

import pydeform
from pydeform import deform_unet as deform_unet_module
from pydeform._workspace import provided
from pydeform.backends.numba_cuda import simulator_enabled
from pydeform.backends.numba_kernels import deform_conv as numba_deform_conv
from pydeform.backends.numba_kernels import deform_pool as numba_deform_pool
from pydeform.backends.numba_kernels.deform_conv import NumbaCudaDeformConv2dKernels
from pydeform.backends.numba_kernels.deform_pool import NumbaCudaDeformPool2dKernels
from tests.deform_unet_cases import pool_case_from, transpose_case_from
from tests.deform_unet_kernel_set_checks import (
    assert_dict_close, assert_unchanged, check_pool_kernels_write_every_element, check_pool_matches_reference,
    check_transpose_matches_reference, kernel_sets,
)
from tests.deform_unet_cases import POOL_ARRAYS
from tests.strategies import assert_close, build_case
from tests.test_deterministic_backward import crowded_deform_conv_case
from tests.test_jax_workspace import buffers_for

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


def deterministic_pool_backward(case, **options):
    with kernel_sets(pool=NumbaCudaDeformPool2dKernels(xp=np)):
        return pydeform.deform_pool2d_backward(case.grad_output, **case.arguments(), deterministic=True, **options)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_simulated_pool_deterministic_backward_matches_reference(geometry, dtype, mode):
    """The deterministic input gradient's kernels (deform_conv2d's lists and sort, the pool's
    gather) beside the others; in max mode with the forward's indices too."""
    case = pool_case_from(conv_case(geometry, dtype), mode, np.random.default_rng(13))
    before = case.map_arrays(np.copy)
    expected = case.reference_backward()
    assert_dict_close(deterministic_pool_backward(case), expected, dtype)
    if mode == "max":
        _, indices = case.reference_forward(return_indices=True)
        assert_dict_close(deterministic_pool_backward(case, indices=indices.astype(np.int32)), expected, dtype)
    assert_unchanged(case, before, POOL_ARRAYS)


# Grids of the launches below: one thread, an odd small grid, the simulator's default.
GRIDS = ((1, 1), (3, 7), None)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_simulated_pool_deterministic_bits_do_not_depend_on_the_grid(monkeypatch, mode):
    """Every sample lands within a pixel of one point (hundreds of contributions per input
    pixel and channel): the same input-gradient bits on every grid."""
    case = pool_case_from(crowded_deform_conv_case(np.float32), mode, np.random.default_rng(14))
    expected = case.reference_backward()
    bits = set()
    for grid in GRIDS:
        with monkeypatch.context() as patch:
            if grid is not None:
                def launch(kernel, n_items, xp, *args, grid=grid):
                    if n_items:
                        kernel[grid](*args)

                patch.setattr(numba_deform_conv, "launch_cuda", launch)
                patch.setattr(numba_deform_pool, "launch_cuda", launch)
            grads = deterministic_pool_backward(case)
        assert_dict_close(grads, expected, np.float32)
        bits.add(grads.input.tobytes())
    assert len(bits) == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # NaN fill of integer slots
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_simulated_pool_deterministic_input_gradient_in_float16_writes_every_element(mode):
    """float16 offsets, mask and grad_output (converted to float32 for the lists and the
    gather), the kernel-set method called directly on a NaN-poisoned float32 input gradient,
    with exactly the scratch buffers the backward's workspace plans (what pydeform.jax provides)."""
    case = pool_case_from(conv_case("groups2-offset-groups2-mask", np.float16), mode, np.random.default_rng(15))
    geometry = deform_unet_module.deform_pool2d_geometry(
        {"input": case.input.shape, "offset": case.offset.shape}, case.kernel_size, case.stride, case.padding,
        case.dilation)
    kernels = NumbaCudaDeformPool2dKernels(xp=np)
    plan = deform_unet_module.deform_pool2d_workspace(kernels, case.input.shape[0], geometry, np.float16,
                                                      backward=True, masked=True, recompute_indices=False,
                                                      deterministic=True)
    indices = case.reference_forward(return_indices=True)[1].astype(np.int32) if mode == "max" else None
    before = case.map_arrays(np.copy)
    grad_input = np.full(case.input.shape, np.nan, np.float32)
    with provided(buffers_for({}, plan)):
        kernels.backward_input_deterministic(case.offset, case.mask, case.grad_output, indices, grad_input,
                                             geometry, mode == "max")
    assert_close("grad input", grad_input, case.reference_backward()["input"], np.float16)
    assert_unchanged(case, before, POOL_ARRAYS)
