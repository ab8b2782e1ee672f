"""Pure-NumPy float64 oracle for pydeform's kernels (SPEC.md); imports nothing from pydeform."""

from .deform_conv import deform_conv2d, deform_conv2d_backward

__all__ = ["deform_conv2d", "deform_conv2d_backward"]
