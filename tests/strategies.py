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


# RoI ops (docs/roi.md). ``pydeform`` and ``reference`` name their RoI functions alike and
# take the same arguments (``backend`` aside), so a case runs on either module.

ROI_OPS = ("roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool", "deform_roi_pool", "deform_psroi_pool")

#: Where a box lies, in feature-map pixels (see :func:`_roi_box`).
ROI_KINDS = ("inside", "straddling", "outside", "zero-size", "tiny", "inverted", "huge")


@dataclass(frozen=True)
class RoICase:
    """One RoI problem: the op, its arguments as a caller passes them and, for gradient cases,
    ``grad_output``.

    ``rois`` is a ``[K, 5]`` array or a list of per-image ``[L, 4]`` arrays; ``options`` holds
    every other keyword argument of the op, offset / mask / trans arrays (or None) included.
    """

    op: str
    input: np.ndarray
    rois: object
    options: dict
    grad_output: Optional[np.ndarray]

    @property
    def rois_as_rows(self) -> np.ndarray:
        """The boxes as ``[K, 5]`` rows whatever form ``rois`` has."""
        if not isinstance(self.rois, list):
            return self.rois
        rows = [np.column_stack([np.full(len(boxes), i, boxes.dtype), boxes]) for i, boxes in enumerate(self.rois)]
        return np.concatenate(rows) if rows else np.zeros((0, 5), self.input.dtype)

    def arrays(self) -> dict:
        """Every array argument by name (``rois[i]`` for the parts of a list), ``grad_output``
        included when present."""
        found = {"input": self.input, "grad_output": self.grad_output}
        found.update((k, v) for k, v in self.options.items() if isinstance(v, np.ndarray) or hasattr(v, "get"))
        if isinstance(self.rois, list):
            found.update((f"rois[{i}]", boxes) for i, boxes in enumerate(self.rois))
        else:
            found["rois"] = self.rois
        return {k: v for k, v in found.items() if v is not None}

    def arguments(self) -> dict:
        return {"input": self.input, "rois": self.rois, **self.options}

    def forward(self, module, **kwargs):
        """``module.<op>(...)``: ``module`` is ``pydeform`` or ``reference``."""
        return getattr(module, self.op)(**self.arguments(), **kwargs)

    def backward(self, module, **kwargs) -> dict:
        """``module.<op>_backward(grad_output, ...)`` as a dict of gradients by argument name."""
        grads = getattr(module, self.op + "_backward")(self.grad_output, **self.arguments(), **kwargs)
        return grads if isinstance(grads, dict) else grads._asdict()

    def map_arrays(self, convert: Callable) -> "RoICase":
        """The same case with every array replaced by ``convert(array)``."""

        def apply(value):
            return convert(value) if isinstance(value, np.ndarray) else value

        rois = [convert(b) for b in self.rois] if isinstance(self.rois, list) else convert(self.rois)
        return dataclasses.replace(
            self, input=convert(self.input), rois=rois, options={k: apply(v) for k, v in self.options.items()},
            grad_output=apply(self.grad_output),
        )


def _roi_box(rng, kind: str, height: int, width: int) -> np.ndarray:
    """``(x1, y1, x2, y2)`` in feature-map pixels of a box of ``kind`` (one of ROI_KINDS):
    inside the image, straddling its border, wholly outside it on one side, of zero width
    and / or height, smaller than 0.2 pixel, with x2 < x1 or y2 < y1, or several times the
    image."""
    size = np.array([width, height], dtype=np.float64)
    if kind == "inside":
        start = rng.uniform(0, size - 1)
        end = start + rng.uniform(0.3, size - start)
    elif kind == "straddling":
        start = rng.uniform(-3.0, size / 2)
        end = rng.uniform(size / 2, size + 3.0)
    elif kind == "outside":
        start = rng.uniform(size + 1.0, size + 5.0)
        end = start + rng.uniform(0.0, 3.0, 2)
        if rng.random() < 0.5:  # the other side: mirrored to the left / top
            start, end = -end, -start
    elif kind == "zero-size":
        start = rng.uniform(-1.5, size + 0.5)
        extent = rng.uniform(0.0, 2.0, 2) * rng.integers(0, 2, 2)
        extent[rng.integers(0, 2)] = 0.0
        end = start + extent
    elif kind == "tiny":
        start = rng.uniform(-1.5, size + 0.5)
        end = start + rng.uniform(0.0, 0.2, 2)
    elif kind == "inverted":
        end = rng.uniform(-1.0, size)
        start = end + rng.uniform(0.1, 3.0, 2)
    else:  # huge
        start = rng.uniform(-4.0, -1.0, 2) * size
        end = rng.uniform(2.0, 4.0, 2) * size
    return np.concatenate([start, end])


