"""The array-level DLPack entry (pydeform/_interop.py): every public op takes torch tensors and
JAX arrays as well as NumPy / CuPy arrays and answers in the caller's array type and device,
sharing memory where DLPack allows; bad arrays get errors naming the argument."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings

import pydeform
from pydeform._interop import dlpack_entry, from_native, to_native
from strategies import build_case, roi_cases

torch = pytest.importorskip("torch")
jnp = pytest.importorskip("jax.numpy")


def _is_entry(function) -> bool:
    return getattr(function, "__code__", None) is dlpack_entry(lambda x: x).__code__


# Public functions that take no array: shapes and integers in, a NumPy array or an int out.
NO_ARRAY_ARGUMENTS = {"checkerboard_level_set", "disk_level_set", "next_phase"}


def test_every_public_function_is_wrapped():
    functions = [getattr(pydeform, name) for name in pydeform.__all__
                 if callable(getattr(pydeform, name)) and not isinstance(getattr(pydeform, name), type)]
    assert len(functions) >= 14
    assert [f.__name__ for f in functions if not _is_entry(f)] == sorted(NO_ARRAY_ARGUMENTS, key=[
        f.__name__ for f in functions].index)


def test_the_functions_without_array_arguments_take_shapes_and_integers():
    assert pydeform.checkerboard_level_set((2, 3)).shape == (2, 3)
    assert pydeform.disk_level_set((4, 5)).shape == (4, 5)
    assert isinstance(pydeform.next_phase(0, 3, 1), int)


def test_import_pydeform_imports_no_framework():
    code = "import sys, pydeform; print(sorted({'torch', 'jax', 'cupy', 'numba'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _torch(array, requires_grad=False):
    return torch.from_numpy(array.copy()).requires_grad_(requires_grad)


def _assert_same(got, expected, rtol=None):
    """``got`` (torch / JAX, or a NamedTuple of them) holds the values of ``expected`` (NumPy):
    the same kernels ran on the same values, so only the BLAS's blocking (which may depend on
    the buffers' alignment) can move the last bits."""
    if expected is None:
        assert got is None
        return
    if isinstance(expected, tuple):
        assert type(got) is type(expected)
        for g, e in zip(got, expected):
            _assert_same(g, e, rtol)
        return
    assert not isinstance(got, np.ndarray)
    values = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    assert values.dtype == expected.dtype and values.shape == expected.shape
    rtol = rtol or (1e-12 if expected.dtype == np.float64 else 1e-5)
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(values, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("with_mask, with_bias", [(True, True), (False, False)])
def test_deform_conv2d_torch_cpu(with_mask, with_bias):
    case = build_case(np.random.default_rng(0), n=2, channels=4, out_channels=2, size=(5, 6), kernel=(3, 2),
                      groups=2, padding=1, with_mask=with_mask, with_bias=with_bias)
    arrays = {k: v for k, v in case.arguments().items() if isinstance(v, np.ndarray)}
    tensors = {k: _torch(v, requires_grad=True) for k, v in arrays.items()}
    options = case.options()
    out = pydeform.deform_conv2d(**tensors, **options)
    assert isinstance(out, torch.Tensor) and out.device.type == "cpu" and not out.requires_grad
    _assert_same(out, pydeform.deform_conv2d(**arrays, **options))
    grads = pydeform.deform_conv2d_backward(_torch(case.grad_output), **tensors, **options)
    _assert_same(grads, pydeform.deform_conv2d_backward(case.grad_output, **arrays, **options))
    for name, tensor in tensors.items():
        assert tensor.requires_grad
        np.testing.assert_array_equal(tensor.detach().numpy(), arrays[name])


@settings(max_examples=8)
@given(roi_cases(with_grad=True))
def test_roi_ops_torch_cpu(case):
    pairs = []

    def to_torch(array):
        pairs.append((array, _torch(array)))
        return pairs[-1][1]

    tensors = case.map_arrays(to_torch)
    _assert_same(tensors.forward(pydeform), case.forward(pydeform))
    grads = getattr(pydeform, case.op + "_backward")(tensors.grad_output, **tensors.arguments())
    expected = getattr(pydeform, case.op + "_backward")(case.grad_output, **case.arguments())
    _assert_same(grads, expected)
    for array, tensor in pairs:
        np.testing.assert_array_equal(tensor.numpy(), array)


def test_jax_arrays_come_back_as_jax_arrays():
    case = build_case(np.random.default_rng(1), n=1, channels=2, out_channels=3, size=(4, 4), kernel=(2, 2),
                      dtype=np.float32)
    arrays = {k: v for k, v in case.arguments().items() if isinstance(v, np.ndarray)}
    out = pydeform.deform_conv2d(**{k: jnp.asarray(v) for k, v in arrays.items()}, **case.options())
    assert type(out).__module__.split(".")[0] == "jaxlib"
    _assert_same(out, pydeform.deform_conv2d(**arrays, **case.options()))
    rois = [jnp.asarray(np.array([[0.5, 0.5, 3.2, 2.7]], np.float32))]
    pooled = pydeform.roi_align(jnp.asarray(case.input), rois, 2, sampling_ratio=2)
    _assert_same(pooled, pydeform.roi_align(case.input, [np.asarray(rois[0])], 2, sampling_ratio=2))


def test_exchange_shares_memory():
    tensor = torch.arange(12.0).reshape(3, 4)[:, 1:]  # a strided view
    array = to_native("x", tensor)
    assert isinstance(array, np.ndarray) and np.shares_memory(array, tensor.numpy())
    back = from_native(array, tensor)
    assert isinstance(back, torch.Tensor) and back.data_ptr() == tensor.data_ptr()


def test_numpy_arguments_pass_through_untouched():
    seen = []

    @dlpack_entry
    def spy(input, rois, size=1, *, backend=None):
        seen.append((input, rois))
        return input

    image, boxes = np.zeros((1, 1, 2, 2)), [np.zeros((0, 4))]
    assert spy(image, boxes, size=(2, 2)) is image
    assert seen[0][0] is image and seen[0][1] is boxes


def test_results_keep_their_structure():
    @dlpack_entry
    def op(input):
        return pydeform.RoIGrads(np.float64(2.0)), None, (input * 2, input.sum())

    grads, nothing, (doubled, total) = op(torch.ones(2, dtype=torch.float64))
    assert isinstance(grads, pydeform.RoIGrads) and grads.input.item() == 2.0 and grads.input.ndim == 0
    assert nothing is None and doubled.tolist() == [2.0, 2.0] and total.item() == 2.0


def test_errors_name_the_argument():
    image = torch.zeros(1, 1, 3, 3)
    with pytest.raises(TypeError, match=r"rois: expected a torch\.Tensor like input, got numpy\.ndarray"):
        pydeform.roi_pool(image, np.zeros((1, 5), np.float32), 2)
    with pytest.raises(TypeError, match=r"input: expected a torch\.Tensor like rois\[0\], got numpy\.ndarray"):
        pydeform.roi_pool(np.zeros((1, 1, 3, 3), np.float32), [torch.zeros(1, 4)], 2)
    with pytest.raises(TypeError, match=r"rois: expected a torch\.Tensor like input, got jaxlib"):
        pydeform.roi_pool(image, jnp.zeros((1, 5)), 2)
    with pytest.raises(ValueError, match=r"input: expected an array on the CPU or a CUDA GPU, .*meta"):
        pydeform.roi_pool(torch.zeros(1, 1, 3, 3, device="meta"), torch.zeros(1, 5), 2)
    with pytest.raises(TypeError, match=r"input: .*torch\.bfloat16 on the CPU cannot be exchanged with NumPy"):
        pydeform.roi_pool(image.bfloat16(), torch.zeros(1, 5), 2)
    # The op's own checks still speak: float16 is a GPU-only dtype.
    with pytest.raises(TypeError, match=r"input: expected a floating dtype among float32, float64"):
        pydeform.roi_pool(image.half(), torch.zeros(1, 5, dtype=torch.float16), 2)


def test_jax_tracers_are_pointed_to_pydeform_jax():
    import jax

    traced = jax.jit(lambda image: pydeform.roi_pool(image, jnp.zeros((1, 5)), 2))
    with pytest.raises(ValueError, match=r"input: .*Tracer.*use pydeform\.jax"):
        traced(jnp.ones((1, 1, 3, 3)))


class _Foreign:
    """An array of a framework pydeform does not know, with no ``from_dlpack`` to answer in."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def test_framework_without_from_dlpack_is_refused():
    with pytest.raises(TypeError, match=r"cannot return results as .*_Foreign.*from_dlpack"):
        pydeform.roi_pool(_Foreign(np.zeros((1, 1, 3, 3))), _Foreign(np.zeros((1, 5))), 2)


@pytest.mark.gpu
def test_cuda_tensors_go_to_cupy_without_copy_and_come_back():
    import cupy

    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    for index in range(min(torch.cuda.device_count(), 2)):
        device = torch.device("cuda", index)
        case = build_case(np.random.default_rng(index), n=2, channels=2, out_channels=2, size=(5, 5), kernel=(3, 3))
        arrays = {k: v for k, v in case.arguments().items() if isinstance(v, np.ndarray)}
        tensors = {k: torch.from_numpy(v).to(device).requires_grad_() for k, v in arrays.items()}
        native = to_native("input", tensors["input"])
        assert isinstance(native, cupy.ndarray) and native.data.ptr == tensors["input"].data_ptr()
        assert native.device.id == index
        out = pydeform.deform_conv2d(**tensors, **case.options())
        assert isinstance(out, torch.Tensor) and out.device == device
        _assert_same(out.cpu(), pydeform.deform_conv2d(**arrays, **case.options()), rtol=1e-10)
