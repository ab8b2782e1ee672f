"""deform_conv2d's selftest checks: zero offsets and a unit mask give an ordinary convolution,
whole-pixel offsets a gather, ``mask=None`` a unit mask; the generic checks of every gradient."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..deform_conv import deform_conv2d, deform_conv2d_backward
from .common import (
    OUTPUT_TOLERANCE, OpCalls, cases_of, check, forward_check, largest_gradient_error, register_common_checks,
    rounded, relative_error, run_backward, run_forward,
)


class DeformConvCase(NamedTuple):
    n: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    offset_groups: int

    def options(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)

    def out_size(self) -> tuple:
        return tuple(
            (size + 2 * pad - (dil * (k - 1) + 1)) // step + 1
            for size, pad, dil, k, step in zip(
                (self.height, self.width), self.padding, self.dilation, self.kernel, self.stride
            )
        )

    def output_shape(self, arrays) -> tuple:
        return (self.n, self.out_channels, *self.out_size())

    def arrays(self, rng: np.random.Generator) -> dict:
        """float64 arguments; every sampling position is a whole number plus a fraction in
        [0.05, 0.95], so no sample sits on a pixel edge where the forward has a kink."""
        kh, kw = self.kernel
        out_h, out_w = self.out_size()
        points = self.offset_groups * kh * kw
        offset_shape = (self.n, 2 * points, out_h, out_w)
        whole = rng.integers(-2, 2, size=offset_shape)
        return {
            "input": rng.standard_normal((self.n, self.channels, self.height, self.width)),
            "offset": whole + rng.uniform(0.05, 0.95, size=offset_shape),
            "weight": rng.standard_normal((self.out_channels, self.channels // self.groups, kh, kw)),
            "bias": rng.standard_normal(self.out_channels),
            "mask": rng.uniform(0.1, 1.0, size=(self.n, points, out_h, out_w)),
        }


# The first case covers strides, dilation, padding, weight and offset groups; --quick runs it alone.
DEFORM_CONV_CASES = (
    DeformConvCase(2, 6, 9, 8, 4, (3, 2), (2, 1), (1, 0), (1, 2), groups=2, offset_groups=3),
    DeformConvCase(2, 4, 7, 7, 5, (3, 3), (1, 1), (1, 1), (1, 1), groups=1, offset_groups=1),
)
DEFORM_CONV_GRADIENTS = ("input", "offset", "weight", "bias", "mask")


_deform_conv_cases = cases_of(DEFORM_CONV_CASES, DeformConvCase.arrays)
DEFORM_CONV = OpCalls("deform_conv2d", deform_conv2d, deform_conv2d_backward, _deform_conv_cases)


def _contract(samples, weight, bias) -> np.ndarray:
    """out[n, o, y, x] = bias[o] + sum over o's group's channels c and kernel points of
    weight[o, c, i, j] * samples[n, c, i, j, y, x]."""
    n, channels, kh, kw, out_h, out_w = samples.shape
    out_channels, group_channels = weight.shape[:2]
    groups = channels // group_channels
    samples = samples.reshape(n, groups, group_channels, kh, kw, out_h, out_w)
    grouped_weight = weight.reshape(groups, out_channels // groups, group_channels, kh, kw)
    out = np.einsum("ngcijyx,gocij->ngoyx", samples, grouped_weight)
    return out.reshape(n, out_channels, out_h, out_w) + bias.reshape(1, -1, 1, 1)


def ordinary_conv2d(input, weight, bias, stride, padding, dilation) -> np.ndarray:
    """A grouped 2-D convolution (cross-correlation) with zero padding, from sliding windows."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = weight.shape[2:]
    padded = np.pad(input, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # [n, c, Ho, Wo, kh, kw]
    return _contract(windows.transpose(0, 1, 4, 5, 2, 3), weight, bias)


def whole_pixel_deform_conv2d(input, offset, mask, weight, bias, stride, padding, dilation) -> np.ndarray:
    """deform_conv2d for offsets that are whole numbers, where bilinear sampling reads single
    pixels: a gather from the zero-padded input."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, channels = input.shape[:2]
    kh, kw = weight.shape[2:]
    out_h, out_w = offset.shape[2:]
    offset_groups = offset.shape[1] // (2 * kh * kw)
    shifts = offset.astype(np.int64).reshape(n, offset_groups, kh, kw, 2, out_h, out_w)
    reach = int(np.abs(shifts).max())
    padded = np.pad(input, ((0, 0), (0, 0), (ph + reach,) * 2, (pw + reach,) * 2))
    padded = padded.reshape(n, offset_groups, channels // offset_groups, *padded.shape[2:])
    # Row / column of each sample in the padded input: [n, Goff, kh, kw, Ho, Wo].
    rows = (np.arange(out_h)[:, None] * sh + (np.arange(kh) * dh)[:, None, None, None]
            + shifts[:, :, :, :, 0] + reach)
    cols = np.arange(out_w) * sw + (np.arange(kw) * dw)[:, None, None] + shifts[:, :, :, :, 1] + reach
    index = np.ogrid[:n, :offset_groups, : channels // offset_groups]
    samples = padded[
        index[0][..., None, None, None, None], index[1][..., None, None, None, None],
        index[2][..., None, None, None, None], rows[:, :, None], cols[:, :, None],
    ]  # [n, Goff, C/Goff, kh, kw, Ho, Wo]
    samples = samples * mask.reshape(n, offset_groups, 1, kh, kw, out_h, out_w)
    return _contract(samples.reshape(n, channels, kh, kw, out_h, out_w), weight, bias)


def _zero_offsets_unit_mask(case, arrays):
    return dict(arrays, offset=np.zeros_like(arrays["offset"]), mask=np.ones_like(arrays["mask"]))


def _whole_pixel_offsets(case, arrays):
    return dict(arrays, offset=np.floor(arrays["offset"]))


check("deform_conv2d", "zero offsets = convolution", OUTPUT_TOLERANCE)(forward_check(
    DEFORM_CONV,
    lambda backend, dtype, case, a: ordinary_conv2d(a["input"], a["weight"], a["bias"], **case.options()),
    prepare=_zero_offsets_unit_mask,
))
check("deform_conv2d", "whole-pixel offsets = gather", OUTPUT_TOLERANCE)(forward_check(
    DEFORM_CONV,
    lambda backend, dtype, case, arrays: whole_pixel_deform_conv2d(**arrays, **case.options()),
    prepare=_whole_pixel_offsets,
))


@check("deform_conv2d", "mask=None = unit mask", OUTPUT_TOLERANCE)
def _no_mask_is_a_unit_mask(backend, dtype, quick):
    errors = []
    for case, arrays, grad_output in _deform_conv_cases(quick):
        arrays = rounded(arrays, dtype)
        unit = dict(arrays, mask=np.ones_like(arrays["mask"]))
        absent = {k: v for k, v in arrays.items() if k != "mask"}
        errors.append(
            relative_error(
                run_forward(DEFORM_CONV, backend, dtype, case, absent),
                run_forward(DEFORM_CONV, backend, dtype, case, unit),
            )
        )
        unit_grads = run_backward(DEFORM_CONV, backend, dtype, case, unit, grad_output)
        del unit_grads["mask"]
        errors.append(
            largest_gradient_error(run_backward(DEFORM_CONV, backend, dtype, case, absent, grad_output), unit_grads)
        )
    return max(errors)


register_common_checks(DEFORM_CONV, DEFORM_CONV_GRADIENTS)
