"""Hypothesis strategies for deform_conv2d problems, and how a result is judged against the
float64 reference. Every drawn geometry is valid by construction (no ``assume``), so each
example is a real test.

A case's arrays are NumPy arrays of the requested dtype; the reference is always run on those
same (already rounded) values in float64, so the only difference a backend may show is its own
arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from hypothesis import strategies as st

import reference

ARRAY_NAMES = ("input", "offset", "weight", "bias", "mask")

#: Largest error allowed against the float64 reference, relative to the array's scale
#: (``max(1, max |reference|)``), by dtype name.
TOLERANCES = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}

HALF_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class DeformConvCase:
    """One deform_conv2d problem: arrays (NumPy, one dtype) and parameters.

    ``stride`` / ``padding`` / ``dilation`` are an int or an ``(h, w)`` pair, as a caller would
    pass them; ``bias``, ``mask`` are None when absent and ``grad_output`` is None for forward
    cases. ``groups`` / ``offset_groups`` are what the shapes imply.
    """

    input: np.ndarray
    offset: np.ndarray
    weight: np.ndarray
    bias: Optional[np.ndarray]
    mask: Optional[np.ndarray]
    grad_output: Optional[np.ndarray]
    stride: object
    padding: object
    dilation: object
    groups: int
    offset_groups: int

    @property
    def output_shape(self) -> tuple:
        return (self.input.shape[0], self.weight.shape[0]) + tuple(self.offset.shape[2:])

    def options(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def arguments(self) -> dict:
        """Keyword arguments of ``deform_conv2d`` (arrays and options, no backend)."""
        return {**{name: getattr(self, name) for name in ARRAY_NAMES}, **self.options()}

    def map_arrays(self, convert: Callable) -> "DeformConvCase":
        """The same case with every present array replaced by ``convert(array)`` (e.g. a move
        to the GPU or a non-contiguous view)."""
        names = ARRAY_NAMES + ("grad_output",)
        return dataclasses.replace(
            self, **{n: convert(getattr(self, n)) for n in names if getattr(self, n) is not None}
        )

    def reference_forward(self) -> np.ndarray:
        return reference.deform_conv2d(**self.arguments())

    def reference_backward(self) -> dict:
        return reference.deform_conv2d_backward(self.grad_output, **self.arguments())


def _pair(value) -> tuple:
    return (value, value) if isinstance(value, int) else tuple(value)


def _sample_positions(rng, shape, size, with_grad, dtype_name):
    """Sampling positions along one axis (in input pixels), a fair share outside
    ``(-1, size)``.

    Gradient cases: an integer in [-3, size + 1] plus a fraction in [0.05, 0.95] (multiples of
    1/8 for half types, so the fraction survives rounding to the dtype). Forward cases: uniform
    in [-3, size + 2], about a fifth rounded to integers (corners, borders at -1 and size) and
    a few far away.
    """
    whole = rng.integers(-3, size + 2, shape).astype(np.float64)
    if with_grad:
        if dtype_name in HALF_DTYPES:
            return whole + rng.integers(1, 8, shape) / 8.0
        return whole + rng.uniform(0.05, 0.95, shape)
    positions = rng.uniform(-3.0, size + 2.0, shape)
    positions = np.where(rng.random(shape) < 0.2, whole, positions)
    return np.where(rng.random(shape) < 0.05, rng.choice([-1.0, 1.0], shape) * (size + 50.5), positions)


def build_case(
    rng, *, n, channels, out_channels, size, kernel, groups=1, offset_groups=1, stride=1, padding=0,
    dilation=1, with_mask=True, with_bias=True, dtype=np.float64, with_grad=True,
) -> DeformConvCase:
    """A case with the given geometry (``size`` = (H, W), ``kernel`` = (kh, kw); options an int
    or a pair, kept as given) and random arrays from ``rng``: standard normal input / weight /
    bias / grad_output, mask uniform in [-0.5, 1.5], offsets as :func:`_sample_positions`
    (``with_grad``: every sample an integer plus a fraction in [0.05, 0.95])."""
    dtype = np.dtype(dtype)
    (height, width), (kernel_h, kernel_w) = size, kernel
    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = map(_pair, (stride, padding, dilation))
    out_h = (height + 2 * pad_h - (dil_h * (kernel_h - 1) + 1)) // stride_h + 1
    out_w = (width + 2 * pad_w - (dil_w * (kernel_w - 1) + 1)) // stride_w + 1
    assert out_h > 0 and out_w > 0, "build_case: the geometry gives an empty output"
    points = kernel_h * kernel_w
    kernel_i, kernel_j = np.divmod(np.arange(points), kernel_w)
    # Where each kernel point samples with a zero offset: [K, Ho, Wo].
    grid_h = (kernel_i * dil_h)[:, None, None] + (np.arange(out_h) * stride_h - pad_h)[None, :, None]
    grid_w = (kernel_j * dil_w)[:, None, None] + (np.arange(out_w) * stride_w - pad_w)[None, None, :]
    per_axis = (n, offset_groups, points, out_h, out_w)
    offset_h = _sample_positions(rng, per_axis, height, with_grad, dtype.name) - grid_h
    offset_w = _sample_positions(rng, per_axis, width, with_grad, dtype.name) - grid_w
    offset = np.stack([offset_h, offset_w], axis=3).reshape(n, 2 * offset_groups * points, out_h, out_w)

    def cast(array):
        return None if array is None else np.ascontiguousarray(array.astype(dtype))

    mask = rng.uniform(-0.5, 1.5, (n, offset_groups * points, out_h, out_w)) if with_mask else None
    bias = rng.standard_normal(out_channels) if with_bias else None
    grad_output = rng.standard_normal((n, out_channels, out_h, out_w)) if with_grad else None
    case = DeformConvCase(
        input=cast(rng.standard_normal((n, channels, height, width))),
        offset=cast(offset),
        weight=cast(rng.standard_normal((out_channels, channels // groups, kernel_h, kernel_w))),
        bias=cast(bias),
        mask=cast(mask),
        grad_output=cast(grad_output),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        offset_groups=offset_groups,
    )
    if with_grad:
        fractions = case.offset.astype(np.float64) % 1.0
        assert fractions.size == 0 or (fractions.min() > 0.04 and fractions.max() < 0.96), (
            "a gradient case's sample position came within 0.04 of an integer in its dtype"
        )
    return case


def _axis(draw):
    """Draw one spatial axis: (input size, kernel, stride, padding, dilation), with the input
    size derived from a drawn output size (1..4) so that the output is never empty."""
    out = draw(st.integers(1, 4))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    spare = draw(st.integers(0, stride - 1))  # input rows the last stride step leaves unused
    span = dilation * (kernel - 1) + 1
    unpadded = (out - 1) * stride + span + spare  # = size + 2 * padding
    padding = draw(st.integers(0, min(2, (unpadded - 1) // 2)))
    return unpadded - 2 * padding, kernel, stride, padding, dilation


def _option(draw, values: tuple):
    """An equal pair is sometimes passed as a plain int, as callers do."""
    if values[0] == values[1] and draw(st.booleans()):
        return values[0]
    return values


@st.composite
def deform_conv_cases(draw, dtype=np.float64, with_grad=False, max_batch=3, min_batch=0):
    """A valid deform_conv2d problem of ``dtype`` (a NumPy or ml_dtypes dtype).

    Batch min_batch..max_batch, weight groups G and offset groups Goff in 1..3 with the channel count a
    multiple of both, C_out a multiple of G, kernels 1..3 per axis (1x1 and non-square
    included), per-axis stride 1..3, padding 0..2, dilation 1..2, output 1..4 per axis; mask and
    bias present or not. Offsets send samples inside, across the border and far outside the
    image. ``with_grad`` adds ``grad_output`` and keeps every sample position an integer plus a
    fraction in [0.05, 0.95], away from the kinks of bilinear sampling.
    """
    n = draw(st.integers(min_batch, max_batch))
    groups = draw(st.integers(1, 3))
    offset_groups = draw(st.integers(1, 3))
    channels = math.lcm(groups, offset_groups) * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 2))
    axes = list(zip(_axis(draw), _axis(draw)))  # (size, kernel, stride, padding, dilation) pairs
    return build_case(
        np.random.default_rng(draw(st.integers(0, 2**32 - 1))),
        n=n, channels=channels, out_channels=out_channels, groups=groups, offset_groups=offset_groups,
        size=axes[0], kernel=axes[1], stride=_option(draw, axes[2]), padding=_option(draw, axes[3]),
        dilation=_option(draw, axes[4]), with_mask=draw(st.booleans()), with_bias=draw(st.booleans()),
        dtype=dtype, with_grad=with_grad,
    )


def to_numpy(array) -> np.ndarray:
    """A host copy of a CuPy array; a NumPy array as it is."""
    return array.get() if hasattr(array, "get") else np.asarray(array)


def assert_close(name: str, got, expected, dtype) -> None:
    """``got`` (a NumPy or CuPy array of ``dtype``) against the float64 NumPy ``expected``:
    same shape, all finite, max error <= tolerance * max(1, max |expected|)."""
    got = to_numpy(got).astype(np.float64)
    assert got.shape == expected.shape, f"{name}: shape {got.shape}, expected {expected.shape}"
    assert np.all(np.isfinite(got)), f"{name}: {np.count_nonzero(~np.isfinite(got))} non-finite elements"
    if got.size == 0:
        return
    scale = max(1.0, float(np.max(np.abs(expected))))
    error = float(np.max(np.abs(got - expected)))
    tolerance = TOLERANCES[np.dtype(dtype).name] * scale
    assert error <= tolerance, f"{name}: max error {error:.3g} > {tolerance:.3g} (scale {scale:.3g})"


def assert_grads_close(grads, expected: dict, dtype) -> None:
    """A :class:`pydeform.DeformConv2dGrads` against the reference's gradient dict; an absent
    bias / mask must be None in both."""
    for name in ARRAY_NAMES:
        got = getattr(grads, name)
        if expected[name] is None:
            assert got is None, f"{name}: expected None (argument absent), got an array"
        else:
            assert_close(f"grad {name}", got, expected[name], dtype)
