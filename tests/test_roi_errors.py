"""Argument checks of the RoI ops (pydeform/roi.py, pydeform/_rois.py): one case per rule and
op, forward and backward, each raising the right exception type with a message that starts
with the argument's name and shows what was expected and what was received."""

from __future__ import annotations

import re
from unittest import mock

import numpy as np
import pytest

from pydeform import roi
from tests.test_deform_conv_errors import CupyLikeArray, reshaped, setter, with_dtype

OPS = ("roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool", "deform_roi_pool", "deform_psroi_pool")
POSITION_SENSITIVE = ("ps_roi_align", "ps_roi_pool", "deform_psroi_pool")
WITH_OUTPUT_SIZE = OPS[:5]

# A valid problem: N=2, C=8, a 6x5 image, K=3 rois, 2x2 bins (C_out = 2 for the
# position-sensitive ops, deform_psroi_pool with group_size 2).
ROIS = np.array([[0, 0.5, 1.0, 3.5, 4.0], [1, -1.0, 2.0, 6.0, 5.5], [1, 2.0, 2.0, 2.0, 2.0]])
OPTIONS = {
    "roi_align": dict(output_size=(2, 2), spatial_scale=0.5, sampling_ratio=2, aligned=False, mode="max"),
    "ps_roi_align": dict(output_size=(2, 2), spatial_scale=0.5, sampling_ratio=2),
    "roi_pool": dict(output_size=(2, 2), spatial_scale=0.5),
    "ps_roi_pool": dict(output_size=(2, 2), spatial_scale=0.5),
    "deform_roi_pool": dict(output_size=(2, 2), spatial_scale=0.5, sampling_ratio=0, gamma=0.1),
    "deform_psroi_pool": dict(output_dim=2, group_size=2, pooled_size=2, part_size=2, sample_per_part=2,
                              trans_std=0.1, spatial_scale=0.5),
}
ARRAY_SHAPES = {
    "deform_roi_pool": {"offset": (3, 2, 2, 2), "mask": (3, 1, 2, 2)},
    "deform_psroi_pool": {"trans": (3, 2, 2, 2)},
}


def output_channels(op):
    return 2 if op in POSITION_SENSITIVE else 8


def valid_arguments(op) -> dict:
    rng = np.random.default_rng(0)
    arguments = {"input": rng.standard_normal((2, 8, 6, 5)), "rois": ROIS.copy(), **OPTIONS[op]}
    arguments.update((name, rng.standard_normal(shape)) for name, shape in ARRAY_SHAPES.get(op, {}).items())
    arguments["grad_output"] = rng.standard_normal((3, output_channels(op), 2, 2))
    return arguments


def roi_value(row, column, value):
    def change(arguments):
        arguments["rois"][row, column] = value

    return change


def as_list(boxes):
    """rois given as per-image boxes: ``boxes(arguments)`` returns the list."""

    def change(arguments):
        arguments["rois"] = boxes(arguments)

    return change


def on_fake_gpu(name):
    def change(arguments):
        arguments[name] = CupyLikeArray(arguments[name])

    return change


