"""The Numba CUDA kernels of deform_conv2d and of the RoI ops run by Numba's CUDA simulator on
host arrays.

Not collected by a plain pytest run: ``tests/test_numba_cuda_simulator.py`` runs this module in
a process of its own with ``NUMBA_ENABLE_CUDASIM=1`` (the variable must be set before Numba is
imported). The simulator runs every CUDA thread as a Python thread, so the shapes are tiny.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest

import pydeform
import reference
from pydeform import deform_conv as deform_conv_module
from pydeform import roi as roi_module
from pydeform.backends.numba_cuda import simulator_enabled
from pydeform.backends.numba_kernels import deform_conv as numba_deform_conv
from pydeform.backends.numba_kernels import roi as numba_roi
from pydeform.backends.numba_kernels.deform_conv import NumbaCudaDeformConv2dKernels
from pydeform.backends.numba_kernels.roi import NumbaCudaRoIKernels
from tests import roi_kernel_set_checks
from tests.kernel_set_checks import assert_unchanged, check_border_rule_with_nan_mask, check_kernels_write_every_element
from tests.strategies import (
    ROI_KINDS,
    RoICase,
    assert_close,
    assert_grads_close,
    assert_roi_grads_close,
    build_case,
    build_roi_case,
)

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


def simulated_backward(case, deterministic):
    kernels = NumbaCudaDeformConv2dKernels(xp=np)
    with mock.patch.object(deform_conv_module, "deform_conv2d_kernels", lambda library, backend: kernels):
        return pydeform.deform_conv2d_backward(case.grad_output, **case.arguments(), deterministic=deterministic)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_simulated_numba_cuda_deterministic_backward_matches_reference(geometry, dtype):
    """The deterministic input gradient's kernels (lists, sort, gather) beside the others."""
    case = build_case(np.random.default_rng(7), dtype=dtype, **geometry)
    before = case.map_arrays(np.copy)
    assert_grads_close(simulated_backward(case, True), case.reference_backward(), dtype)
    assert_unchanged(case, before)


# Grids of the launches below: one thread, an odd small grid, the simulator's default.
GRIDS = ((1, 1), (3, 7), None)


def launches_with(monkeypatch, grid):
    """Launch the Numba CUDA kernels of both kernel-set modules on ``grid`` (blocks, threads),
    or as usual for None."""
    if grid is None:
        return

    def launch(kernel, n_items, xp, *args):
        if n_items:
            kernel[grid](*args)

    monkeypatch.setattr(numba_deform_conv, "launch_cuda", launch)
    monkeypatch.setattr(numba_roi, "launch_cuda", launch)


def test_simulated_numba_cuda_deterministic_bits_do_not_depend_on_the_grid(monkeypatch):
    """Every sample of a 3x3 kernel over a 4x4 output lands near one pixel (many contributions
    per bucket): the same input-gradient bits on every grid."""
    rng = np.random.default_rng(5)
    case = build_case(rng, n=1, channels=2, out_channels=2, size=(4, 4), kernel=(3, 3), padding=1,
                      dtype=np.float32)
    ys = np.arange(4).reshape(1, 1, 4, 1) + np.arange(3).reshape(3, 1, 1, 1) - 1
    xs = np.arange(4).reshape(1, 1, 1, 4) + np.arange(3).reshape(1, 3, 1, 1) - 1
    target = rng.uniform(-0.45, 0.45, (3, 3, 4, 4, 2)) + (1.3, 1.6)
    case.offset[...] = np.stack([target[..., 0] - ys, target[..., 1] - xs], axis=2).reshape(1, 18, 4, 4)
    bits = set()
    for grid in GRIDS:
        with monkeypatch.context() as patch:
            launches_with(patch, grid)
            grads = simulated_backward(case, True)
        assert_grads_close(grads, case.reference_backward(), np.float32)
        bits.add(grads.input.tobytes())
    assert len(bits) == 1


# The RoI kernels (pydeform.backends.numba_kernels.roi), run through the public ops (their kernel
# set patched to the simulated one) and called directly with poisoned outputs.

SMALL_KINDS = tuple(kind for kind in ROI_KINDS if kind != "huge")  # huge + adaptive: many samples


def roi_problem(name, dtype) -> RoICase:
    """Six boxes (every kind but huge, unless named) on two 4x5 images."""
    rng = np.random.default_rng(11)
    k = len(SMALL_KINDS)

    def array(*shape):
        return rng.standard_normal(shape).astype(dtype)

    op, channels, kinds, options = {
        "roi_align-avg-adaptive": ("roi_align", 2, SMALL_KINDS,
                                   dict(output_size=(2, 1), sampling_ratio=0, aligned=False, mode="avg")),
        "roi_align-max-aligned-huge": ("roi_align", 2, SMALL_KINDS[:-1] + ("huge",),
                                       dict(output_size=2, sampling_ratio=2, aligned=True, mode="max")),
        "ps_roi_align": ("ps_roi_align", 4, SMALL_KINDS, dict(output_size=2, sampling_ratio=-1)),
        "roi_pool": ("roi_pool", 2, SMALL_KINDS, dict(output_size=(2, 2))),
        "ps_roi_pool": ("ps_roi_pool", 4, SMALL_KINDS, dict(output_size=(1, 2))),
        "deform_roi_pool-offset-mask": ("deform_roi_pool", 2, SMALL_KINDS,
                                        dict(output_size=2, sampling_ratio=2, gamma=0.3, offset=array(k, 2, 2, 2),
                                             mask=array(k, 1, 2, 2))),
        "deform_roi_pool-plain": ("deform_roi_pool", 2, SMALL_KINDS, dict(output_size=(1, 2), sampling_ratio=0)),
        "deform_psroi_pool-trans": ("deform_psroi_pool", 8, SMALL_KINDS,
                                    dict(trans=array(k, 4, 2, 2), output_dim=2, group_size=2, pooled_size=2,
                                         sample_per_part=2, trans_std=0.2)),
        "deform_psroi_pool-no-trans": ("deform_psroi_pool", 4, SMALL_KINDS,
                                       dict(output_dim=1, group_size=2, pooled_size=3, sample_per_part=1)),
    }[name]
    return build_roi_case(op, rng, dtype, n=2, channels=channels, size=(4, 5), kinds=kinds, **options)


