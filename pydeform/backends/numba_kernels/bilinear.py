"""Bilinear sampling for the Numba kernels, written once for every Numba target.

These are plain Python functions; :mod:`pydeform.backends.numba_kernels.targets` compiles them
as CPU functions (``njit``) and as CUDA device functions (``cuda.jit(device=True)``), and the
kernels of every op call the compiled versions. They never call each other (a call by global
name would reach the uncompiled function). Rules as SPEC section 1.
"""

import math


def zero_padded_setup(h, w, height, width):
    """Rule A (zero-padded) set-up for the sample at ``(h, w)``.

    Returns ``(inside, h0, w0, lh, lw)``: ``inside`` is False when the sample lies outside
    ``(-1, height) x (-1, width)`` (strictly), where rule A gives 0 and its derivatives are 0.
    The comparisons are written so that a NaN position counts as outside, so no corner index
    is ever computed from it.
    """
    if not (h > -1.0 and h < height and w > -1.0 and w < width):
        return False, 0, 0, 0.0, 0.0
    h0 = int(math.floor(h))
    w0 = int(math.floor(w))
    return True, h0, w0, h - h0, w - w0


def zero_padded_corner_flags(h0, w0, height, width):
    """Which of the corners (h0,w0), (h0,w0+1), (h0+1,w0), (h0+1,w0+1) lie in the image."""
    top = h0 >= 0
    bottom = h0 + 1 < height
    left = w0 >= 0
    right = w0 + 1 < width
    return top and left, top and right, bottom and left, bottom and right


def zero_padded_corners(image, b, c, h0, w0, in00, in01, in10, in11):
    """The four corner values of ``image[b, c]`` around ``(h0, w0)``; a corner whose flag
    (from :func:`zero_padded_corner_flags`) is False is outside the image and reads as 0."""
    v00 = image[b, c, h0, w0] if in00 else 0.0
    v01 = image[b, c, h0, w0 + 1] if in01 else 0.0
    v10 = image[b, c, h0 + 1, w0] if in10 else 0.0
    v11 = image[b, c, h0 + 1, w0 + 1] if in11 else 0.0
    return v00, v01, v10, v11


def bilinear_value(v00, v01, v10, v11, lh, lw):
    """Bilinear interpolation of the four corner values at fractions ``(lh, lw)``."""
    return (1.0 - lh) * ((1.0 - lw) * v00 + lw * v01) + lh * ((1.0 - lw) * v10 + lw * v11)


def bilinear_gradient(v00, v01, v10, v11, lh, lw):
    """Derivatives of :func:`bilinear_value` with respect to the position: ``(d/dh, d/dw)``."""
    d_dh = (1.0 - lw) * (v10 - v00) + lw * (v11 - v01)
    d_dw = (1.0 - lh) * (v01 - v00) + lh * (v11 - v10)
    return d_dh, d_dw