#: Rules every op has: (id, change to the valid arguments, exception, argument named, fragments).
RULES = [
    ("input-none", setter(input=None), TypeError, "input", ["None"]),
    ("input-list", lambda a: a.update(input=a["input"].tolist()), TypeError, "input", ["NumPy or CuPy array", "list"]),
    ("input-int32", with_dtype("input", np.int32), TypeError, "input", ["float32, float64", "int32"]),
    ("input-float16-cpu", with_dtype("input", np.float16), TypeError, "input", ["CPU", "float16"]),
    ("input-rank", reshaped("input", (8, 6, 5)), ValueError, "input", ["4-d", "3-d", "(8, 6, 5)"]),
    ("input-empty-image", reshaped("input", (2, 8, 0, 5)), ValueError, "input", ["1x1", "(2, 8, 0, 5)"]),
    ("rois-none", setter(rois=None), TypeError, "rois", ["NumPy or CuPy array", "NoneType"]),
    ("rois-four-columns", reshaped("rois", (3, 4)), ValueError, "rois", ["[K, 5]", "(3, 4)"]),
    ("rois-rank", reshaped("rois", (15,)), ValueError, "rois", ["[K, 5]", "(15,)"]),
    ("rois-int", with_dtype("rois", np.int64), TypeError, "rois", ["float64", "int64"]),
    ("rois-float32-mixed", with_dtype("rois", np.float32), TypeError, "rois", ["float64", "float32"]),
    ("rois-fractional-index", roi_value(1, 0, 0.5), ValueError, "rois", ["row 1", "0.5", "integer batch index", "[0, 2)"]),
    ("rois-negative-index", roi_value(2, 0, -1.0), ValueError, "rois", ["row 2", "-1.0", "[0, 2)"]),
    ("rois-index-past-batch", roi_value(0, 0, 2.0), ValueError, "rois", ["row 0", "2.0", "[0, 2)"]),
    ("rois-nan-index", roi_value(1, 0, np.nan), ValueError, "rois", ["row 1", "nan", "[0, 2)"]),
    ("rois-inf-coordinate", roi_value(2, 3, np.inf), ValueError, "rois", ["row 2", "inf", "finite"]),
    ("rois-nan-coordinate", roi_value(0, 2, np.nan), ValueError, "rois", ["row 0", "nan", "finite"]),
    ("rois-list-five-columns", as_list(lambda a: [a["rois"][:1], a["rois"][1:]]), ValueError, "rois[0]",
     ["[K, 4]", "(1, 5)"]),
    ("rois-list-rank", as_list(lambda a: [a["rois"][0, 1:], a["rois"][1:, 1:]]), ValueError, "rois[0]",
     ["[K, 4]", "(4,)"]),
    ("rois-list-int", as_list(lambda a: [np.zeros((1, 4), np.int32)]), TypeError, "rois[0]", ["float64", "int32"]),
    ("rois-ragged-rows", setter(rois=[[0, 0.5, 1.0, 3.5, 4.0], [1, 2.0, 2.0]]), TypeError, "rois",
     ["list of rows of numbers of one length", "[1, 2.0, 2.0]"]),
    ("rois-rows-of-four", setter(rois=[[0.5, 1.0, 3.5, 4.0]]), ValueError, "rois", ["[K, 5]", "(1, 4)"]),
    ("rois-rows-bad-index", setter(rois=[[2, 0.5, 1.0, 3.5, 4.0]]), ValueError, "rois", ["row 0", "[0, 2)"]),
    ("rois-list-of-strings", as_list(lambda a: [[["0", "1", "2", "3"]]]), TypeError, "rois[0]",
     ["list of rows of numbers", "'0'"]),
    ("rois-list-gpu-entry", as_list(lambda a: [a["rois"][:1, 1:], CupyLikeArray(a["rois"][1:, 1:])]), TypeError,
     "rois[1]", ["numpy", "cupy"]),
    ("rois-gpu-with-cpu-input", on_fake_gpu("rois"), TypeError, "rois", ["numpy", "cupy"]),
    ("spatial-scale-zero", setter(spatial_scale=0.0), ValueError, "spatial_scale", ["finite positive", "0.0"]),
    ("spatial-scale-negative", setter(spatial_scale=-0.5), ValueError, "spatial_scale", ["finite positive", "-0.5"]),
    ("spatial-scale-inf", setter(spatial_scale=np.inf), ValueError, "spatial_scale", ["finite positive", "inf"]),
    ("spatial-scale-string", setter(spatial_scale="1/16"), TypeError, "spatial_scale", ["number", "'1/16'"]),
    ("spatial-scale-bool", setter(spatial_scale=True), TypeError, "spatial_scale", ["number", "True"]),
    ("backend-unknown", setter(backend="torch"), ValueError, "backend", ["'cupy'", "'numba'", "'torch'"]),
    ("backend-cupy-numpy", setter(backend="cupy"), ValueError, "backend", ["CuPy arrays", "NumPy arrays"]),
]