ROI_PROBLEMS = ("roi_align-avg-adaptive", "roi_align-max-aligned-huge", "ps_roi_align", "roi_pool", "ps_roi_pool",
                "deform_roi_pool-offset-mask", "deform_roi_pool-plain", "deform_psroi_pool-trans",
                "deform_psroi_pool-no-trans")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", ROI_PROBLEMS)
def test_simulated_numba_cuda_roi_kernels_match_reference(name, dtype):
    case = roi_problem(name, dtype)
    kernels = NumbaCudaRoIKernels(xp=np)
    before = case.map_arrays(np.copy)
    with mock.patch.object(roi_module, "roi_kernels", lambda library, backend: kernels):
        out = case.forward(pydeform)
        grads = case.backward(pydeform)
    assert out.dtype == np.dtype(dtype)
    assert_close("output", out, case.forward(reference), dtype)
    assert_roi_grads_close(grads, case.backward(reference), dtype)
    for array_name, array in case.arrays().items():
        np.testing.assert_array_equal(array, before.arrays()[array_name], err_msg=f"{array_name} was modified")
    roi_kernel_set_checks.check_kernels_write_every_element(kernels, case)


@pytest.mark.parametrize("name", ROI_PROBLEMS)
def test_simulated_numba_cuda_roi_kernels_in_float16(name):
    """float16 arrays (converted to float32 around the launch, the output written back), the
    kernel-set methods called directly: the ops take float16 on the GPU only. (The simulator has
    no bfloat16.)"""
    roi_kernel_set_checks.check_kernels_write_every_element(NumbaCudaRoIKernels(xp=np), roi_problem(name, np.float16))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", ROI_PROBLEMS)
def test_simulated_numba_cuda_roi_deterministic_backward_matches_reference(name, dtype):
    """The deterministic backward's kernels (lists, sort, gather; partials and parameter sums),
    called directly with the arguments the op prepares: every gradient as the reference's."""
    roi_kernel_set_checks.check_kernels_write_every_element(NumbaCudaRoIKernels(xp=np), roi_problem(name, dtype),
                                                            deterministic=True)


@pytest.mark.parametrize("name", ROI_PROBLEMS)
def test_simulated_numba_cuda_roi_deterministic_backward_in_float16(name):
    roi_kernel_set_checks.check_kernels_write_every_element(NumbaCudaRoIKernels(xp=np), roi_problem(name, np.float16),
                                                            deterministic=True)


@pytest.mark.parametrize("name", ROI_PROBLEMS)
def test_simulated_numba_cuda_roi_deterministic_bits_do_not_depend_on_the_grid(monkeypatch, name):
    case = roi_problem(name, np.float32)
    kernels = NumbaCudaRoIKernels(xp=np)
    bits = set()
    for grid in GRIDS:
        with monkeypatch.context() as patch:
            launches_with(patch, grid)
            patch.setattr(roi_module, "roi_kernels", lambda library, backend: kernels)
            grads = case.backward(pydeform, deterministic=True)
        assert_roi_grads_close(grads, case.backward(reference), np.float32)
        bits.add(tuple(None if g is None else g.tobytes() for g in grads.values()))
    assert len(bits) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_simulated_max_modes_propagate_nan(dtype):
    roi_kernel_set_checks.check_max_modes_propagate_nan(dtype, kernels=NumbaCudaRoIKernels(xp=np))


def test_simulated_border_rule_with_nan_mask():
    check_border_rule_with_nan_mask(kernels=NumbaCudaDeformConv2dKernels(xp=np))


def test_simulated_rounding_just_below_a_half_in_float32():
    """roi_pool rounds box corners half away from zero exactly in float32: 0.49999997 rounds to
    0 (``floor(v + 0.5)`` would round the sum up to 1.0 and move the bin off pixel (0, 0))."""
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 0, 0] = 5.0
    rois = np.array([[0, 0.49999997, 0.49999997, 2.5, 2.5]], np.float32)
    with mock.patch.object(roi_module, "roi_kernels", lambda library, backend: NumbaCudaRoIKernels(xp=np)):
        out = pydeform.roi_pool(x, rois, 1)
    np.testing.assert_array_equal(out, reference.roi_pool(x, rois, 1))
