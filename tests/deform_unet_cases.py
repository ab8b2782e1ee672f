"""Problems of the Deformable U-Net operators (deform_conv_transpose2d, deform_pool2d), derived
from the deform_conv2d problems of :mod:`tests.strategies` so that the drawing rules (every
geometry valid, offsets across and far outside the border, gradient positions away from the
kinks) are written once.

A transposed convolution is a deformable convolution read backwards: the deform_conv2d case's
offsets, mask and weight serve as they are, its output grid is the transposed op's input grid
and its input size the transposed op's output size (the output_padding recovers the rows the
last stride step left unused). A pooling case keeps the deform_conv2d case's input, offsets,
mask and geometry and drops the weight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from hypothesis import strategies as st

import reference
from tests.strategies import DeformConvCase, deform_conv_cases

TRANSPOSE_ARRAYS = ("input", "offset", "weight", "bias", "mask")
POOL_ARRAYS = ("input", "offset", "mask")


def _pair(value) -> tuple:
    return (value, value) if isinstance(value, int) else tuple(value)


def _same_form(like, values: tuple):
    """``values`` as an int when ``like`` was passed as one."""
    return values[0] if isinstance(like, int) else values


@dataclass(frozen=True)
class TransposeCase:
    """One deform_conv_transpose2d problem (NumPy arrays of one dtype) and its options."""

    input: np.ndarray
    offset: np.ndarray
    weight: np.ndarray
    bias: Optional[np.ndarray]
    mask: Optional[np.ndarray]
    grad_output: Optional[np.ndarray]
    stride: object
    padding: object
    output_padding: object
    dilation: object
    groups: int

    def options(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "output_padding": self.output_padding,
                "dilation": self.dilation, "groups": self.groups}

    def arguments(self) -> dict:
        return {**{name: getattr(self, name) for name in TRANSPOSE_ARRAYS}, **self.options()}

    def map_arrays(self, convert: Callable) -> "TransposeCase":
        names = TRANSPOSE_ARRAYS + ("grad_output",)
        return dataclasses.replace(
            self, **{n: convert(getattr(self, n)) for n in names if getattr(self, n) is not None})

    def reference_forward(self) -> np.ndarray:
        return reference.deform_conv_transpose2d(**self.arguments())

    def reference_backward(self) -> dict:
        return reference.deform_conv_transpose2d_backward(self.grad_output, **self.arguments())


def transpose_case_from(case: DeformConvCase, rng, with_grad: bool = True) -> TransposeCase:
    """The deform_conv_transpose2d problem whose op is the adjoint of ``case``'s deformable
    convolution: input of ``case``'s output shape, output of ``case``'s input shape; a fresh
    standard normal input, bias (present when ``case`` has one) and grad_output."""
    dtype = case.input.dtype
    n, out_channels, out_h, out_w = case.input.shape
    kernel_h, kernel_w = case.weight.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = map(_pair, (case.stride, case.padding, case.dilation))
    height, width = case.offset.shape[2:]
    output_padding = (out_h + 2 * ph - dh * (kernel_h - 1) - 1 - (height - 1) * sh,
                      out_w + 2 * pw - dw * (kernel_w - 1) - 1 - (width - 1) * sw)
    if output_padding[0] == output_padding[1] and isinstance(case.stride, int):
        output_padding = output_padding[0]
    return TransposeCase(
        input=rng.standard_normal((n, case.weight.shape[0], height, width)).astype(dtype),
        offset=case.offset, weight=case.weight,
        bias=None if case.bias is None else rng.standard_normal(out_channels).astype(dtype),
        mask=case.mask,
        grad_output=rng.standard_normal(case.input.shape).astype(dtype) if with_grad else None,
        stride=case.stride, padding=case.padding, output_padding=output_padding, dilation=case.dilation,
        groups=case.groups,
    )


@st.composite
def deform_conv_transpose_cases(draw, dtype=np.float64, with_grad=False, max_batch=3, min_batch=0):
    """A valid deform_conv_transpose2d problem: the adjoint of a drawn deform_conv2d problem
    (see :func:`tests.strategies.deform_conv_cases` for the ranges)."""
    case = draw(deform_conv_cases(dtype=dtype, with_grad=with_grad, max_batch=max_batch, min_batch=min_batch))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return transpose_case_from(case, rng, with_grad)


@dataclass(frozen=True)
class PoolCase:
    """One deform_pool2d problem (NumPy arrays of one dtype) and its options."""

    input: np.ndarray
    offset: np.ndarray
    mask: Optional[np.ndarray]
    grad_output: Optional[np.ndarray]
    kernel_size: object
    stride: object
    padding: object
    dilation: object
    mode: str

    def options(self) -> dict:
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "mode": self.mode}

    def arguments(self) -> dict:
        return {**{name: getattr(self, name) for name in POOL_ARRAYS}, **self.options()}

    def map_arrays(self, convert: Callable) -> "PoolCase":
        names = POOL_ARRAYS + ("grad_output",)
        return dataclasses.replace(
            self, **{n: convert(getattr(self, n)) for n in names if getattr(self, n) is not None})

    def reference_forward(self, **kwargs):
        return reference.deform_pool2d(**self.arguments(), **kwargs)

    def reference_backward(self) -> dict:
        return reference.deform_pool2d_backward(self.grad_output, **self.arguments())


def pool_case_from(case: DeformConvCase, mode: str, rng, stride_as_none: bool = False) -> PoolCase:
    """``case``'s input, offsets, mask and geometry pooled in ``mode``; a fresh grad_output
    when ``case`` has one. ``stride_as_none`` passes ``stride=None`` where the stride equals
    the kernel size."""
    kernel = tuple(case.weight.shape[2:])
    stride = case.stride
    if stride_as_none and _pair(stride) == kernel:
        stride = None
    grad_output = None
    if case.grad_output is not None:
        grad_output = rng.standard_normal(case.input.shape[:2] + case.offset.shape[2:]).astype(case.input.dtype)
    return PoolCase(
        input=case.input, offset=case.offset, mask=case.mask, grad_output=grad_output,
        kernel_size=_same_form(case.stride, kernel) if kernel[0] == kernel[1] else kernel, stride=stride,
        padding=case.padding, dilation=case.dilation, mode=mode,
    )


@st.composite
def deform_pool_cases(draw, dtype=np.float64, with_grad=False, max_batch=3, min_batch=0, mode=None):
    """A valid deform_pool2d problem: a drawn deform_conv2d problem without its weight, pooled
    in ``mode`` (drawn when None); ``stride=None`` sometimes where it equals the kernel."""
    case = draw(deform_conv_cases(dtype=dtype, with_grad=with_grad, max_batch=max_batch, min_batch=min_batch))
    mode = draw(st.sampled_from(["avg", "max"])) if mode is None else mode
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return pool_case_from(case, mode, rng, stride_as_none=draw(st.booleans()))
