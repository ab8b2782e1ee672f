"""A channels-last copy of an ``[N, C, H, W]`` image batch for the Numba CPU kernels.

Kernels whose samples are shared by every channel of a pixel (deform_conv2d's im2col, roi_align's
forward) read the four corners of a sample from the copy as four contiguous runs of channels,
which the CPU handles with SIMD loads instead of four scalar loads from distant planes per
channel.
"""

from __future__ import annotations

import functools

import numpy as np

from .targets import cpu_kernel, flat


@functools.lru_cache(maxsize=None)
def _transpose_kernel():
    from numba import prange

    @cpu_kernel
    def to_channels_last(input, input_hwc, channels, height, width, n_rows):
        # A task per image row (b, y): it reads C runs of W values and writes C*W contiguous ones.
        for image_row in prange(n_rows):
            b = image_row // height
            source = (b * channels * height + image_row - b * height) * width
            target = image_row * width * channels
            for c in range(channels):
                for x in range(width):
                    input_hwc[target + x * channels + c] = input[source + c * height * width + x]

    return to_channels_last


def channels_last(input: np.ndarray, out: np.ndarray = None) -> np.ndarray:
    """input [N, C, H, W] (C-contiguous) -> its ``[N, H, W, C]`` copy as a flat array: ``out``
    (a flat array of ``input.size`` elements of its dtype, e.g. a planned scratch buffer) or a
    new one."""
    n, channels, height, width = input.shape
    input_hwc = np.empty(input.size, input.dtype) if out is None else out
    _transpose_kernel()(flat(input), input_hwc, channels, height, width, n * height)
    return input_hwc