def roi_boxes_for(rng, n: int, kinds: list, height: int, width: int, spatial_scale: float, snap: bool):
    """``[K, 5]`` float64 rows, one box per entry of ``kinds``, batch indices in [0, n), in
    input-image coordinates (feature pixels / spatial_scale); ``snap`` rounds the coordinates
    to multiples of 0.5, which puts roi_pool's roundings on ties and samples on pixel edges."""
    boxes = np.array([_roi_box(rng, kind, height, width) for kind in kinds]).reshape(-1, 4) / spatial_scale
    if snap:
        boxes = np.round(boxes * 2.0) / 2.0
    return np.column_stack([rng.integers(0, n, len(kinds)), boxes]).astype(np.float64)


def build_roi_case(op, rng, dtype=np.float64, n=2, channels=3, size=(5, 6), kinds=ROI_KINDS * 2, scale=0.5,
                   **options) -> RoICase:
    """A gradient case of ``op`` with boxes of the given ``kinds`` (two of every kind by default)
    on ``n`` images of ``size`` with ``channels`` channels, the given options; standard normal
    input and grad_output, rows in the accumulation dtype."""
    box_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    rows = roi_boxes_for(rng, n, list(kinds), *size, scale, snap=False).astype(box_dtype)
    case = RoICase(op, rng.standard_normal((n, channels) + tuple(size)).astype(dtype), rows,
                   dict(spatial_scale=scale, **options), None)
    grad_output = rng.standard_normal(case.forward(reference).shape).astype(dtype)
    return dataclasses.replace(case, grad_output=grad_output)


ROI_SCALES = (1.0, 0.5, 0.25, 2.0, 0.3)


def _options(draw, op: str, num_rois: int, pooled: tuple, rng, dtype, scales):
    """The op's keyword arguments besides input and rois, and its input channel count."""
    pooled_h, pooled_w = pooled
    output_size = pooled_h if pooled_h == pooled_w and draw(st.booleans()) else (pooled_h, pooled_w)
    scale = draw(st.sampled_from(scales))
    sampling_ratio = draw(st.sampled_from([-1, 0, 1, 2, 3]))
    if op == "roi_align":
        options = dict(output_size=output_size, spatial_scale=scale, sampling_ratio=sampling_ratio,
                       aligned=draw(st.booleans()), mode=draw(st.sampled_from(["avg", "max"])))
        return options, draw(st.integers(1, 3))
    if op in ("roi_pool", "ps_roi_pool"):
        channels = draw(st.integers(1, 2)) * (pooled_h * pooled_w if op == "ps_roi_pool" else 1)
        return dict(output_size=output_size, spatial_scale=scale), channels
    if op == "ps_roi_align":
        options = dict(output_size=output_size, spatial_scale=scale, sampling_ratio=sampling_ratio)
        return options, draw(st.integers(1, 2)) * pooled_h * pooled_w
    if op == "deform_roi_pool":
        offset = rng.standard_normal((num_rois, 2, pooled_h, pooled_w)) if draw(st.booleans()) else None
        mask = rng.uniform(-0.5, 1.5, (num_rois, 1, pooled_h, pooled_w)) if draw(st.booleans()) else None
        options = dict(offset=offset, output_size=output_size, spatial_scale=scale,
                       sampling_ratio=sampling_ratio, gamma=draw(st.sampled_from([0.1, 0.4, 1.0])), mask=mask)
        return {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in options.items()}, draw(
            st.integers(1, 3))
    # deform_psroi_pool: output [K, output_dim, P, P], P = pooled_h
    group_size = draw(st.integers(1, 3))
    output_dim = draw(st.integers(1, 2))
    part_size = draw(st.sampled_from([None, 0, 1, 2, 3]))
    parts = part_size or pooled_h
    classes = draw(st.sampled_from([1, output_dim]))
    trans = rng.standard_normal((num_rois, 2 * classes, parts, parts)).astype(dtype) if draw(st.booleans()) else None
    options = dict(trans=trans, output_dim=output_dim, group_size=group_size, pooled_size=pooled_h,
                   part_size=part_size, sample_per_part=draw(st.integers(1, 3)),
                   trans_std=draw(st.sampled_from([0.0, 0.1, 0.5])), spatial_scale=scale)
    return options, output_dim * group_size * group_size


