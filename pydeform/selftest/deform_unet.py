"""The Deformable U-Net ops' selftest checks: deform_conv_transpose2d with zero offsets and a unit
mask is an ordinary transposed convolution and it is the adjoint of deform_conv2d
(``<deform_conv2d(y), x> = <y, deform_conv_transpose2d(x)>``); deform_pool2d with zero offsets
and no mask is avg / max pooling of the zero-padded input, and its avg mode is the depthwise
deform_conv2d with weight 1/(kh*kw); the generic checks of every gradient."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..deform_conv import deform_conv2d
from ..deform_unet import (
    deform_conv_transpose2d, deform_conv_transpose2d_backward, deform_pool2d, deform_pool2d_backward,
)
from .common import (
    OUTPUT_TOLERANCE, OpCalls, cases_of, check, forward_check, on_device, register_common_checks, rounded,
)


def _off_edge_offsets(rng, shape):
    """Offsets of whole numbers plus a fraction in [0.05, 0.95]: added to the whole-number base
    positions, no sample sits on a pixel edge, where the ops have kinks."""
    return rng.integers(-2, 2, size=shape) + rng.uniform(0.05, 0.95, size=shape)


# --- deform_conv_transpose2d -----------------------------------------------------------------


class DeformConvTransposeCase(NamedTuple):
    n: int
    channels: int  # C_in
    height: int
    width: int
    out_channels: int
    kernel: tuple
    stride: tuple
    padding: tuple
    output_padding: tuple
    dilation: tuple
    groups: int
    offset_groups: int

    def options(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, output_padding=self.output_padding,
                    dilation=self.dilation, groups=self.groups)

    def out_size(self) -> tuple:
        return tuple(
            (size - 1) * step - 2 * pad + dil * (k - 1) + extra + 1
            for size, step, pad, dil, k, extra in zip(
                (self.height, self.width), self.stride, self.padding, self.dilation, self.kernel, self.output_padding)
        )

    def output_shape(self, arrays) -> tuple:
        return (self.n, self.out_channels, *self.out_size())

    def arrays(self, rng: np.random.Generator) -> dict:
        """float64 arguments; offsets and mask on the input grid."""
        kh, kw = self.kernel
        points = self.offset_groups * kh * kw
        grid = (self.height, self.width)
        return {
            "input": rng.standard_normal((self.n, self.channels, *grid)),
            "offset": _off_edge_offsets(rng, (self.n, 2 * points, *grid)),
            "weight": rng.standard_normal((self.channels, self.out_channels // self.groups, kh, kw)),
            "bias": rng.standard_normal(self.out_channels),
            "mask": rng.uniform(0.1, 1.0, size=(self.n, points, *grid)),
        }


# The first case covers stride, output padding, dilation, padding, weight and offset groups;
# --quick runs it alone.
DEFORM_CONV_TRANSPOSE_CASES = (
    DeformConvTransposeCase(2, 4, 5, 4, 6, (3, 2), (2, 1), (1, 0), (1, 0), (1, 2), groups=2, offset_groups=3),
    DeformConvTransposeCase(1, 3, 4, 4, 2, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1), groups=1, offset_groups=1),
)
DEFORM_CONV_TRANSPOSE = OpCalls("deform_conv_transpose2d", deform_conv_transpose2d, deform_conv_transpose2d_backward,
                                cases_of(DEFORM_CONV_TRANSPOSE_CASES, DeformConvTransposeCase.arrays))


def ordinary_conv_transpose2d(input, weight, bias, stride, padding, output_padding, dilation, groups) -> np.ndarray:
    """A grouped 2-D transposed convolution (torch's conv_transpose2d): every input pixel adds
    ``input * weight[c, o', i, j]`` at ``(y*sh - ph + i*dh, x*sw - pw + j*dw)`` of output channel
    ``o`` of its group; computed on an unpadded canvas, then cropped."""
    (sh, sw), (ph, pw), (oph, opw), (dh, dw) = stride, padding, output_padding, dilation
    n, channels, height, width = input.shape
    kh, kw = weight.shape[2:]
    group_out = weight.shape[1]
    out_h = (height - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1
    out_w = (width - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1
    reach = ((height - 1) * sh + dh * (kh - 1) + 1, (width - 1) * sw + dw * (kw - 1) + 1)
    canvas = np.zeros((n, groups * group_out, max(ph + out_h, reach[0]), max(pw + out_w, reach[1])))
    grouped_input = input.reshape(n, groups, channels // groups, height, width)
    grouped_weight = weight.reshape(groups, channels // groups, group_out, kh, kw)
    for i in range(kh):
        for j in range(kw):
            splat = np.einsum("ngcyx,gco->ngoyx", grouped_input, grouped_weight[:, :, :, i, j])
            rows = slice(i * dh, i * dh + (height - 1) * sh + 1, sh)
            columns = slice(j * dw, j * dw + (width - 1) * sw + 1, sw)
            canvas[:, :, rows, columns] += splat.reshape(n, -1, height, width)
    return canvas[:, :, ph:ph + out_h, pw:pw + out_w] + bias.reshape(1, -1, 1, 1)


def _zero_offsets_unit_mask(case, arrays):
    return dict(arrays, offset=np.zeros_like(arrays["offset"]), mask=np.ones_like(arrays["mask"]))


check("deform_conv_transpose2d", "zero offsets = transposed convolution", OUTPUT_TOLERANCE)(forward_check(
    DEFORM_CONV_TRANSPOSE,
    lambda backend, dtype, case, a: ordinary_conv_transpose2d(a["input"], a["weight"], a["bias"], **case.options()),
    prepare=_zero_offsets_unit_mask,
))


@check("deform_conv_transpose2d", "adjoint of deform_conv2d", OUTPUT_TOLERANCE)
def _adjoint_of_deform_conv2d(backend, dtype, quick):
    """``<deform_conv2d(y), x> = <y, deform_conv_transpose2d(x)>`` (no bias), both run on the
    backend, relative to the sum of the magnitudes of the products."""
    errors = []
    for case, arrays, y in DEFORM_CONV_TRANSPOSE.cases(quick):
        arrays = rounded(dict(arrays, y=y), dtype)
        a = on_device(backend, dtype, arrays)
        geometry = dict(stride=case.stride, padding=case.padding, dilation=case.dilation)
        convolved = backend.to_host(deform_conv2d(a["y"], a["offset"], a["weight"], mask=a["mask"], **geometry,
                                                  backend=backend.option))
        transposed = backend.to_host(deform_conv_transpose2d(a["input"], a["offset"], a["weight"], mask=a["mask"],
                                                             **case.options(), backend=backend.option))
        lhs, rhs = convolved * arrays["input"], arrays["y"] * transposed
        scale = max(float(np.abs(lhs).sum()), float(np.abs(rhs).sum()))
        errors.append(abs(float(lhs.sum()) - float(rhs.sum())) / scale)
    return max(errors)


register_common_checks(DEFORM_CONV_TRANSPOSE, ("input", "offset", "weight", "bias", "mask"))


# --- deform_pool2d ---------------------------------------------------------------------------


class DeformPoolCase(NamedTuple):
    n: int
    channels: int
    height: int
    width: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    offset_groups: int
    mode: str
    masked: bool

    def options(self) -> dict:
        return dict(kernel_size=self.kernel, stride=self.stride, padding=self.padding, dilation=self.dilation,
                    mode=self.mode)

    def out_size(self) -> tuple:
        return tuple(
            (size + 2 * pad - (dil * (k - 1) + 1)) // step + 1
            for size, pad, dil, k, step in zip(
                (self.height, self.width), self.padding, self.dilation, self.kernel, self.stride)
        )

    def output_shape(self, arrays) -> tuple:
        return (self.n, self.channels, *self.out_size())

    def arrays(self, rng: np.random.Generator) -> dict:
        """float64 arguments. The input's values are random, hence distinct: max mode's largest
        sample leads the next by far more than a finite-difference step moves them."""
        kh, kw = self.kernel
        points = self.offset_groups * kh * kw
        grid = self.out_size()
        arrays = {"input": rng.standard_normal((self.n, self.channels, self.height, self.width)),
                  "offset": _off_edge_offsets(rng, (self.n, 2 * points, *grid))}
        if self.masked:
            arrays["mask"] = rng.uniform(0.1, 1.0, size=(self.n, points, *grid))
        return arrays


# The first case of each mode covers stride, padding, dilation and offset groups; --quick runs
# those two.
DEFORM_POOL_CASES = (
    DeformPoolCase(2, 6, 9, 8, (3, 2), (2, 1), (1, 0), (1, 2), offset_groups=3, mode="avg", masked=True),
    DeformPoolCase(2, 6, 9, 8, (3, 2), (2, 1), (1, 0), (1, 2), offset_groups=3, mode="max", masked=True),
    DeformPoolCase(1, 4, 7, 7, (3, 3), (2, 2), (1, 1), (1, 1), offset_groups=1, mode="avg", masked=False),
    DeformPoolCase(1, 4, 7, 7, (2, 2), (2, 2), (0, 0), (1, 1), offset_groups=2, mode="max", masked=False),
)
_all_pool_cases = cases_of(DEFORM_POOL_CASES, DeformPoolCase.arrays)


def _deform_pool_cases(quick: bool):
    """Each case's arguments and output gradient; quick: the first case of each mode."""
    for index, generated in enumerate(_all_pool_cases(False)):
        if not quick or index < 2:
            yield generated


DEFORM_POOL = OpCalls("deform_pool2d", deform_pool2d, deform_pool2d_backward, _deform_pool_cases)


def zero_padded_pool2d(input, kernel_size, stride, padding, dilation, mode) -> np.ndarray:
    """avg or max pooling of the zero-padded input over dilated windows (avg counts the padding,
    as count_include_pad=True; max compares it as zeros, unlike max_pool2d's -inf padding)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    padded = np.pad(input, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    return windows.mean(axis=(4, 5)) if mode == "avg" else windows.max(axis=(4, 5))


def _zero_offsets_no_mask(case, arrays):
    return {"input": arrays["input"], "offset": np.zeros_like(arrays["offset"])}


check("deform_pool2d", "zero offsets = pooling of the zero-padded input", OUTPUT_TOLERANCE)(forward_check(
    DEFORM_POOL,
    lambda backend, dtype, case, a: zero_padded_pool2d(a["input"], **case.options()),
    prepare=_zero_offsets_no_mask,
))


def _depthwise_deform_conv2d(backend, dtype, case, arrays):
    """avg mode's twin: deform_conv2d of weight 1/(kh*kw) per channel, on the backend in float64."""
    kh, kw = case.kernel
    weight = np.full((case.channels, 1, kh, kw), 1.0 / (kh * kw))
    a = on_device(backend, "float64", dict(arrays, weight=weight))
    return backend.to_host(deform_conv2d(**a, stride=case.stride, padding=case.padding, dilation=case.dilation,
                                         backend=backend.option))


check("deform_pool2d", "avg = depthwise deform_conv2d", OUTPUT_TOLERANCE)(forward_check(
    DEFORM_POOL, _depthwise_deform_conv2d, prepare=lambda case, arrays: arrays if case.mode == "avg" else None,
))
register_common_checks(DEFORM_POOL, ("input", "offset", "mask"))
