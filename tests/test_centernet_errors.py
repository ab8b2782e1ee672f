"""Argument checks of the CenterNet ops (pydeform/centernet.py): one case per rule, each raising
the right exception type with a message that starts with the argument's name and shows what was
expected and what was received."""

from __future__ import annotations

import re

import numpy as np
import pytest

import pydeform
from tests.test_deform_conv_errors import CupyLikeArray, reshaped, setter, with_dtype


def decode_arguments() -> dict:
    rng = np.random.default_rng(0)
    return {"heat": rng.random((2, 3, 4, 5)), "wh": rng.random((2, 2, 4, 5)), "reg": rng.random((2, 2, 4, 5)),
            "K": 5}


def targets_arguments() -> dict:
    boxes = np.array([[[0, 0, 16, 12], [4, 4, 30, 30]], [[1, 2, 3, 4], [0, 0, 0, 0]]], dtype=np.float64)
    return {"boxes": boxes, "labels": np.array([[0, 2], [1, -1]]), "num_classes": 3, "output_size": 8}


def focal_arguments() -> dict:
    rng = np.random.default_rng(1)
    return {"pred": rng.random((1, 2, 3, 3)), "target": rng.random((1, 2, 3, 3)), "grad_output": np.array(1.0)}


def label_at(b, m, value):
    def change(arguments):
        arguments["labels"] = arguments["labels"].copy()
        arguments["labels"][b, m] = value

    return change


def box_at(b, m, value):
    def change(arguments):
        arguments["boxes"] = arguments["boxes"].copy()
        arguments["boxes"][b, m, 2] = value

    return change


def target_at(index, value):
    def change(arguments):
        arguments["target"] = arguments["target"].copy()
        arguments["target"][index] = value

    return change


def gpu_array(name):
    def change(arguments):
        arguments[name] = CupyLikeArray(arguments[name])

    return change


DECODE_RULES = {
    "heat-none": (setter(heat=None), TypeError, "heat", "expected an array, got None"),
    "wh-none": (setter(wh=None), TypeError, "wh", "expected an array, got None"),
    "heat-list": (setter(heat=[[[[0.5]]]]), TypeError, "heat", "NumPy or CuPy array, got builtins.list"),
    "heat-int": (with_dtype("heat", np.int64), TypeError, "heat", "floating dtype among float32, float64"),
    "heat-float16-on-cpu": (with_dtype("heat", np.float16), TypeError, "heat", "got float16"),
    "wh-dtype": (with_dtype("wh", np.float32), TypeError, "wh", "expected dtype float64 like heat, got float32"),
    "reg-on-gpu": (gpu_array("reg"), TypeError, "reg", "expected a numpy array like heat, got a cupy array"),
    "heat-rank": (reshaped("heat", (2, 3, 4)), ValueError, "heat", "expected a 4-d array"),
    "heat-no-class": (reshaped("heat", (2, 0, 4, 5)), ValueError, "heat", "at least one class"),
    "heat-empty-map": (reshaped("heat", (2, 3, 0, 5)), ValueError, "heat", "1x1 pixels"),
    "wh-channels": (reshaped("wh", (2, 6, 4, 5)), ValueError, "wh", r"expected shape \(2, 2, 4, 5\)"),
    "wh-not-class-specific": (setter(cat_spec_wh=True), ValueError, "wh", r"expected shape \(2, 6, 4, 5\)"),
    "wh-size": (reshaped("wh", (2, 2, 5, 4)), ValueError, "wh", r"got \(2, 2, 5, 4\)"),
    "reg-batch": (reshaped("reg", (1, 2, 4, 5)), ValueError, "reg", r"expected shape \(2, 2, 4, 5\)"),
    "K-negative": (setter(K=-1), ValueError, "K", "expected an int >= 0, got -1"),
    "K-float": (setter(K=5.0), TypeError, "K", "expected an int, got 5.0"),
    "K-bool": (setter(K=True), TypeError, "K", "expected an int, got True"),
    "kernel-even": (setter(kernel=2), ValueError, "kernel", "odd window size, got 2"),
    "kernel-zero": (setter(kernel=0), ValueError, "kernel", "expected an int >= 1, got 0"),
    "kernel-float": (setter(kernel=3.0), TypeError, "kernel", "expected an int"),
    "cat_spec_wh-str": (setter(cat_spec_wh="yes"), TypeError, "cat_spec_wh", "expected a bool, got 'yes'"),
    "down_ratio-zero": (setter(down_ratio=0), ValueError, "down_ratio", "finite positive number, got 0"),
    "down_ratio-nan": (setter(down_ratio=float("nan")), ValueError, "down_ratio", "finite positive"),
    "down_ratio-str": (setter(down_ratio="4"), TypeError, "down_ratio", "expected a number"),
    "threshold-nan": (setter(threshold=float("nan")), ValueError, "threshold", "finite number, got nan"),
    "threshold-str": (setter(threshold="0.5"), TypeError, "threshold", "expected a number"),
    "backend-unknown": (setter(backend="torch"), ValueError, "backend", "got 'torch'"),
    "backend-cupy-on-numpy": (setter(backend="cupy"), ValueError, "backend", "CuPy arrays only"),
}

