"""Bilinear sampling for the Numba kernels, written once for every Numba target.

:func:`functions` makes them as plain Python functions for one arithmetic type ``real``
(``np.float32`` or ``np.float64``): every float constant and every integer-to-float conversion
is a ``real``, so a kernel built for float32 does no float64 arithmetic (a Python float is a
float64, and ``int + float32`` is a float64 in Numba; float64 runs at 1/32 to 1/64 of the
float32 rate on most GPUs). :mod:`pydeform.backends.numba_kernels.targets` compiles them as CPU
functions (``njit``) and as CUDA device functions (``cuda.jit(device=True)``), and the kernels
of every op call the compiled versions. They never call each other (a call by name would reach
the uncompiled function). Rules as docs/deform_conv.md (rule A) and docs/roi.md (rule B).

Images are addressed flat: ``plane`` is the index of element (0, 0) of one ``H x W`` image in
a 1-d array, and a corner set is given by ``corner = h0 * W + w0`` plus a 4-bit set of the
corners that lie inside the image: bit 0 (h0, w0), bit 1 (h0, w0+1), bit 2 (h0+1, w0),
bit 3 (h0+1, w0+1).
"""

import math

import numpy as np

ALL_CORNERS = 15


def functions(real):
    """The helpers for arithmetic type ``real``, ``{name: plain Python function}``."""

    def zero_padded_setup(h, w, height, width):
        """Rule A (zero-padded) set-up for the sample at ``(h, w)``.

        Returns ``(inside, corner, lh, lw)``: ``inside`` is the bit set of corners inside the image,
        0 when the sample lies outside ``(-1, height) x (-1, width)`` (strictly), where rule A and
        its derivatives are 0. The comparisons are written so that a NaN position counts as
        outside, so no corner index is ever computed from it.
        """
        if not (h > real(-1) and h < real(height) and w > real(-1) and w < real(width)):
            return 0, 0, real(0), real(0)
        h0 = int(math.floor(h))
        w0 = int(math.floor(w))
        inside = 0
        if h0 >= 0:
            inside |= (1 if w0 >= 0 else 0) | (2 if w0 + 1 < width else 0)
        if h0 + 1 < height:
            inside |= (4 if w0 >= 0 else 0) | (8 if w0 + 1 < width else 0)
        return inside, h0 * width + w0, h - real(h0), w - real(w0)


    def bilinear_weights(lh, lw, scale):
        """The four corner weights at fractions ``(lh, lw)``, each multiplied by ``scale``."""
        return (
            scale * (real(1) - lh) * (real(1) - lw),
            scale * (real(1) - lh) * lw,
            scale * lh * (real(1) - lw),
            scale * lh * lw,
        )


    def zero_padded_corners(image, plane, corner, inside, width):
        """The four corner values around ``corner`` of the image at ``plane``; 0 outside it.

        The index of a corner in ``inside`` is never negative and is converted to unsigned, so
        Numba emits no negative-index wraparound for it (only those are converted: the top-left
        index is -1 when that corner lies outside, left of (0, 0)). With ``inside`` the constant
        ``ALL_CORNERS`` the values keep the image's dtype; otherwise they are ``real`` (the zero;
        ``image.dtype.type(0)`` would make Numba CPU keep ``image`` alive with a reference-count
        call on every use).
        """
        at = plane + corner
        if inside == ALL_CORNERS:
            at00 = np.uint64(at)
            at10 = at00 + np.uint64(width)
            one = np.uint64(1)
            return image[at00], image[at00 + one], image[at10], image[at10 + one]
        v00 = image[np.uint64(at)] if inside & 1 else real(0)
        v01 = image[np.uint64(at + 1)] if inside & 2 else real(0)
        v10 = image[np.uint64(at + width)] if inside & 4 else real(0)
        v11 = image[np.uint64(at + width + 1)] if inside & 8 else real(0)
        return v00, v01, v10, v11


    def zero_padded_run(image_hwc, at, inside, weights, channel_step, row_step, dest, dest_at, count):
        """Write ``count`` consecutive channels of one zero-padded sample into ``dest[dest_at:]``.

        For channels-last images: ``at`` is the flat index of the sample's top-left corner at its
        first channel, the corners to its right and below are ``channel_step`` (C) and ``row_step``
        (W*C) further, and ``inside`` / ``weights`` (an array of the four weights in the image's
        dtype) come from :func:`zero_padded_setup` / :func:`bilinear_weights`. With all four
        corners inside, the channels are four contiguous runs read with unsigned indices (no
        negative-index wraparound), which the CPU compiler turns into SIMD loads.
        """
        if inside == ALL_CORNERS:
            at00 = np.uint64(at)
            at01 = at00 + np.uint64(channel_step)
            at10 = at00 + np.uint64(row_step)
            at11 = at10 + np.uint64(channel_step)
            first = np.uint64(dest_at)
            for c in range(count):
                u = np.uint64(c)
                dest[first + u] = (
                    weights[0] * image_hwc[at00 + u] + weights[1] * image_hwc[at01 + u]
                    + weights[2] * image_hwc[at10 + u] + weights[3] * image_hwc[at11 + u]
                )
            return
        # m * 0 to start with (weights[0] is the mask value m for a sample outside the image):
        # NaN for a NaN mask, like the corners' terms.
        start = real(0) * weights[0]
        for c in range(count):
            dest[dest_at + c] = start
        for k in range(4):  # corner k is bit k of inside: (h0 + k // 2, w0 + k % 2)
            if inside & (1 << k):
                at_k = np.uint64(at + (k & 1) * channel_step + (k >> 1) * row_step)
                for c in range(count):
                    dest[dest_at + c] += weights[k] * image_hwc[at_k + np.uint64(c)]


    def bilinear_combine(v00, v01, v10, v11, w00, w01, w10, w11):
        """Weighted sum of the four corner values."""
        return w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11


    def bilinear_gradient(v00, v01, v10, v11, lh, lw):
        """Derivatives of bilinear interpolation with respect to the position: ``(d/dh, d/dw)``."""
        d_dh = (real(1) - lw) * (v10 - v00) + lw * (v11 - v01)
        d_dw = (real(1) - lh) * (v01 - v00) + lh * (v11 - v10)
        return d_dh, d_dw


    def border_clamped_setup(y, x, height, width):
        """Rule B (border-clamped) set-up for the sample at ``(y, x)``.

        Returns ``(inside, corner, row_step, col_step, ly, lx, slope_y, slope_x)``: ``inside`` is
        False outside ``[-1, height] x [-1, width]`` (inclusive), where rule B gives 0 (also for a
        NaN position). The coordinates are clamped into the image; ``row_step`` / ``col_step`` are
        the flat distances to the second row / column (0 where both corners are the last one, so
        no read leaves the image), and ``slope_*`` is 0 along an axis where a clamp holds (at
        ``<= 0`` or on the last row / column), where the sample does not move with the position.
        """
        if not (y >= real(-1) and y <= real(height) and x >= real(-1) and x <= real(width)):
            return False, 0, 0, 0, real(0), real(0), real(0), real(0)
        slope_y = real(1)
        slope_x = real(1)
        if y <= real(0):
            y = real(0)
            slope_y = real(0)
        if x <= real(0):
            x = real(0)
            slope_x = real(0)
        y0 = int(y)
        x0 = int(x)
        row_step = width
        col_step = 1
        if y0 >= height - 1:
            y0 = height - 1
            y = real(y0)
            row_step = 0
            slope_y = real(0)
        if x0 >= width - 1:
            x0 = width - 1
            x = real(x0)
            col_step = 0
            slope_x = real(0)
        return True, y0 * width + x0, row_step, col_step, y - real(y0), x - real(x0), slope_y, slope_x


    def border_clamped_corners(image, plane, corner, row_step, col_step):
        """The four corner values of a rule-B set-up (always inside the image)."""
        at = plane + corner
        return image[at], image[at + col_step], image[at + row_step], image[at + row_step + col_step]

    return {
        "zero_padded_setup": zero_padded_setup,
        "bilinear_weights": bilinear_weights,
        "zero_padded_corners": zero_padded_corners,
        "zero_padded_run": zero_padded_run,
        "bilinear_combine": bilinear_combine,
        "bilinear_gradient": bilinear_gradient,
        "border_clamped_setup": border_clamped_setup,
        "border_clamped_corners": border_clamped_corners,
    }