OUTPUT_SIZE_RULES = [
    ("output-size-zero", setter(output_size=0), ValueError, "output_size", ["positive", "0"]),
    ("output-size-zero-width", setter(output_size=(2, 0)), ValueError, "output_size", ["positive", "(2, 0)"]),
    ("output-size-float", setter(output_size=1.5), TypeError, "output_size", ["int or a pair of ints", "1.5"]),
    ("output-size-three", setter(output_size=(1, 2, 3)), TypeError, "output_size", ["pair", "(1, 2, 3)"]),
    ("output-size-bool", setter(output_size=True), TypeError, "output_size", ["int or a pair of ints", "True"]),
    ("output-size-none", setter(output_size=None), TypeError, "output_size", ["int or a pair of ints", "None"]),
]

POSITION_SENSITIVE_RULES = {
    "ps_roi_align": [("channels-not-bins-multiple", reshaped("input", (2, 6, 6, 5)), ValueError, "input",
                      ["divisible", "2x2 = 4", "6 channels"])],
    "ps_roi_pool": [("channels-not-bins-multiple", reshaped("input", (2, 6, 6, 5)), ValueError, "input",
                     ["divisible", "2x2 = 4", "6 channels"])],
}

OP_RULES = {
    "roi_align": [
        ("mode-unknown", setter(mode="sum"), ValueError, "mode", ["'avg' or 'max'", "'sum'"]),
        ("aligned-int", setter(aligned=1), TypeError, "aligned", ["bool", "1"]),
        ("sampling-ratio-float", setter(sampling_ratio=1.5), TypeError, "sampling_ratio", ["int", "1.5"]),
        ("sampling-ratio-bool", setter(sampling_ratio=True), TypeError, "sampling_ratio", ["int", "True"]),
        ("sampling-ratio-too-many", setter(sampling_ratio=10**5), ValueError, "sampling_ratio",
         ["at most 1024 samples", "100000"]),
    ],
    "ps_roi_align": [
        ("sampling-ratio-float", setter(sampling_ratio=2.0), TypeError, "sampling_ratio", ["int", "2.0"]),
        ("sampling-ratio-too-many", setter(sampling_ratio=1025), ValueError, "sampling_ratio",
         ["at most 1024 samples", "1025"]),
    ],
    "deform_roi_pool": [
        ("offset-bins", reshaped("offset", (3, 2, 2, 3)), ValueError, "offset", ["(3, 2, 2, 2)", "(3, 2, 2, 3)"]),
        ("offset-rois", reshaped("offset", (2, 2, 2, 2)), ValueError, "offset", ["(3, 2, 2, 2)", "(2, 2, 2, 2)"]),
        ("offset-channels", reshaped("offset", (3, 1, 2, 2)), ValueError, "offset", ["(3, 2, 2, 2)", "(3, 1, 2, 2)"]),
        ("offset-rank", reshaped("offset", (3, 2, 4)), ValueError, "offset", ["4-d", "3-d"]),
        ("offset-float32", with_dtype("offset", np.float32), TypeError, "offset", ["float64", "float32"]),
        ("offset-int", with_dtype("offset", np.int64), TypeError, "offset", ["float32, float64", "int64"]),
        ("offset-gpu", on_fake_gpu("offset"), TypeError, "offset", ["numpy", "cupy"]),
        ("mask-channels", reshaped("mask", (3, 2, 2, 2)), ValueError, "mask", ["(3, 1, 2, 2)", "(3, 2, 2, 2)"]),
        ("mask-rois", reshaped("mask", (4, 1, 2, 2)), ValueError, "mask", ["(3, 1, 2, 2)", "(4, 1, 2, 2)"]),
        ("mask-rank", reshaped("mask", (3, 2, 2)), ValueError, "mask", ["4-d", "3-d"]),
        ("mask-float32", with_dtype("mask", np.float32), TypeError, "mask", ["float64", "float32"]),
        ("gamma-string", setter(gamma="0.1"), TypeError, "gamma", ["number", "'0.1'"]),
        ("gamma-nan", setter(gamma=np.nan), ValueError, "gamma", ["finite", "nan"]),
        ("sampling-ratio-float", setter(sampling_ratio=0.0), TypeError, "sampling_ratio", ["int", "0.0"]),
        ("sampling-ratio-too-many", setter(sampling_ratio=1025), ValueError, "sampling_ratio",
         ["at most 1024 samples", "1025"]),
    ],
    "deform_psroi_pool": [
        ("trans-odd-channels", reshaped("trans", (3, 3, 2, 2)), ValueError, "trans",
         ["2*num_classes", "(3, 3, 2, 2)"]),
        ("trans-no-channels", reshaped("trans", (3, 0, 2, 2)), ValueError, "trans", ["2*num_classes", "(3, 0, 2, 2)"]),
        ("trans-classes-not-dividing-output-dim", reshaped("trans", (3, 6, 2, 2)), ValueError, "trans",
         ["output_dim = 2", "(3, 6, 2, 2)"]),
        ("trans-part-size", reshaped("trans", (3, 2, 3, 3)), ValueError, "trans", ["(3, 2, 2, 2)", "(3, 2, 3, 3)"]),
        ("trans-rois", reshaped("trans", (2, 2, 2, 2)), ValueError, "trans", ["(3, 2, 2, 2)", "(2, 2, 2, 2)"]),
        ("trans-rank", reshaped("trans", (3, 2, 4)), ValueError, "trans", ["4-d", "3-d"]),
        ("trans-float32", with_dtype("trans", np.float32), TypeError, "trans", ["float64", "float32"]),
        ("trans-gpu", on_fake_gpu("trans"), TypeError, "trans", ["numpy", "cupy"]),
        ("channels-not-output-dim-groups", setter(output_dim=3), ValueError, "input",
         ["output_dim * group_size^2 = 12", "got 8"]),
        ("channels-not-groups-multiple", setter(output_dim=None, group_size=3), ValueError, "input",
         ["output_dim * 9", "8"]),
        ("output-dim-zero", setter(output_dim=0), ValueError, "output_dim", [">= 1", "0"]),
        ("output-dim-float", setter(output_dim=2.0), TypeError, "output_dim", ["int", "2.0"]),
        ("group-size-zero", setter(group_size=0), ValueError, "group_size", [">= 1", "0"]),
        ("group-size-float", setter(group_size=1.5), TypeError, "group_size", ["int", "1.5"]),
        ("pooled-size-zero", setter(pooled_size=0), ValueError, "pooled_size", [">= 1", "0"]),
        ("pooled-size-bool", setter(pooled_size=True), TypeError, "pooled_size", ["int", "True"]),
        ("part-size-negative", setter(part_size=-1), ValueError, "part_size", [">= 1", "-1"]),
        ("sample-per-part-zero", setter(sample_per_part=0), ValueError, "sample_per_part", [">= 1", "0"]),
        ("sample-per-part-too-many", setter(sample_per_part=10**5), ValueError, "sample_per_part",
         ["at most 1024 samples", "100000"]),
        ("trans-std-string", setter(trans_std="0.1"), TypeError, "trans_std", ["number", "'0.1'"]),
        ("trans-std-inf", setter(trans_std=np.inf), ValueError, "trans_std", ["finite", "inf"]),
    ],
}