@st.composite
def roi_cases(draw, op=None, dtype=np.float64, with_grad=False, min_rois=0, max_rois=6, kinds=ROI_KINDS,
              as_list=None, scales=ROI_SCALES, pooled_sizes=(1, 2, 3)):
    """A valid problem of one RoI op (drawn from ROI_OPS unless ``op`` is given) in ``dtype``.

    N 1..3, H, W 1..7, output sizes from ``pooled_sizes`` per axis (square for
    deform_psroi_pool), min..max_rois boxes of the given ``kinds`` (see :func:`_roi_box`),
    sometimes on half-pixel multiples; spatial_scale from ``scales``; explicit and adaptive
    sampling; every option of the op drawn; offset / mask / trans present or absent. ``rois`` is a ``[K, 5]`` array or (``as_list``, or
    drawn when None) a list of per-image ``[L, 4]`` arrays, in the accumulation dtype (float32
    for float16 / bfloat16 inputs). The reference's backward is the oracle for gradients: its
    kink conventions are the kernels', so positions need not avoid integers.
    """
    dtype = np.dtype(dtype)
    box_dtype = np.float64 if dtype == np.float64 else np.float32
    op = draw(st.sampled_from(ROI_OPS)) if op is None else op
    n = draw(st.integers(1, 3))
    height, width = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    pooled_h = draw(st.sampled_from(pooled_sizes))
    pooled = (pooled_h, pooled_h if op == "deform_psroi_pool" else draw(st.sampled_from(pooled_sizes)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    roi_kinds = draw(st.lists(st.sampled_from(kinds), min_size=min_rois, max_size=max_rois))
    options, channels = _options(draw, op, len(roi_kinds), pooled, rng, dtype, scales)
    rows = roi_boxes_for(rng, n, roi_kinds, height, width, options["spatial_scale"], draw(st.booleans()))
    # A list holds the boxes by image: sort the rows so the arrays' K order matches.
    as_list = draw(st.booleans()) if as_list is None else as_list
    if as_list:
        rows = rows[np.argsort(rows[:, 0], kind="stable")]
    rows = rows.astype(box_dtype)
    rois = [rows[rows[:, 0] == i, 1:] for i in range(n)] if as_list else rows
    input = rng.standard_normal((n, channels, height, width)).astype(dtype)
    case = RoICase(op, input, rois, options, None)
    if with_grad:
        expected = case.forward(reference)
        case = dataclasses.replace(case, grad_output=rng.standard_normal(expected.shape).astype(dtype))
    return case


def assert_roi_grads_close(grads: dict, expected: dict, dtype) -> None:
    """Gradients (a dict by argument name, NumPy or CuPy arrays) against the reference's; an
    argument the reference gives None must be None here too."""
    assert set(grads) == set(expected), f"gradients {sorted(grads)}, expected {sorted(expected)}"
    for name, value in expected.items():
        if value is None:
            assert grads[name] is None, f"{name}: expected None (argument absent), got an array"
        else:
            assert_close(f"grad {name}", grads[name], value, dtype)
