"""deform_conv2d on a CUDA GPU: both GPU backends (CuPy RawKernels with ``backend=None``, Numba
CUDA with ``backend="numba"``) on CuPy arrays against the float64 reference for every GPU dtype,
and against torchvision's ``deform_conv2d`` where torch and torchvision are installed.

Every test is ``gpu``-marked (skipped without a usable GPU, see conftest.py). CuPy and torch are
imported inside the tests, so this module imports on any machine.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pydeform import deform_conv2d, deform_conv2d_backward
from pydeform.backends import deform_conv2d_kernels
from tests.kernel_set_checks import assert_unchanged, check_kernels_write_every_element
from tests.strategies import ARRAY_NAMES, assert_close, assert_grads_close, deform_conv_cases, to_numpy

pytestmark = pytest.mark.gpu

BACKENDS = {"cupy": None, "numba": "numba"}  # id -> backend argument
DTYPES = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def to_gpu(case):
    import cupy

    return case.map_arrays(cupy.asarray)


def assert_on_gpu_like(array, like, name):
    """``array`` is a CuPy array on ``like``'s device with ``like``'s dtype."""
    import cupy

    assert isinstance(array, cupy.ndarray), f"{name}: got {type(array)}"
    assert array.dtype == like.dtype, f"{name}: dtype {array.dtype}, expected {like.dtype}"
    assert array.device.id == like.device.id, f"{name}: on GPU {array.device.id}, expected {like.device.id}"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
@given(data=st.data())
def test_forward_matches_reference(backend, dtype, data):
    case = data.draw(deform_conv_cases(dtype=dtype))
    gpu = to_gpu(case)
    out = deform_conv2d(**gpu.arguments(), backend=backend)
    assert_on_gpu_like(out, gpu.input, "output")
    assert_close("output", out, case.reference_forward(), dtype)
    assert_unchanged(gpu, case)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
@given(data=st.data())
def test_backward_matches_reference(backend, dtype, data):
    case = data.draw(deform_conv_cases(dtype=dtype, with_grad=True))
    gpu = to_gpu(case)
    grads = deform_conv2d_backward(gpu.grad_output, **gpu.arguments(), backend=backend)
    for name in ARRAY_NAMES:
        if getattr(grads, name) is not None:
            assert_on_gpu_like(getattr(grads, name), gpu.input, f"grad {name}")
    assert_grads_close(grads, case.reference_backward(), dtype)
    assert_unchanged(gpu, case)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS.keys())
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_kernels_write_every_element(backend, dtype, data, seed):
    case = data.draw(deform_conv_cases(dtype=dtype, with_grad=True))
    check_kernels_write_every_element(deform_conv2d_kernels("cupy", backend), case, seed)


def torchvision_gradients(torch, torchvision, case) -> dict:
    """torchvision's output and gradients (as float64 NumPy arrays) for a float32 ``case``."""
    tensors = {
        name: torch.as_tensor(getattr(case, name), device="cuda").requires_grad_(True)
        for name in ARRAY_NAMES
        if getattr(case, name) is not None
    }
    out = torchvision.ops.deform_conv2d(
        tensors["input"], tensors["offset"], tensors["weight"], bias=tensors.get("bias"),
        stride=case.stride, padding=case.padding, dilation=case.dilation, mask=tensors.get("mask"),
    )
    out.backward(torch.as_tensor(case.grad_output, device="cuda"))
    result = {name: tensor.grad.double().cpu().numpy() for name, tensor in tensors.items()}
    result["output"] = out.detach().double().cpu().numpy()
    return result


@pytest.fixture(scope="module")
def torch_modules():
    """(torch, torchvision), or a skip when either is missing or torch has no CUDA device."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    if not torch.cuda.is_available():
        pytest.skip("torch was built without CUDA or sees no GPU")
    return torch, torchvision


@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
@given(case=deform_conv_cases(dtype=np.float32, with_grad=True, min_batch=1))
def test_matches_torchvision(torch_modules, backend, case):
    """float32 forward and every gradient against torchvision. Sample positions are an integer
    plus a fraction in [0.05, 0.95]: never exactly -1, where torchvision's offset gradient
    differs from docs/deform_conv.md's boundary rule."""
    expected = torchvision_gradients(*torch_modules, case)
    gpu = to_gpu(case)
    assert_close("output", deform_conv2d(**gpu.arguments(), backend=backend), expected["output"], np.float32)
    grads = deform_conv2d_backward(gpu.grad_output, **gpu.arguments(), backend=backend)
    for name in ARRAY_NAMES:
        if getattr(case, name) is not None:
            assert_close(f"grad {name}", getattr(grads, name), expected[name], np.float32)


@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
def test_empty_batch(backend):
    import cupy

    input = cupy.zeros((0, 4, 6, 5), np.float32)
    offset = cupy.zeros((0, 2 * 9, 4, 3), np.float32)
    mask = cupy.zeros((0, 9, 4, 3), np.float32)
    weight = cupy.ones((3, 4, 3, 3), np.float32)
    bias = cupy.ones(3, np.float32)
    out = deform_conv2d(input, offset, weight, bias, mask=mask, backend=backend)
    assert out.shape == (0, 3, 4, 3)
    assert_on_gpu_like(out, input, "output")
    grads = deform_conv2d_backward(
        cupy.zeros((0, 3, 4, 3), np.float32), input, offset, weight, bias, mask=mask, backend=backend
    )
    assert grads.input.shape == input.shape and grads.offset.shape == offset.shape
    assert grads.mask.shape == mask.shape
    np.testing.assert_array_equal(to_numpy(grads.weight), np.zeros(weight.shape))
    np.testing.assert_array_equal(to_numpy(grads.bias), np.zeros(bias.shape))
