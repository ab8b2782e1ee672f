"""Argument checks of deform_conv2d / deform_conv2d_backward: one case per rule, each raising
the right exception type with a message that starts with the argument's name and shows what
was expected and what was received."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pydeform import deform_conv2d, deform_conv2d_backward

# A valid problem: C=4, weight groups 2, offset groups 2, a 3x2 kernel on a 6x5 image -> 4x4.
SHAPES = {
    "input": (2, 4, 6, 5),
    "offset": (2, 24, 4, 4),
    "weight": (6, 2, 3, 2),
    "bias": (6,),
    "mask": (2, 12, 4, 4),
    "grad_output": (2, 6, 4, 4),
}


def valid_arguments() -> dict:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}


class CupyLikeArray:
    """Stands in for a CuPy array in the checks, which run before any CuPy code: its type lives
    in the ``cupy`` package and it has the CUDA array interface, a shape, a dtype and a device.
    Lets the library / device / GPU-dtype rules be checked on a machine without CuPy or a GPU."""

    __module__ = "cupy"

    class Device:
        def __init__(self, id):
            self.id = id

    def __init__(self, array: np.ndarray, device_id: int = 0):
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.device = CupyLikeArray.Device(device_id)
        # A null pointer: the checks never read the data.
        self.__cuda_array_interface__ = {
            "shape": array.shape, "typestr": array.dtype.str, "data": (0, False), "version": 3
        }


def on_fake_gpu(arguments: dict, device_of=lambda name: 0) -> None:
    for name, value in arguments.items():
        if isinstance(value, np.ndarray):
            arguments[name] = CupyLikeArray(value, device_of(name))


def setter(**changes):
    def change(arguments):
        arguments.update(changes)

    return change


def reshaped(name, shape):
    def change(arguments):
        arguments[name] = np.zeros(shape)

    return change


def with_dtype(name, dtype):
    def change(arguments):
        arguments[name] = arguments[name].astype(dtype)

    return change


def as_list(name):
    def change(arguments):
        arguments[name] = arguments[name].tolist()

    return change


def fake_gpu_with_offset_on_device_1(arguments):
    on_fake_gpu(arguments, device_of=lambda name: 1 if name == "offset" else 0)


def fake_gpu_with_int_input(arguments):
    arguments["input"] = arguments["input"].astype(np.int32)
    on_fake_gpu(arguments)


def fake_gpu_weight(arguments):
    arguments["weight"] = CupyLikeArray(arguments["weight"])


def zero_channel_input(arguments):
    arguments["input"] = np.zeros((2, 0, 6, 5))
    arguments["weight"] = np.zeros((6, 1, 3, 2))


#: (id, change to the valid arguments, exception, argument named, fragments of the message).
RULES = [
    ("input-none", setter(input=None), TypeError, "input", ["None"]),
    ("offset-none", setter(offset=None), TypeError, "offset", ["None"]),
    ("weight-none", setter(weight=None), TypeError, "weight", ["None"]),
    ("input-list", as_list("input"), TypeError, "input", ["NumPy or CuPy array", "list"]),
    ("offset-list", as_list("offset"), TypeError, "offset", ["NumPy or CuPy array", "list"]),
    ("bias-float", setter(bias=1.5), TypeError, "bias", ["NumPy or CuPy array", "float"]),
    ("mask-numpy-scalar", setter(mask=np.float64(1.0)), TypeError, "mask", ["NumPy or CuPy array", "numpy.float64"]),
    ("weight-cupy-with-numpy", fake_gpu_weight, TypeError, "weight", ["numpy", "cupy"]),
    ("offset-other-gpu", fake_gpu_with_offset_on_device_1, ValueError, "offset", ["GPU 0", "GPU 1"]),
    ("input-int32-gpu", fake_gpu_with_int_input, TypeError, "input", ["float16, bfloat16, float32, float64", "GPU", "int32"]),
    ("input-int32", with_dtype("input", np.int32), TypeError, "input", ["float32, float64", "int32"]),
    ("weight-int64", with_dtype("weight", np.int64), TypeError, "weight", ["float32, float64", "int64"]),
    ("mask-complex", with_dtype("mask", np.complex128), TypeError, "mask", ["float32, float64", "complex128"]),
    ("input-float16-cpu", with_dtype("input", np.float16), TypeError, "input", ["float32, float64", "CPU", "float16"]),
    ("offset-float32-mixed", with_dtype("offset", np.float32), TypeError, "offset", ["float64", "float32"]),
    ("bias-float32-mixed", with_dtype("bias", np.float32), TypeError, "bias", ["float64", "float32"]),
    ("input-rank", reshaped("input", (4, 6, 5)), ValueError, "input", ["4-d", "3-d", "(4, 6, 5)"]),
    ("offset-rank", reshaped("offset", (1, 2, 24, 4, 4)), ValueError, "offset", ["4-d", "5-d"]),
    ("weight-rank", reshaped("weight", (6, 2, 6)), ValueError, "weight", ["4-d", "3-d"]),
    ("bias-rank", reshaped("bias", (6, 1)), ValueError, "bias", ["1-d", "2-d"]),
    ("mask-rank", reshaped("mask", (2, 12, 16)), ValueError, "mask", ["4-d", "3-d"]),
    ("input-zero-channels", zero_channel_input, ValueError, "input", ["channel", "(2, 0, 6, 5)"]),
    ("weight-no-out-channels", reshaped("weight", (0, 2, 3, 2)), ValueError, "weight", ["(0, 2, 3, 2)"]),
    ("weight-no-in-channels", reshaped("weight", (6, 0, 3, 2)), ValueError, "weight", ["(6, 0, 3, 2)"]),
    ("weight-empty-kernel", reshaped("weight", (6, 2, 0, 2)), ValueError, "weight", ["(6, 2, 0, 2)"]),
    ("weight-groups-divide-channels", reshaped("weight", (6, 3, 3, 2)), ValueError, "weight", ["3", "4 channels"]),
    ("weight-groups-divide-out-channels", reshaped("weight", (5, 2, 3, 2)), ValueError, "weight", ["C_out = 5", "groups = 2"]),
    ("offset-channels-not-multiple", reshaped("offset", (2, 23, 4, 4)), ValueError, "offset", ["2*kh*kw = 12", "(2, 23, 4, 4)"]),
    ("offset-no-channels", reshaped("offset", (2, 0, 4, 4)), ValueError, "offset", ["2*kh*kw = 12", "(2, 0, 4, 4)"]),
    ("offset-groups-divide-channels", reshaped("offset", (2, 36, 4, 4)), ValueError, "offset", ["3 offset groups", "4 channels"]),
    ("output-empty", reshaped("input", (2, 4, 2, 5)), ValueError, "input", ["2x5", "kernel 3x2", "0x4"]),
    ("offset-batch", reshaped("offset", (1, 24, 4, 4)), ValueError, "offset", ["(2, 24, 4, 4)", "(1, 24, 4, 4)"]),
    ("offset-spatial", reshaped("offset", (2, 24, 4, 3)), ValueError, "offset", ["(2, 24, 4, 4)", "(2, 24, 4, 3)"]),
    ("mask-channels", reshaped("mask", (2, 6, 4, 4)), ValueError, "mask", ["(2, 12, 4, 4)", "(2, 6, 4, 4)"]),
    ("mask-batch", reshaped("mask", (3, 12, 4, 4)), ValueError, "mask", ["(2, 12, 4, 4)", "(3, 12, 4, 4)"]),
    ("mask-spatial", reshaped("mask", (2, 12, 5, 4)), ValueError, "mask", ["(2, 12, 4, 4)", "(2, 12, 5, 4)"]),
    ("bias-length", reshaped("bias", (5,)), ValueError, "bias", ["(6,)", "(5,)"]),
    ("stride-zero", setter(stride=0), ValueError, "stride", [">= 1", "0"]),
    ("stride-negative", setter(stride=(1, -2)), ValueError, "stride", [">= 1", "(1, -2)"]),
    ("dilation-zero", setter(dilation=(0, 1)), ValueError, "dilation", [">= 1", "(0, 1)"]),
    ("padding-negative", setter(padding=-1), ValueError, "padding", [">= 0", "-1"]),
    ("stride-bool", setter(stride=True), TypeError, "stride", ["int or a pair of ints", "True"]),
    ("padding-bool-in-pair", setter(padding=(0, False)), TypeError, "padding", ["int or a pair of ints", "(0, False)"]),
    ("dilation-float", setter(dilation=1.0), TypeError, "dilation", ["int or a pair of ints", "1.0"]),
    ("stride-float-in-pair", setter(stride=(1, 1.5)), TypeError, "stride", ["int or a pair of ints", "(1, 1.5)"]),
    ("padding-three", setter(padding=(0, 0, 0)), TypeError, "padding", ["int or a pair of ints", "(0, 0, 0)"]),
    ("stride-none", setter(stride=None), TypeError, "stride", ["int or a pair of ints", "None"]),
    ("backend-unknown", setter(backend="torch"), ValueError, "backend", ["'cupy'", "'numba'", "'torch'"]),
    ("backend-cupy-numpy", setter(backend="cupy"), ValueError, "backend", ["'cupy'", "CuPy arrays", "NumPy arrays"]),
]

BACKWARD_RULES = [
    ("grad-output-none", setter(grad_output=None), TypeError, "grad_output", ["None"]),
    ("grad-output-list", as_list("grad_output"), TypeError, "grad_output", ["NumPy or CuPy array", "list"]),
    ("grad-output-int", with_dtype("grad_output", np.int64), TypeError, "grad_output", ["float32, float64", "int64"]),
    ("grad-output-rank", reshaped("grad_output", (2, 6, 16)), ValueError, "grad_output", ["4-d", "3-d"]),
    ("grad-output-channels", reshaped("grad_output", (2, 5, 4, 4)), ValueError, "grad_output", ["(2, 6, 4, 4)", "(2, 5, 4, 4)"]),
    ("grad-output-batch", reshaped("grad_output", (1, 6, 4, 4)), ValueError, "grad_output", ["(2, 6, 4, 4)", "(1, 6, 4, 4)"]),
    ("grad-output-spatial", reshaped("grad_output", (2, 6, 4, 5)), ValueError, "grad_output", ["(2, 6, 4, 4)", "(2, 6, 4, 5)"]),
    ("deterministic-int", setter(deterministic=1), TypeError, "deterministic", ["bool", "1"]),
    ("deterministic-none", setter(deterministic=None), TypeError, "deterministic", ["bool", "None"]),
]


def forward(arguments):
    arguments.pop("grad_output")
    return deform_conv2d(**arguments)


def backward(arguments):
    return deform_conv2d_backward(**arguments)


def check_rule(call, change, exception, name, fragments):
    arguments = valid_arguments()
    change(arguments)
    with pytest.raises(exception) as raised:
        call(arguments)
    message = str(raised.value)
    assert re.match(rf"{name}: ", message), f"message does not start with '{name}: ': {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_valid_arguments_pass():
    """The baseline every rule changes is itself accepted (so each rule's error is its own)."""
    assert forward(valid_arguments()).shape == SHAPES["grad_output"]
    assert backward(valid_arguments()).mask.shape == SHAPES["mask"]


@pytest.mark.parametrize("call", [forward, backward])
@pytest.mark.parametrize("change, exception, name, fragments", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_rule(call, change, exception, name, fragments):
    check_rule(call, change, exception, name, fragments)


@pytest.mark.parametrize(
    "change, exception, name, fragments", [r[1:] for r in BACKWARD_RULES], ids=[r[0] for r in BACKWARD_RULES]
)
def test_backward_rule(change, exception, name, fragments):
    check_rule(backward, change, exception, name, fragments)


def test_numpy_integer_options_are_accepted():
    """NumPy integer scalars and lists are valid stride / padding / dilation values."""
    arguments = valid_arguments()
    del arguments["grad_output"]
    expected = deform_conv2d(**arguments, stride=1, padding=0, dilation=1)
    got = deform_conv2d(**arguments, stride=[np.int64(1), np.int32(1)], padding=np.int64(0), dilation=(np.uint8(1), 1))
    np.testing.assert_array_equal(got, expected)


def test_a_dtype_mismatch_names_every_arrays_dtype():
    """The first array may be the odd one out: the message lists them all."""
    arguments = valid_arguments()
    arguments.pop("grad_output")
    arguments["input"] = arguments["input"].astype(np.float32)
    with pytest.raises(TypeError) as raised:
        deform_conv2d(**arguments)
    assert str(raised.value) == (
        "offset: expected dtype float32 like input, got float64; all arrays of a call share one dtype "
        "(got input float32, offset float64, weight float64, bias float64, mask float64)"
    )