def backward_rules(op) -> list:
    """Rules of grad_output, whose shape is [K, C_out, PH, PW] = (3, C_out, 2, 2)."""
    c = output_channels(op)
    expected = f"(3, {c}, 2, 2)"
    return [
        ("grad-output-none", setter(grad_output=None), TypeError, "grad_output", ["None"]),
        ("grad-output-list", lambda a: a.update(grad_output=a["grad_output"].tolist()), TypeError, "grad_output",
         ["NumPy or CuPy array", "list"]),
        ("grad-output-int", with_dtype("grad_output", np.int64), TypeError, "grad_output",
         ["float32, float64", "int64"]),
        ("grad-output-float32", with_dtype("grad_output", np.float32), TypeError, "grad_output",
         ["float64", "float32"]),
        ("grad-output-rank", reshaped("grad_output", (3, c, 4)), ValueError, "grad_output", ["4-d", "3-d"]),
        ("grad-output-rois", reshaped("grad_output", (2, c, 2, 2)), ValueError, "grad_output",
         [expected, f"(2, {c}, 2, 2)"]),
        ("grad-output-channels", reshaped("grad_output", (3, 5, 2, 2)), ValueError, "grad_output",
         [expected, "(3, 5, 2, 2)"]),
        ("grad-output-bins", reshaped("grad_output", (3, c, 2, 3)), ValueError, "grad_output",
         [expected, f"(3, {c}, 2, 3)"]),
        ("deterministic-int", setter(deterministic=1), TypeError, "deterministic", ["bool", "1"]),
    ]