TARGETS_RULES = {
    "boxes-none": (setter(boxes=None), TypeError, "boxes", "expected an array, got None"),
    "labels-none": (setter(labels=None), TypeError, "labels", "expected an array, got None"),
    "boxes-list": (setter(boxes=[[[0, 0, 1, 1]]]), TypeError, "boxes", "NumPy or CuPy array"),
    "boxes-int": (with_dtype("boxes", np.int64), TypeError, "boxes", "float32 or float64, got int64"),
    "boxes-float16": (with_dtype("boxes", np.float16), TypeError, "boxes", "got float16"),
    "boxes-columns": (reshaped("boxes", (2, 2, 5)), ValueError, "boxes", r"\[B, M, 4\], got \(2, 2, 5\)"),
    "labels-float": (with_dtype("labels", np.float64), TypeError, "labels", "integer dtype, got float64"),
    "labels-rank": (setter(labels=np.zeros(4, np.int64)), ValueError, "labels", r"2-d array \[B, M\]"),
    "labels-shape": (setter(labels=np.zeros((2, 3), np.int64)), ValueError, "labels",
                     r"expected shape \(2, 2\), got \(2, 3\)"),
    "labels-on-gpu": (gpu_array("labels"), TypeError, "labels", "numpy array like boxes, got a cupy array"),
    "label-too-large": (label_at(1, 0, 3), ValueError, "labels / boxes", r"object \[1, 0\] has label 3.*\[-1, 3\)"),
    "label-below-padding": (label_at(0, 1, -2), ValueError, "labels / boxes", "label -2"),
    "label-uint64-huge": (lambda a: a.update(labels=np.array([[0, 2**64 - 1], [1, 0]], dtype=np.uint64)), ValueError,
                          "labels / boxes", r"object \[0, 1\] has label"),
    "box-not-finite": (box_at(0, 1, np.inf), ValueError, "labels / boxes", r"object \[0, 1\].*finite coordinates"),
    "num_classes-zero": (setter(num_classes=0), ValueError, "num_classes", "expected an int >= 1, got 0"),
    "num_classes-float": (setter(num_classes=3.0), TypeError, "num_classes", "expected an int"),
    "output_size-zero": (setter(output_size=(8, 0)), ValueError, "output_size", "positive values"),
    "output_size-triple": (setter(output_size=(8, 8, 8)), TypeError, "output_size", "int or a pair of ints"),
    "down_ratio-negative": (setter(down_ratio=-4), ValueError, "down_ratio", "finite positive number, got -4"),
    "min_overlap-one": (setter(min_overlap=1.0), ValueError, "min_overlap", r"in \(0, 1\), got 1.0"),
    "min_overlap-zero": (setter(min_overlap=0), ValueError, "min_overlap", r"in \(0, 1\), got 0"),
    "min_overlap-nan": (setter(min_overlap=float("nan")), ValueError, "min_overlap", "finite number"),
    "max_objects-zero": (setter(max_objects=0), ValueError, "max_objects", "expected an int >= 1, got 0"),
    "backend-unknown": (setter(backend="jax"), ValueError, "backend", "got 'jax'"),
}

