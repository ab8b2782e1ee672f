"""The RoI ops on a CUDA GPU: both GPU backends (CuPy RawKernels with ``backend=None``, Numba
CUDA with ``backend="numba"``) on CuPy arrays against the float64 reference for every GPU dtype,
their kernel sets called directly with poisoned outputs, and roi_align, roi_pool, ps_roi_align
and ps_roi_pool against torchvision (forward, and backward through torch autograd).

Every test is ``gpu``-marked (skipped without a usable GPU, see conftest.py). CuPy and torch are
imported inside the tests, so this module imports on any machine.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pydeform
import reference
from pydeform.backends import roi_kernels
from tests.roi_kernel_set_checks import check_kernels_write_every_element
from tests.strategies import (
    ROI_KINDS,
    ROI_OPS,
    assert_close,
    assert_roi_grads_close,
    roi_cases,
    to_numpy,
)
# The backends and dtypes, the CuPy helpers and the torch fixture of the deform_conv2d GPU tests.
from tests.test_gpu_deform_conv import BACKENDS, DTYPES, assert_on_gpu_like, to_gpu, torch_modules  # noqa: F401

pytestmark = pytest.mark.gpu


def assert_unchanged(gpu_case, case):
    expected = case.arrays()
    for name, array in gpu_case.arrays().items():
        np.testing.assert_array_equal(to_numpy(array), expected[name], err_msg=f"{name} was modified")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("op", ROI_OPS)
@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
@given(data=st.data())
def test_forward_matches_reference(backend, op, dtype, data):
    case = data.draw(roi_cases(op=op, dtype=dtype))
    gpu = to_gpu(case)
    out = gpu.forward(pydeform, backend=backend)
    assert_on_gpu_like(out, gpu.input, "output")
    assert_close("output", out, case.forward(reference), dtype)
    assert_unchanged(gpu, case)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("op", ROI_OPS)
@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
@given(data=st.data())
def test_backward_matches_reference(backend, op, dtype, data):
    case = data.draw(roi_cases(op=op, dtype=dtype, with_grad=True))
    gpu = to_gpu(case)
    grads = gpu.backward(pydeform, backend=backend)
    for name, grad in grads.items():
        if grad is not None:
            assert_on_gpu_like(grad, gpu.input, f"grad {name}")
    assert_roi_grads_close(grads, case.backward(reference), dtype)
    assert_unchanged(gpu, case)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("op", ROI_OPS)
@pytest.mark.parametrize("backend", BACKENDS.keys())
@given(data=st.data())
def test_kernels_write_every_element(backend, op, dtype, data):
    case = data.draw(roi_cases(op=op, dtype=dtype, with_grad=True, min_rois=1))
    check_kernels_write_every_element(roi_kernels("cupy", backend), case)


def torchvision_result(torch, torchvision, case) -> dict:
    """torchvision's output and input gradient (float64 NumPy arrays) for a float32 ``case``."""
    o = case.options
    input = torch.as_tensor(case.input, device="cuda").requires_grad_(True)
    boxes = torch.as_tensor(case.rois_as_rows, device="cuda")
    run = {
        "roi_align": lambda: torchvision.ops.roi_align(input, boxes, o["output_size"], o["spatial_scale"],
                                                       o["sampling_ratio"], o["aligned"]),
        "ps_roi_align": lambda: torchvision.ops.ps_roi_align(input, boxes, o["output_size"], o["spatial_scale"],
                                                             o["sampling_ratio"]),
        "roi_pool": lambda: torchvision.ops.roi_pool(input, boxes, o["output_size"], o["spatial_scale"]),
        "ps_roi_pool": lambda: torchvision.ops.ps_roi_pool(input, boxes, o["output_size"], o["spatial_scale"]),
    }[case.op]
    out = run()
    out.backward(torch.as_tensor(case.grad_output, device="cuda"))
    return {"output": out.detach().double().cpu().numpy(), "input": input.grad.double().cpu().numpy()}


#: torchvision computes sample positions in float32, pydeform in float64 (as the reference): a
#: position differs by a few float32 ulps of the coordinate, the value by that times its slope.
TORCHVISION_TOLERANCE = 1e-4


def assert_matches_torchvision(name, got, expected):
    got = to_numpy(got).astype(np.float64)
    assert got.shape == expected.shape and np.all(np.isfinite(got)), name
    if got.size:
        scale = max(1.0, float(np.max(np.abs(expected))))
        error = float(np.max(np.abs(got - expected)))
        assert error <= TORCHVISION_TOLERANCE * scale, f"{name}: max error {error:.3g} (scale {scale:.3g})"


def torchvision_cases(op):
    """float32 cases torchvision computes alike: average mode (torchvision's roi_align has no max);
    powers of two for spatial_scale and the bin counts, so that roi_pool's float bin edges are
    exact (pydeform's are exact integers) and no sample lands on the image edge in one precision but
    not the other; for ps_roi_align no zero-size or inverted boxes (torchvision divides by an
    adaptive sample count of 0 there and gives NaN, pydeform gives 0)."""
    kinds = tuple(k for k in ROI_KINDS if k not in ("zero-size", "inverted")) if op == "ps_roi_align" else ROI_KINDS
    cases = roi_cases(op=op, dtype=np.float32, with_grad=True, min_rois=1, kinds=kinds, as_list=False,
                      scales=(1.0, 0.5, 0.25, 2.0), pooled_sizes=(1, 2, 4))
    if op != "roi_align":
        return cases
    return cases.map(lambda case: dataclasses.replace(case, options=dict(case.options, mode="avg")))


@pytest.mark.parametrize("op", ["roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool"])
@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
@given(data=st.data())
def test_matches_torchvision(torch_modules, backend, op, data):
    case = data.draw(torchvision_cases(op))
    expected = torchvision_result(*torch_modules, case)
    gpu = to_gpu(case)
    assert_matches_torchvision("output", gpu.forward(pydeform, backend=backend), expected["output"])
    assert_matches_torchvision("grad input", gpu.backward(pydeform, backend=backend)["input"], expected["input"])


@pytest.mark.parametrize("op", ROI_OPS)
@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
def test_no_rois(backend, op):
    """K = 0 on the GPU: empty outputs, zero gradients of the right shapes."""
    import cupy

    rng = np.random.default_rng(0)
    options = {
        "roi_align": dict(output_size=2), "ps_roi_align": dict(output_size=(2, 1)), "roi_pool": dict(output_size=2),
        "ps_roi_pool": dict(output_size=(1, 2)),
        "deform_roi_pool": dict(output_size=2, offset=cupy.zeros((0, 2, 2, 2), np.float32),
                                mask=cupy.zeros((0, 1, 2, 2), np.float32)),
        "deform_psroi_pool": dict(trans=cupy.zeros((0, 2, 2, 2), np.float32), group_size=2, pooled_size=2),
    }[op]
    input = cupy.asarray(rng.standard_normal((2, 4, 5, 6)).astype(np.float32))
    rois = cupy.zeros((0, 5), np.float32)
    out = getattr(pydeform, op)(input, rois, **options, backend=backend)
    assert out.shape[0] == 0
    assert_on_gpu_like(out, input, "output")
    grads = getattr(pydeform, op + "_backward")(out, input, rois, **options, backend=backend)._asdict()
    for name, grad in grads.items():
        expected = input if name == "input" else options[name]
        assert grad.shape == expected.shape and not grad.any(), name