def forward(op, arguments):
    arguments.pop("grad_output")
    return getattr(roi, op)(**arguments)


def backward(op, arguments):
    return getattr(roi, op + "_backward")(**arguments)


def check_rule(call, op, change, exception, name, fragments):
    arguments = valid_arguments(op)
    change(arguments)
    with pytest.raises(exception) as raised:
        call(op, arguments)
    message = str(raised.value)
    assert re.match(rf"{re.escape(name)}: ", message), f"message does not start with '{name}: ': {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def cases(rules_by_op: dict) -> list:
    """pytest params (op, change, exception, name, fragments) with ids op-rule."""
    return [pytest.param(op, *rule[1:], id=f"{op}-{rule[0]}") for op, rules in rules_by_op.items() for rule in rules]


ALL_RULES = cases({op: RULES + (OUTPUT_SIZE_RULES if op in WITH_OUTPUT_SIZE else []) + POSITION_SENSITIVE_RULES.get(
    op, []) + OP_RULES.get(op, []) for op in OPS})


class AcceptingKernels:
    """A kernel set that does nothing: the baseline must pass every check without running a kernel."""

    xp = np

    def __getattr__(self, method):
        return lambda *args: None


@pytest.mark.parametrize("op", OPS)
def test_valid_arguments_pass(op):
    """The baseline every rule changes is itself accepted (so each rule's error is its own)."""
    with mock.patch.object(roi, "roi_kernels", lambda library, backend: AcceptingKernels()):
        assert forward(op, valid_arguments(op)).shape == (3, output_channels(op), 2, 2)
        assert backward(op, valid_arguments(op)).input.shape == (2, 8, 6, 5)


@pytest.mark.parametrize("call", [forward, backward])
@pytest.mark.parametrize("op, change, exception, name, fragments", ALL_RULES)
def test_rule(call, op, change, exception, name, fragments):
    check_rule(call, op, change, exception, name, fragments)


@pytest.mark.parametrize("op, change, exception, name, fragments", cases({op: backward_rules(op) for op in OPS}))
def test_backward_rule(op, change, exception, name, fragments):
    check_rule(backward, op, change, exception, name, fragments)


class RecordingKernels(AcceptingKernels):
    """Records the ``[K, 5]`` boxes a forward kernel gets (its second argument)."""

    def __getattr__(self, method):
        def record(input, rois, *rest):
            self.rois = rois

        return record


def kernel_rois(op, rois):
    """The boxes the forward of ``op`` hands its kernels for the valid arguments with ``rois``."""
    kernels = RecordingKernels()
    arguments = valid_arguments(op)
    arguments["rois"] = rois
    with mock.patch.object(roi, "roi_kernels", lambda library, backend: kernels):
        forward(op, arguments)
    return kernels.rois


@pytest.mark.parametrize("op", OPS)
def test_boxes_as_lists_of_numbers(op):
    """[K, 5] rows and per-image [L_i, 4] boxes may be given as Python lists: the same boxes reach
    the kernels, in the accumulation dtype."""
    expected = kernel_rois(op, ROIS)
    per_image = [ROIS[ROIS[:, 0] == i, 1:].tolist() for i in range(2)]
    for rois in (ROIS.tolist(), tuple(map(tuple, ROIS.tolist())), per_image, [np.asarray(per_image[0]), per_image[1]]):
        got = kernel_rois(op, rois)
        assert got.dtype == np.float64 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected)


def test_an_image_without_boxes_as_an_empty_list():
    arguments = valid_arguments("roi_align")
    arguments.pop("grad_output")
    arguments["input"] = arguments["input"].astype(np.float32)
    kernels = RecordingKernels()
    with mock.patch.object(roi, "roi_kernels", lambda library, backend: kernels):
        out = roi.roi_align(**{**arguments, "rois": [[], [[2.0, 2.0, 2.0, 2.0]]]})
    assert out.shape == (1, 8, 2, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(kernels.rois, np.array([[1, 2.0, 2.0, 2.0, 2.0]], np.float32))
    assert kernels.rois.dtype == np.float32