FOCAL_RULES = {
    "pred-none": (setter(pred=None), TypeError, "pred", "expected an array, got None"),
    "target-none": (setter(target=None), TypeError, "target", "expected an array, got None"),
    "pred-int": (with_dtype("pred", np.int32), TypeError, "pred", "floating dtype"),
    "target-dtype": (with_dtype("target", np.float32), TypeError, "target", "float64 like pred, got float32"),
    "target-on-gpu": (gpu_array("target"), TypeError, "target", "numpy array like pred"),
    "pred-rank": (reshaped("pred", (2, 3, 3)), ValueError, "pred", "expected a 4-d array"),
    "target-shape": (reshaped("target", (1, 2, 3, 4)), ValueError, "target", r"expected shape \(1, 2, 3, 3\)"),
    "target-nan": (target_at((0, 1, 2, 0), np.nan), ValueError, "target",
                   r"element \[0, 1, 2, 0\] is nan; expected values in \[0, 1\]"),
    "target-above-1": (target_at((0, 0, 1, 1), 1.5), ValueError, "target", r"\[0, 0, 1, 1\] is 1.5"),
    "target-inf": (target_at((0, 1, 0, 2), np.inf), ValueError, "target", r"\[0, 1, 0, 2\] is inf"),
    "target-negative": (target_at((0, 0, 0, 0), -0.25), ValueError, "target", r"\[0, 0, 0, 0\] is -0.25"),
    "alpha-negative": (setter(alpha=-1), ValueError, "alpha", "finite number >= 0, got -1.0"),
    "alpha-str": (setter(alpha="2"), TypeError, "alpha", "expected a number"),
    "beta-inf": (setter(beta=float("inf")), ValueError, "beta", "finite number, got inf"),
    "backend-cupy-on-numpy": (setter(backend="cupy"), ValueError, "backend", "CuPy arrays only"),
}

BACKWARD_RULES = {
    "grad_output-none": (setter(grad_output=None), TypeError, "grad_output", "expected an array, got None"),
    "grad_output-shape": (setter(grad_output=np.ones(2)), ValueError, "grad_output", r"\(\) or \(1,\), got \(2,\)"),
    "grad_output-dtype": (with_dtype("grad_output", np.float32), TypeError, "grad_output", "float64 like pred"),
    "grad_output-bool": (setter(grad_output=True), TypeError, "grad_output", "NumPy or CuPy array, got builtins.bool"),
    "grad_output-string": (setter(grad_output="1"), TypeError, "grad_output", "NumPy or CuPy array, got builtins.str"),
}


def check_rule(call, arguments, change, error, name, expected):
    change(arguments)
    with pytest.raises(error) as raised:
        call(**arguments)
    message = str(raised.value)
    assert message.startswith(f"{name}:"), message
    assert re.search(expected, message), f"{expected!r} not in {message!r}"


@pytest.mark.parametrize("rule", DECODE_RULES.values(), ids=DECODE_RULES.keys())
def test_decode_rejects(rule):
    check_rule(pydeform.centernet_decode, decode_arguments(), *rule)


@pytest.mark.parametrize("rule", TARGETS_RULES.values(), ids=TARGETS_RULES.keys())
def test_targets_reject(rule):
    check_rule(pydeform.centernet_targets, targets_arguments(), *rule)


def without_grad_output(arguments):
    del arguments["grad_output"]
    return arguments


@pytest.mark.parametrize("rule", FOCAL_RULES.values(), ids=FOCAL_RULES.keys())
def test_focal_loss_rejects(rule):
    check_rule(pydeform.centernet_focal_loss, without_grad_output(focal_arguments()), *rule)


@pytest.mark.parametrize("rule", {**FOCAL_RULES, **BACKWARD_RULES}.values(),
                         ids={**FOCAL_RULES, **BACKWARD_RULES}.keys())
def test_focal_loss_backward_rejects(rule):
    check_rule(pydeform.centernet_focal_loss_backward, focal_arguments(), *rule)


def test_the_valid_arguments_pass():
    assert pydeform.centernet_decode(**decode_arguments()).shape == (2, 5, 6)
    assert pydeform.centernet_targets(**targets_arguments()).heatmap.shape == (2, 3, 8, 8)
    assert pydeform.centernet_focal_loss(**without_grad_output(focal_arguments())).shape == ()
    assert pydeform.centernet_focal_loss_backward(**focal_arguments()).shape == (1, 2, 3, 3)


def test_padding_rows_may_hold_anything():
    arguments = targets_arguments()
    arguments["boxes"][1, 1] = (np.nan, np.inf, -np.inf, np.nan)  # label -1
    got = pydeform.centernet_targets(**arguments)
    assert got.reg_mask[1, 1] == 0 and np.isfinite(got.heatmap).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("grad_output", [2.0, 2, np.float32(2.0), np.float64(2.0), np.int64(2)],
                         ids=["float", "int", "numpy-float32", "numpy-float64", "numpy-int64"])
def test_focal_loss_backward_takes_a_number_as_the_loss_gradient(grad_output, dtype):
    """The loss is a scalar: its gradient may be a Python or NumPy number, taken in pred's dtype."""
    arguments = {name: value.astype(dtype) for name, value in focal_arguments().items()}
    expected = pydeform.centernet_focal_loss_backward(**{**arguments, "grad_output": np.array(2.0, dtype)})
    got = pydeform.centernet_focal_loss_backward(**{**arguments, "grad_output": grad_output})
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)
