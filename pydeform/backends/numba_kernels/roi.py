"""RoI kernels for Numba (roi_align, ps_roi_align, roi_pool, ps_roi_pool, deform_roi_pool,
deform_psroi_pool): the arithmetic of one output element written once, compiled for the CPU
and for CUDA. Semantics are those of docs/roi.md, rule-B (border-clamped) bilinear sampling included.

A work item is one output element ``item = ((k*C_out + c)*PH + ph)*PW + pw`` (roi k, output
channel c, bin (ph, pw)). Each op family has three element functions: ``forward(k, c, ph, pw,
...)`` returns the element's value, ``input_grad(k, c, ph, pw, grad, ...)`` adds the element's
share of the input gradient and ``params_grad`` its share of the offset / mask / trans
gradients, both with ``t.atomic_add``. Max modes find the arg-max with the forward's code and
route the gradient through it. The sampling loops of a bin are generated from one template per
sampling scheme (roi_align's regular grid, deform_psroi_pool's skipping and clamping grid).

- CUDA: one thread per output element in the forward and in the backward (``input_grad`` then
  ``params_grad``, atomic adds into the accumulation-dtype gradients).
- CPU: the forward likewise, one ``prange`` iteration per element, except plain roi_align's and
  roi_pool's: their tasks are rows of bins of a roi, and each bin's set-up (roi_align: each
  sample's position, clamps, corners, weights; roi_pool: the window) is computed once for all
  channels, which share it, and applied to a channels-last copy of the input, all channels of
  a pixel at once. In the backward, elements of
  overlapping bins (neighbouring bins, rois that overlap) scatter into the same input pixels, so
  running elements in parallel would race without atomics. The backward therefore runs in two
  passes whose tasks own everything they write, and ``t.atomic_add`` is a plain add: pass 1
  (``input_grad``) has one task per input plane (image n, input channel c_in), which walks the
  rois of image n and the output elements that read channel c_in (all bins of channel c_in for
  the plain ops, the one bin of each roi that reads it for the position-sensitive ones); pass 2
  (``params_grad``, deform ops only) has one task per roi, the only owner of that roi's offset /
  mask / trans gradients. (Two functions rather than one with flags: each CPU pass then inlines
  only its half, which keeps Numba's compile time down.)

Kernels take flat views of the C-contiguous arrays of the kernel-set interface
(:mod:`pydeform.roi`): ``rois`` is ``[K, 5]`` in the accumulation dtype; ``first`` / ``second``
are offset / mask (deform_roi_pool), trans (deform_psroi_pool) or stand-ins that are never read
(likewise their gradients); ``shape = (N, C, H, W, C_out, PH, PW)``; ``params`` is the op's
param record as a plain tuple, in its field order.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..._arrays import accumulation_dtype
from ..._contributions import (
    contribution_lists, roi_contribution_layout, roi_lists_plan, roi_param_partials_shape,
)
from ..._rois import COORDINATE_LIMIT, MAX_SAMPLES_PER_AXIS
from ..._workspace import accumulator_plans, converted_arrays, scratch
from . import contributions
from .layout import channels_last
from .targets import bind_cuda, cpu_kernel, cpu_target, cuda_kernel, cuda_target, flat, launch_cuda, typed_floats

# numba.cuda once a CUDA kernel is built (see targets.bind_cuda for why a module global).
cuda = None

# From 2**52 on every float64 (and from 2**23 every float32) is an integer: rounding leaves it
# alone (and math.floor, which returns an int64 in Numba on the CPU, never sees it).
_INTEGRAL_FROM = float(2**52)


# Indices into the kernels' ``shape`` tuple.
_N, _C, _H, _W, _C_OUT, _PH, _PW = range(7)


def _sample_functions(t):
    """Rule-B sampling at one position: value, position derivatives, scatter of a gradient."""
    real = t.real
    setup, corners, weights_of = t.border_clamped_setup, t.border_clamped_corners, t.bilinear_weights
    combine, gradient_of, atomic_add = t.bilinear_combine, t.bilinear_gradient, t.atomic_add

    @t.device
    def sample(input, plane, y, x, height, width, with_slopes):
        """(value, d/dy, d/dx) of rule B at (y, x) of the image whose element (0, 0) is
        ``input[plane]``; the derivatives are 0 along an axis whose clamp holds, outside, and
        unless ``with_slopes``."""
        inside, corner, row_step, col_step, ly, lx, slope_y, slope_x = setup(y, x, height, width)
        if not inside:
            return real(0), real(0), real(0)
        v00, v01, v10, v11 = corners(input, plane, corner, row_step, col_step)
        w00, w01, w10, w11 = weights_of(ly, lx, real(1))
        value = combine(v00, v01, v10, v11, w00, w01, w10, w11)
        if not with_slopes:
            return value, real(0), real(0)
        d_dy, d_dx = gradient_of(v00, v01, v10, v11, ly, lx)
        return value, slope_y * d_dy, slope_x * d_dx

    @t.device
    def scatter_sample(grad_input, plane, y, x, height, width, grad):
        """Add the gradient ``grad`` of the sample at (y, x) to its corners (the adjoint of
        :func:`sample`; coinciding clamped corners each get their weight)."""
        inside, corner, row_step, col_step, ly, lx, _, _ = setup(y, x, height, width)
        if inside:
            w00, w01, w10, w11 = weights_of(ly, lx, grad)
            at = plane + corner
            atomic_add(grad_input, at, w00)
            atomic_add(grad_input, at + col_step, w01)
            atomic_add(grad_input, at + row_step, w10)
            atomic_add(grad_input, at + row_step + col_step, w11)

    return sample, scatter_sample


def _max_rule(t):
    @t.device
    def takes_over_max(value, best):
        """Whether ``value`` takes over as the maximum from ``best``: it is larger, or NaN while
        ``best`` is not. A NaN in a bin makes its maximum NaN (as torch's max_pool2d) and the
        first NaN is the arg-max (as NumPy's argmax), which the gradient reaches."""
        return best == best and not (value <= best)

    return takes_over_max


def _grid_loops(t, samplers, position):
    """The loops over one bin's samples for a sampling scheme.

    A bin is ``grid = (top, left, size_h, size_w, grid_h, grid_w)``: ``grid_h x grid_w``
    samples, spread over the bin's size (roi_align) or spaced by it (deform_psroi_pool);
    ``position(grid, iy, ix, height, width)`` gives ``(counted, y, x)`` of sample (iy, ix):
    whether it takes part, and where it is read.
    """
    sample, scatter_sample = samplers
    real = t.real
    takes_over_max = _max_rule(t)

    @t.device
    def sums(input, plane, grid, height, width, with_slopes):
        """(sum of the counted samples, their number, sums of their d/dy and d/dx); the
        derivative sums are 0 unless ``with_slopes``."""
        value = real(0)
        count = 0
        sum_dy = real(0)
        sum_dx = real(0)
        for iy in range(grid[4]):
            for ix in range(grid[5]):
                counted, y, x = position(grid, iy, ix, height, width)
                if counted:
                    v, d_dy, d_dx = sample(input, plane, y, x, height, width, with_slopes)
                    value += v
                    count += 1
                    sum_dy += d_dy
                    sum_dx += d_dx
        return value, count, sum_dy, sum_dx

    @t.device
    def count_of(grid, height, width):
        """The number of counted samples (positions only; no read)."""
        count = 0
        for iy in range(grid[4]):
            for ix in range(grid[5]):
                counted, _, _ = position(grid, iy, ix, height, width)
                if counted:
                    count += 1
        return count

    @t.device
    def argmax(input, plane, grid, height, width):
        """(found, largest sample, its y, its x); the first one wins ties, NaN wins over
        everything (the first NaN), (False, 0, 0, 0) without samples."""
        found = False
        best = real(0)
        best_y = real(0)
        best_x = real(0)
        for iy in range(grid[4]):
            for ix in range(grid[5]):
                counted, y, x = position(grid, iy, ix, height, width)
                if counted:
                    value, _, _ = sample(input, plane, y, x, height, width, False)
                    if not found or takes_over_max(value, best):
                        found = True
                        best = value
                        best_y = y
                        best_x = x
        return found, best, best_y, best_x

    @t.device
    def scatter(grad_input, plane, grid, height, width, grad):
        """Add ``grad`` per counted sample to that sample's corners."""
        for iy in range(grid[4]):
            for ix in range(grid[5]):
                counted, y, x = position(grid, iy, ix, height, width)
                if counted:
                    scatter_sample(grad_input, plane, y, x, height, width, grad)

    return sums, count_of, argmax, scatter


def _element_functions(t):
    """Compile every family's element functions for ``t``; returns a dict keyed by family name
    of ``(forward, input_grad, params_grad, source_channel)``, and under "shared_bins", by
    family, the CPU forward of one bin for all channels from a channels-last input."""
    real, atomic_add = t.real, t.atomic_add
    setup, weights_of, combine = t.border_clamped_setup, t.bilinear_weights, t.bilinear_combine
    samplers = _sample_functions(t)
    scatter_sample = samplers[1]
    takes_over_max = _max_rule(t)

    @t.device
    def regular_position(grid, iy, ix, height, width):
        """roi_align's sample (iy, ix) of a bin: y = top + (iy + 0.5) * bin_h / gh (the
        order of operations of docs/roi.md), always counted."""
        return (True, grid[0] + (real(iy) + real(0.5)) * grid[2] / real(grid[4]),
                grid[1] + (real(ix) + real(0.5)) * grid[3] / real(grid[5]))

    @t.device
    def skip_clamp_position(grid, iy, ix, height, width):
        """deform_psroi_pool's sample: y = top + iy * sub_h, skipped outside [-0.5, H - 0.5]
        (a NaN too) and clamped into [0, H - 1]; same for x."""
        y = grid[0] + real(iy) * grid[2]
        x = grid[1] + real(ix) * grid[3]
        half = real(0.5)
        if not (y >= -half and y <= real(height) - half and x >= -half and x <= real(width) - half):
            return False, real(0), real(0)
        return True, min(max(y, real(0)), real(height - 1)), min(max(x, real(0)), real(width - 1))

    aligned_sums, aligned_count, aligned_argmax, aligned_scatter = _grid_loops(t, samplers, regular_position)
    ps_sums, ps_count, _, ps_scatter = _grid_loops(t, samplers, skip_clamp_position)

    @t.device
    def plane_of(k, channel, rois, shape, scale):
        """Flat index of element (0, 0) of the input plane (batch index of roi k, channel);
        -1 for an invalid roi, whose outputs are 0 and which is never read: a batch index that
        is not an integer in [0, N) or a non-finite coordinate (the Python side rejects such
        rows unless the call skips the host check, see pydeform._arrays.unchecked_values), or a
        corner that, times ``scale``, is beyond COORDINATE_LIMIT (a finite box can overflow once
        scaled). Within the limit every bin size and sample count is finite and exact."""
        b = rois[5 * k]
        if not (b >= real(0) and b < real(shape[_N]) and b == real(math.floor(b))):
            return -1
        for q in range(1, 5):
            scaled = rois[5 * k + q] * scale
            if not (scaled >= -real(COORDINATE_LIMIT) and scaled <= real(COORDINATE_LIMIT)):  # NaN fails too
                return -1
        return (int(b) * shape[_C] + channel) * shape[_H] * shape[_W]

    @t.device
    def cell_channel(c, ph, pw, pooled_h, pooled_w, position_sensitive):
        """Input channel of output channel c in bin (ph, pw): R-FCN's (c*PH + ph)*PW + pw."""
        if position_sensitive:
            return (c * pooled_h + ph) * pooled_w + pw
        return c

    @t.device
    def regular_grid(y1, x1, roi_h, roi_w, ph, pw, pooled_h, pooled_w, sampling_ratio):
        """Bin (ph, pw) of a roi with top-left (y1, x1): (top, left, bin_h, bin_w, gh, gw),
        adaptive gh = ceil(bin_h) clamped to [0, MAX_SAMPLES_PER_AXIS] (0 for an empty or
        negative roi)."""
        bin_h = roi_h / real(pooled_h)
        bin_w = roi_w / real(pooled_w)
        if sampling_ratio > 0:
            grid_h = sampling_ratio
            grid_w = sampling_ratio
        else:
            grid_h = min(max(int(math.ceil(bin_h)), 0), MAX_SAMPLES_PER_AXIS)
            grid_w = min(max(int(math.ceil(bin_w)), 0), MAX_SAMPLES_PER_AXIS)
        return y1 + real(ph) * bin_h, x1 + real(pw) * bin_w, bin_h, bin_w, grid_h, grid_w

    @t.device
    def no_params_grad(k, c, ph, pw, grad, input, rois, first, second, grad_first, grad_second, shape, params):
        """The ops without offset / mask / trans have no other gradient than the input's."""

    # roi_align / ps_roi_align. params: RoIAlignParams.

    @t.device
    def align_channel(c, ph, pw, params):
        return cell_channel(c, ph, pw, params[3], params[4], params[10])

    @t.device
    def align_grid(k, ph, pw, rois, params):
        _, _, _, pooled_h, pooled_w, _, scale, sampling_ratio, aligned, _, _ = params
        shift = real(0.5) if aligned else real(0)
        x1 = rois[5 * k + 1] * scale - shift
        y1 = rois[5 * k + 2] * scale - shift
        roi_w = rois[5 * k + 3] * scale - shift - x1
        roi_h = rois[5 * k + 4] * scale - shift - y1
        if not aligned:
            roi_w = max(roi_w, real(1))
            roi_h = max(roi_h, real(1))
        return regular_grid(y1, x1, roi_h, roi_w, ph, pw, pooled_h, pooled_w, sampling_ratio)

    @t.device
    def roi_align_forward(k, c, ph, pw, input, rois, first, second, shape, params):
        plane = plane_of(k, align_channel(c, ph, pw, params), rois, shape, params[6])
        if plane < 0:
            return real(0)
        height, width = shape[_H], shape[_W]
        grid = align_grid(k, ph, pw, rois, params)
        if params[9]:
            _, best, _, _ = aligned_argmax(input, plane, grid, height, width)
            return best
        value, count, _, _ = aligned_sums(input, plane, grid, height, width, False)
        return value / real(max(count, 1))

    @t.device
    def roi_align_bin_forward(k, ph, pw, input_hwc, rois, output, shape, params, per_channel):
        """Bin (ph, pw) of roi k for every channel of plain roi_align (not position-sensitive),
        from the channels-last copy ``input_hwc`` of the input (:mod:`.layout`).

        The bin's samples are the same in every channel: each sample is set up once and its four
        corners are read as runs of all C channels (SIMD loads). ``per_channel`` (C floats of the
        accumulation) carries each channel's sum or maximum over the samples; every channel sees
        the same samples in the same order and the same arithmetic as :func:`roi_align_forward`,
        so the results are identical."""
        channels, pooled_h, pooled_w = shape[_C_OUT], shape[_PH], shape[_PW]
        first_item = (k * channels * pooled_h + ph) * pooled_w + pw
        channel_stride = pooled_h * pooled_w
        # Image b's element (0, 0, 0) is at b*C*H*W in both layouts.
        base = plane_of(k, 0, rois, shape, params[6])
        if base < 0:
            for c in range(channels):
                output[first_item + c * channel_stride] = 0.0
            return
        height, width = shape[_H], shape[_W]
        max_mode = params[9]
        grid = align_grid(k, ph, pw, rois, params)
        grid_w = grid[5]
        count = grid[4] * grid_w
        per_channel[:] = 0.0
        for j in range(count):
            iy = j // grid_w
            _, y, x = regular_position(grid, iy, j - iy * grid_w, height, width)
            inside, corner, row_step, col_step, ly, lx, _, _ = setup(y, x, height, width)
            if not inside:
                # An outside sample reads 0.0: it adds nothing, but takes part in the max.
                for c in range(channels):
                    if not max_mode:
                        per_channel[c] += 0.0
                    elif j == 0 or takes_over_max(0.0, per_channel[c]):
                        per_channel[c] = 0.0
                continue
            w00, w01, w10, w11 = weights_of(ly, lx, 1.0)
            # Unsigned indices (the corners are inside the image): no negative-index wraparound
            # code, so the channel loops vectorise.
            at00 = np.uint64(base + corner * channels)
            at01 = at00 + np.uint64(col_step * channels)
            at10 = at00 + np.uint64(row_step * channels)
            at11 = at10 + np.uint64(col_step * channels)
            if not max_mode:
                for c in range(channels):
                    u = np.uint64(c)
                    per_channel[c] += combine(input_hwc[at00 + u], input_hwc[at01 + u], input_hwc[at10 + u],
                                              input_hwc[at11 + u], w00, w01, w10, w11)
            else:
                for c in range(channels):
                    u = np.uint64(c)
                    value = combine(input_hwc[at00 + u], input_hwc[at01 + u], input_hwc[at10 + u],
                                    input_hwc[at11 + u], w00, w01, w10, w11)
                    if j == 0 or takes_over_max(value, per_channel[c]):
                        per_channel[c] = value
        for c in range(channels):
            output[first_item + c * channel_stride] = per_channel[c] if max_mode else per_channel[c] / max(count, 1)

    @t.device
    def roi_align_input_grad(k, c, ph, pw, grad, input, rois, first, second, grad_input, shape, params):
        plane = plane_of(k, align_channel(c, ph, pw, params), rois, shape, params[6])
        if plane < 0:
            return
        height, width = shape[_H], shape[_W]
        grid = align_grid(k, ph, pw, rois, params)
        if params[9]:
            found, _, y, x = aligned_argmax(input, plane, grid, height, width)
            if found:
                scatter_sample(grad_input, plane, y, x, height, width, grad)
        else:
            aligned_scatter(grad_input, plane, grid, height, width,
                            grad / real(max(aligned_count(grid, height, width), 1)))

    # roi_pool / ps_roi_pool. params: RoIPoolParams.

    @t.device
    def half_away(v):
        """round-half-away-from-zero(v) (CUDA's round), exact: the fraction is compared with a
        half, so that no rounding of ``|v| + 0.5`` carries a value just below a half up."""
        magnitude = abs(v)
        if not (magnitude < real(_INTEGRAL_FROM)):
            return v
        rounded = real(math.floor(magnitude))
        if magnitude - rounded >= real(0.5):
            rounded += real(1)
        return rounded if v >= real(0) else -rounded

    @t.device
    def rounded_index(v):
        """round-half-away-from-zero(v) as an int, clamped to +-COORDINATE_LIMIT: a valid roi's
        scaled corners are within it, and the clamp keeps the conversion defined for the corners
        of an invalid one (whose window is never read)."""
        limit = real(COORDINATE_LIMIT)
        return int(half_away(min(max(v, -limit), limit)))

    @t.device
    def pool_channel(c, ph, pw, params):
        return cell_channel(c, ph, pw, params[3], params[4], params[7])

    @t.device
    def pool_window(k, ph, pw, rois, params):
        """(h0, h1, w0, w1): bin (ph, pw) is rows [h0, h1) x columns [w0, w1), clipped to the
        image. Bin edges floor(ph*rh/PH) and ceil((ph+1)*rh/PH) in exact integer arithmetic."""
        _, height, width, pooled_h, pooled_w, _, scale, position_sensitive = params
        # roi_pool's rounded box spans x2 - x1 + 1 pixels, ps_roi_pool's x2 - x1 (torchvision).
        extent = 0 if position_sensitive else 1
        x_start = rounded_index(rois[5 * k + 1] * scale)
        y_start = rounded_index(rois[5 * k + 2] * scale)
        roi_w = max(rounded_index(rois[5 * k + 3] * scale) - x_start + extent, 1)
        roi_h = max(rounded_index(rois[5 * k + 4] * scale) - y_start + extent, 1)
        h0 = min(max(ph * roi_h // pooled_h + y_start, 0), height)
        h1 = min(max(((ph + 1) * roi_h + pooled_h - 1) // pooled_h + y_start, 0), height)
        w0 = min(max(pw * roi_w // pooled_w + x_start, 0), width)
        w1 = min(max(((pw + 1) * roi_w + pooled_w - 1) // pooled_w + x_start, 0), width)
        return h0, h1, w0, w1

    @t.device
    def window_argmax(input, plane, h0, h1, w0, w1, width):
        """(largest element, its flat index) of the window, the first in row-major order on
        ties, NaN over everything (the first NaN); (0, -1) for an empty window."""
        best = real(0)
        arg = -1
        for h in range(h0, h1):
            for w in range(w0, w1):
                at = plane + h * width + w
                if arg < 0 or takes_over_max(input[at], best):
                    best = input[at]
                    arg = at
        return best, arg

    @t.device
    def roi_pool_forward(k, c, ph, pw, input, rois, first, second, shape, params):
        plane = plane_of(k, pool_channel(c, ph, pw, params), rois, shape, params[6])
        if plane < 0:
            return real(0)
        width = shape[_W]
        h0, h1, w0, w1 = pool_window(k, ph, pw, rois, params)
        if not params[7]:
            best, _ = window_argmax(input, plane, h0, h1, w0, w1, width)
            return best
        if h1 <= h0 or w1 <= w0:
            return real(0)
        value = real(0)
        for h in range(h0, h1):
            for w in range(w0, w1):
                value += input[plane + h * width + w]
        return value / real((h1 - h0) * (w1 - w0))

    @t.device
    def roi_pool_bin_forward(k, ph, pw, input_hwc, rois, output, shape, params, per_channel):
        """Bin (ph, pw) of roi k for every channel of plain roi_pool (not position-sensitive),
        from the channels-last copy ``input_hwc``: each window pixel's channels are one run
        (SIMD loads) compared with every channel's running maximum in ``per_channel`` at once.
        The same pixels in the same order and the same comparisons as :func:`roi_pool_forward`
        (first pixel, then ``takes_over_max``), so the results are identical."""
        channels, pooled_h, pooled_w = shape[_C_OUT], shape[_PH], shape[_PW]
        first_item = (k * channels * pooled_h + ph) * pooled_w + pw
        channel_stride = pooled_h * pooled_w
        base = plane_of(k, 0, rois, shape, params[6])  # image b's element (0, 0, 0), as for roi_align
        h0, h1, w0, w1 = pool_window(k, ph, pw, rois, params)
        if base < 0 or h1 <= h0 or w1 <= w0:
            for c in range(channels):
                output[first_item + c * channel_stride] = 0.0
            return
        width = shape[_W]
        for h in range(h0, h1):
            for w in range(w0, w1):
                at = np.uint64(base + (h * width + w) * channels)
                if h == h0 and w == w0:
                    for c in range(channels):
                        per_channel[c] = input_hwc[at + np.uint64(c)]
                else:
                    for c in range(channels):
                        value = input_hwc[at + np.uint64(c)]
                        if takes_over_max(value, per_channel[c]):
                            per_channel[c] = value
        for c in range(channels):
            output[first_item + c * channel_stride] = per_channel[c]

    @t.device
    def roi_pool_input_grad(k, c, ph, pw, grad, input, rois, first, second, grad_input, shape, params):
        plane = plane_of(k, pool_channel(c, ph, pw, params), rois, shape, params[6])
        if plane < 0:
            return
        width = shape[_W]
        h0, h1, w0, w1 = pool_window(k, ph, pw, rois, params)
        if not params[7]:
            _, arg = window_argmax(input, plane, h0, h1, w0, w1, width)
            if arg >= 0:
                atomic_add(grad_input, arg, grad)
        elif h1 > h0 and w1 > w0:
            share = grad / real((h1 - h0) * (w1 - w0))
            for h in range(h0, h1):
                for w in range(w0, w1):
                    atomic_add(grad_input, plane + h * width + w, share)

    # deform_roi_pool. params: DeformRoIPoolParams; first = offset, second = mask.

    @t.device
    def deform_channel(c, ph, pw, params):
        return c

    @t.device
    def deform_roi(k, ph, pw, rois, offset, params):
        """(y1, x1, roi_h, roi_w) of bin (ph, pw): the roi's start moved by
        roi size * gamma * offset[k, :, ph, pw] (x first)."""
        _, _, _, pooled_h, pooled_w, scale, _, gamma, has_offset, _ = params
        half = real(0.5)
        x1 = rois[5 * k + 1] * scale - half
        y1 = rois[5 * k + 2] * scale - half
        roi_w = rois[5 * k + 3] * scale - half - x1
        roi_h = rois[5 * k + 4] * scale - half - y1
        if has_offset:
            at = (2 * k * pooled_h + ph) * pooled_w + pw
            x1 += roi_w * (gamma * offset[at])
            y1 += roi_h * (gamma * offset[at + pooled_h * pooled_w])
        return y1, x1, roi_h, roi_w

    @t.device
    def deform_grid(k, ph, pw, rois, offset, params):
        y1, x1, roi_h, roi_w = deform_roi(k, ph, pw, rois, offset, params)
        return regular_grid(y1, x1, roi_h, roi_w, ph, pw, params[3], params[4], params[6])

    @t.device
    def deform_sample_grad(k, ph, pw, grad, mask, count, params):
        """The gradient of each of the ``count`` samples of bin (ph, pw): the output is
        mask * (sum of samples) / count."""
        value = grad / real(max(count, 1))
        if params[9]:
            value *= mask[(k * params[3] + ph) * params[4] + pw]
        return value

    @t.device
    def deform_roi_pool_forward(k, c, ph, pw, input, rois, offset, mask, shape, params):
        plane = plane_of(k, c, rois, shape, params[5])
        if plane < 0:
            return real(0)
        grid = deform_grid(k, ph, pw, rois, offset, params)
        value, count, _, _ = aligned_sums(input, plane, grid, shape[_H], shape[_W], False)
        value /= real(max(count, 1))
        if params[9]:
            value *= mask[(k * params[3] + ph) * params[4] + pw]
        return value

    @t.device
    def deform_roi_pool_input_grad(k, c, ph, pw, grad, input, rois, offset, mask, grad_input, shape, params):
        plane = plane_of(k, c, rois, shape, params[5])
        if plane < 0:
            return
        height, width = shape[_H], shape[_W]
        grid = deform_grid(k, ph, pw, rois, offset, params)
        count = aligned_count(grid, height, width)
        aligned_scatter(grad_input, plane, grid, height, width, deform_sample_grad(k, ph, pw, grad, mask, count, params))

    @t.device
    def deform_roi_pool_params_grad(k, c, ph, pw, grad, input, rois, offset, mask, grad_offset, grad_mask, shape,
                                    params):
        plane = plane_of(k, c, rois, shape, params[5])
        if plane < 0:
            return
        height, width = shape[_H], shape[_W]
        pooled_h, pooled_w, gamma, has_offset, has_mask = params[3], params[4], params[7], params[8], params[9]
        grid = deform_grid(k, ph, pw, rois, offset, params)
        value, count, sum_dy, sum_dx = aligned_sums(input, plane, grid, height, width, has_offset)
        if has_offset:
            _, _, roi_h, roi_w = deform_roi(k, ph, pw, rois, offset, params)
            grad_sample = deform_sample_grad(k, ph, pw, grad, mask, count, params)
            at = (2 * k * pooled_h + ph) * pooled_w + pw
            atomic_add(grad_offset, at, gamma * roi_w * grad_sample * sum_dx)
            atomic_add(grad_offset, at + pooled_h * pooled_w, gamma * roi_h * grad_sample * sum_dy)
        if has_mask:
            atomic_add(grad_mask, (k * pooled_h + ph) * pooled_w + pw, grad * value / real(max(count, 1)))

    # deform_psroi_pool. params: DeformPSRoIPoolParams; first = trans.

    @t.device
    def psroi_channel(c, ph, pw, params):
        """Input channel (c*gs + gh)*gs + gw, group cell gh = floor(ph*gs/P) (at most gs-1)."""
        group_size, pooled = params[4], params[5]
        group_h = min(ph * group_size // pooled, group_size - 1)
        group_w = min(pw * group_size // pooled, group_size - 1)
        return (c * group_size + group_h) * group_size + group_w

    @t.device
    def psroi_bin(k, c, ph, pw, rois, trans, params):
        """(top, left, sub_h, sub_w, roi_h, roi_w, flat index of the x trans or -1 without trans)
        of bin (ph, pw) of output channel c; part cell floor(ph*part_size/P) in integer
        arithmetic. (Flat: Numba's parfor analysis trips over nested tuples.)"""
        _, _, _, output_dim, _, pooled, part_size, samples, trans_std, scale, classes, has_trans = params
        half, one, least = real(0.5), real(1), real(0.1)
        x1 = half_away(rois[5 * k + 1]) * scale - half
        y1 = half_away(rois[5 * k + 2]) * scale - half
        roi_w = max((half_away(rois[5 * k + 3]) + one) * scale - half - x1, least)
        roi_h = max((half_away(rois[5 * k + 4]) + one) * scale - half - y1, least)
        bin_w = roi_w / real(pooled)
        bin_h = roi_h / real(pooled)
        left = real(pw) * bin_w + x1
        top = real(ph) * bin_h + y1
        at = -1
        if has_trans:
            class_id = c // (output_dim // classes)
            at = ((k * classes + class_id) * 2 * part_size + ph * part_size // pooled) * part_size
            at += pw * part_size // pooled
            left += trans[at] * trans_std * roi_w
            top += trans[at + part_size * part_size] * trans_std * roi_h
        return top, left, bin_h / real(samples), bin_w / real(samples), roi_h, roi_w, at

    @t.device
    def psroi_grid(k, c, ph, pw, rois, trans, params):
        top, left, sub_h, sub_w, _, _, _ = psroi_bin(k, c, ph, pw, rois, trans, params)
        return top, left, sub_h, sub_w, params[7], params[7]

    @t.device
    def deform_psroi_pool_forward(k, c, ph, pw, input, rois, trans, second, shape, params):
        plane = plane_of(k, psroi_channel(c, ph, pw, params), rois, shape, params[9])
        if plane < 0:
            return real(0)
        grid = psroi_grid(k, c, ph, pw, rois, trans, params)
        value, count, _, _ = ps_sums(input, plane, grid, shape[_H], shape[_W], False)
        return value / real(max(count, 1))

    @t.device
    def deform_psroi_pool_input_grad(k, c, ph, pw, grad, input, rois, trans, second, grad_input, shape, params):
        plane = plane_of(k, psroi_channel(c, ph, pw, params), rois, shape, params[9])
        if plane < 0:
            return
        height, width = shape[_H], shape[_W]
        grid = psroi_grid(k, c, ph, pw, rois, trans, params)
        ps_scatter(grad_input, plane, grid, height, width, grad / real(max(ps_count(grid, height, width), 1)))

    @t.device
    def deform_psroi_pool_params_grad(k, c, ph, pw, grad, input, rois, trans, second, grad_trans, grad_second, shape,
                                      params):
        plane = plane_of(k, psroi_channel(c, ph, pw, params), rois, shape, params[9])
        if plane < 0 or not params[11]:
            return
        height, width = shape[_H], shape[_W]
        top, left, sub_h, sub_w, roi_h, roi_w, at = psroi_bin(k, c, ph, pw, rois, trans, params)
        grid = (top, left, sub_h, sub_w, params[7], params[7])
        _, count, sum_dy, sum_dx = ps_sums(input, plane, grid, height, width, True)
        grad_sample = grad / real(max(count, 1))
        trans_std, part_size = params[8], params[6]
        atomic_add(grad_trans, at, trans_std * roi_w * grad_sample * sum_dx)
        atomic_add(grad_trans, at + part_size * part_size, trans_std * roi_h * grad_sample * sum_dy)

    return {
        "shared_bins": {"roi_align": roi_align_bin_forward, "roi_pool": roi_pool_bin_forward},
        "roi_align": (roi_align_forward, roi_align_input_grad, no_params_grad, align_channel),
        "roi_pool": (roi_pool_forward, roi_pool_input_grad, no_params_grad, pool_channel),
        "deform_roi_pool": (deform_roi_pool_forward, deform_roi_pool_input_grad, deform_roi_pool_params_grad,
                            deform_channel),
        "deform_psroi_pool": (deform_psroi_pool_forward, deform_psroi_pool_input_grad,
                              deform_psroi_pool_params_grad, psroi_channel),
    }


def _split_function(t):
    @t.device
    def split(item, shape):
        """Output element ``item`` -> (k, c, ph, pw)."""
        pw = item % shape[_PW]
        rest = item // shape[_PW]
        ph = rest % shape[_PH]
        rest //= shape[_PH]
        return rest // shape[_C_OUT], rest % shape[_C_OUT], ph, pw

    return split


@functools.lru_cache(maxsize=None)
def _cpu_functions():
    t = cpu_target()
    return _element_functions(t), _split_function(t)


@functools.lru_cache(maxsize=None)
def _cuda_functions(dtype):
    t = cuda_target(dtype)
    return _element_functions(t), _split_function(t)


class CpuKernels:
    """A family's CPU kernels: ``forward``, and the two backward passes ``input_pass`` (tasks
    own an input plane) and ``params_pass`` (tasks own a roi)."""

    def __init__(self, family: str):
        from numba import prange

        elements, split = _cpu_functions()
        forward, input_grad, params_grad, source_channel = elements[family]
        shared_bin = elements["shared_bins"].get(family)

        @cpu_kernel
        def forward_kernel(input, rois, first, second, output, shape, params, n_items):
            for item in prange(n_items):
                k, c, ph, pw = split(item, shape)
                output[item] = forward(k, c, ph, pw, input, rois, first, second, shape, params)

        @cpu_kernel
        def shared_bin_forward(input_hwc, rois, output, shape, params, n_rows):
            # One task per row of bins of a roi, each bin's set-up shared by all channels.
            pooled_h, pooled_w = shape[_PH], shape[_PW]
            for task in prange(n_rows):
                k = task // pooled_h
                ph = task - k * pooled_h
                per_channel = np.empty(shape[_C_OUT])
                for pw in range(pooled_w):
                    shared_bin(k, ph, pw, input_hwc, rois, output, shape, params, per_channel)

        @cpu_kernel
        def input_pass(grad_output, input, rois, first, second, grad_input, shape, params, n_rois):
            channels, channels_out = shape[_C], shape[_C_OUT]
            pooled_h, pooled_w = shape[_PH], shape[_PW]
            readers = channels // channels_out  # input channels per output channel
            for task in prange(shape[_N] * channels):
                b = task // channels
                c_in = task - b * channels
                c = c_in // readers
                for k in range(n_rois):
                    if rois[5 * k] != b:
                        continue
                    for ph in range(pooled_h):
                        for pw in range(pooled_w):
                            if source_channel(c, ph, pw, params) == c_in:
                                item = ((k * channels_out + c) * pooled_h + ph) * pooled_w + pw
                                input_grad(k, c, ph, pw, grad_output[item], input, rois, first, second, grad_input,
                                           shape, params)

        @cpu_kernel
        def params_pass(grad_output, input, rois, first, second, grad_first, grad_second, shape, params, n_rois):
            per_roi = shape[_C_OUT] * shape[_PH] * shape[_PW]
            for k in prange(n_rois):
                for item in range(k * per_roi, (k + 1) * per_roi):
                    _, c, ph, pw = split(item, shape)
                    params_grad(k, c, ph, pw, grad_output[item], input, rois, first, second, grad_first, grad_second,
                                shape, params)

        self.forward, self.input_pass, self.params_pass = forward_kernel, input_pass, params_pass
        # None for the families without one; _reads_channels_last says when the forward uses it.
        self.shared_bin_forward = None if shared_bin is None else shared_bin_forward


@functools.lru_cache(maxsize=None)
def cpu_kernels(family: str) -> CpuKernels:
    return CpuKernels(family)


@functools.lru_cache(maxsize=None)
def cuda_kernels(family: str, dtype):
    """A family's CUDA kernels ``(forward, backward)`` computing in ``dtype`` (the accumulation
    dtype), one thread per output element."""
    global cuda
    cuda = bind_cuda()

    elements, split = _cuda_functions(dtype)
    forward, input_grad, params_grad, _ = elements[family]

    @cuda_kernel
    def forward_kernel(input, rois, first, second, output, shape, params, n_items):
        for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            k, c, ph, pw = split(item, shape)
            output[item] = forward(k, c, ph, pw, input, rois, first, second, shape, params)

    @cuda_kernel
    def backward_kernel(grad_output, input, rois, first, second, grad_input, grad_first, grad_second, shape, params,
                        n_items):
        for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            k, c, ph, pw = split(item, shape)
            grad = grad_output[item]
            input_grad(k, c, ph, pw, grad, input, rois, first, second, grad_input, shape, params)
            params_grad(k, c, ph, pw, grad, input, rois, first, second, grad_first, grad_second, shape, params)

    return forward_kernel, backward_kernel


# The deterministic backward (pydeform._contributions; the layout: RoIContributionLayout). Its
# lists and partials kernels run the element functions of the atomic backward compiled with
# another scatter: ``atomic_add(sink, index, value)`` lists a contribution to input element
# ``index`` (the input gradient) or keeps an output element's share of the offset / mask /
# trans gradients (the partials), where ``sink`` travels in place of the gradient array.


def _bucket_function(t):
    @t.device
    def bucket_of(element, channels, plane_size, cells, class_step, classes):
        """The bucket of input element ``element`` (flat index into [N, C, H, W])."""
        plane = element // plane_size
        image = plane // channels
        channel = plane - image * channels
        key_class = channel // cells // class_step * cells + channel % cells
        return (image * classes + key_class) * plane_size + element - plane * plane_size

    return bucket_of


@functools.lru_cache(maxsize=None)
def _cuda_listing_functions(dtype):
    """The element functions whose scatter lists a contribution: ``sink = (cursors, items,
    locals_, weights, counter, (fill, item, C, H*W, cells, class_step, classes))``, ``counter``
    a one-element array numbering the item's contributions in call order (their ``local``)."""
    global cuda
    cuda = bind_cuda()
    t = cuda_target(dtype)
    add_contribution, _ = contributions.list_functions()
    bucket_of = _bucket_function(t)

    @t.device
    def list_contribution(sink, index, weight):
        cursors, items, locals_, weights, counter, keys = sink
        fill, item, channels, plane_size, cells, class_step, classes = keys
        local = counter[0]
        counter[0] = local + 1
        bucket = bucket_of(index, channels, plane_size, cells, class_step, classes)
        add_contribution(cursors, items, locals_, weights, fill, bucket, item, local, weight)

    return _element_functions(t._replace(atomic_add=list_contribution)), bucket_of


@functools.lru_cache(maxsize=None)
def _cuda_partial_functions(dtype):
    """The element functions whose scatter keeps a value in ``partials [components, outputs]``:
    ``sink = (partials, (item, outputs, first component, period, components))``; the value for
    gradient element ``index`` goes to component ``first + index // period % components`` (x / y
    are PH*PW apart in offset [K, 2, PH, PW], part_size**2 in trans [K, 2*classes, P, P])."""
    t = cuda_target(dtype)

    @t.device
    def keep_partial(sink, index, value):
        partials, keys = sink
        item, outputs, first_component, period, components = keys
        partials[(first_component + index // period % components) * outputs + item] += value

    return _element_functions(t._replace(atomic_add=keep_partial))


@functools.lru_cache(maxsize=None)
def cuda_deterministic_kernels(family: str, dtype):
    """A family's kernels of the deterministic backward ``(lists, gather, partials, params_sum)``
    computing in ``dtype`` (the accumulation dtype); the last two None for the families without
    offset / mask / trans."""
    global cuda
    cuda = bind_cuda()

    listing, bucket_of = _cuda_listing_functions(dtype)
    input_grad = listing[family][1]
    _, bucket_span = contributions.list_functions()
    split = _cuda_functions(dtype)[1]

    @cuda_kernel
    def lists_kernel(input, rois, first, second, cursors, items, locals_, weights, one, fill, shape, params, layout,
                     n_items):
        # One work item per position item (k, q, ph, pw): output element (k, q * position_step,
        # ph, pw)'s input gradient for a grad_output of one, listed.
        position_channels, position_step, cells, class_step, classes = layout
        bins = shape[_PH] * shape[_PW]
        counter = cuda.local.array(1, np.int64)
        for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            cell = item % bins
            rest = item // bins
            k = rest // position_channels
            ph = cell // shape[_PW]
            counter[0] = 0
            sink = (cursors, items, locals_, weights, counter,
                    (fill, item, shape[_C], shape[_H] * shape[_W], cells, class_step, classes))
            input_grad(k, (rest - k * position_channels) * position_step, ph, cell - ph * shape[_PW], one, input,
                       rois, first, second, sink, shape, params)

    @cuda_kernel
    def gather_kernel(bucket_ends, items, weights, grad_output, grad_input, shape, layout, n_items):
        # grad_input[image, c, pixel] = the sum, in list order, of weight * grad_output[k, c_out,
        # ph, pw] over the position items (k, q, ph, pw) of its bucket's list, c_out the output
        # channel that reads c; every element written.
        position_channels, _, cells, class_step, classes = layout
        channels, channels_out = shape[_C], shape[_C_OUT]
        plane_size = shape[_H] * shape[_W]
        bins = shape[_PH] * shape[_PW]
        readers = channels // channels_out  # input channels per output channel
        for element in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            first, end = bucket_span(bucket_ends, bucket_of(element, channels, plane_size, cells, class_step, classes))
            source_channel = element // plane_size % channels // readers
            total = grad_input.dtype.type(0)
            for slot in range(first, end):
                item = items[slot]
                roi = item // (bins * position_channels)
                total += weights[slot] * grad_output[(roi * channels_out + source_channel) * bins + item % bins]
            grad_input[element] = total

    if family not in ("deform_roi_pool", "deform_psroi_pool"):
        return lists_kernel, gather_kernel, None, None
    params_grad = _cuda_partial_functions(dtype)[family][2]

    @cuda_kernel
    def partials_kernel(grad_output, input, rois, first, second, partials, first_period, shape, params, n_items):
        # partials[component, item]: output element item's share of the gradient component
        # (offset x, y, mask; trans x, y), 0 where it has none.
        components = partials.size // n_items
        zero = partials.dtype.type(0)
        for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            for component in range(components):
                partials[component * n_items + item] = zero
            k, c, ph, pw = split(item, shape)
            params_grad(k, c, ph, pw, grad_output[item], input, rois, first, second,
                        (partials, (item, n_items, 0, first_period, 2)), (partials, (item, n_items, 2, 1, 1)),
                        shape, params)

    if family == "deform_roi_pool":
        @cuda_kernel
        def params_sum_kernel(partials, grad_offset, grad_mask, shape, params, n_items):
            # grad_offset / grad_mask element (k, x|y|mask, ph, pw) = the sum over channels, in
            # channel order, of the partials; one work item per (k, component, bin), those of
            # an absent offset / mask skipped, the others all written.
            has_offset, has_mask = params[8], params[9]
            channels = shape[_C_OUT]
            bins = shape[_PH] * shape[_PW]
            outputs = n_items // 3 * channels
            for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
                cell = item % bins
                component = item // bins % 3
                roi = item // (3 * bins)
                if (component < 2 and has_offset) or (component == 2 and has_mask):
                    at = component * outputs + roi * channels * bins + cell
                    total = partials.dtype.type(0)
                    for c in range(channels):
                        total += partials[at + c * bins]
                    if component < 2:
                        grad_offset[(2 * roi + component) * bins + cell] = total
                    else:
                        grad_mask[roi * bins + cell] = total
    else:
        @cuda_kernel
        def params_sum_kernel(partials, grad_trans, unused, shape, params, n_items):
            # grad_trans element (k, 2*class + x|y, part_h, part_w) = the sum, in (channel, ph,
            # pw) order, of the partials of the class's channels and the bins of that part cell
            # (part cell floor(ph * part_size / P), as the bins compute it); every element written.
            part_size, classes = params[6], params[10]
            channels_out, pooled = shape[_C_OUT], shape[_PH]
            part_cells = part_size * part_size
            class_channels = channels_out // classes
            outputs = n_items // (2 * classes * part_cells) * channels_out * pooled * pooled
            for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
                cell = item % part_cells
                part_h = cell // part_size
                part_w = cell - part_h * part_size
                component = item // part_cells % 2
                class_id = item // (2 * part_cells) % classes
                roi = item // (2 * classes * part_cells)
                at = component * outputs + (roi * channels_out + class_id * class_channels) * pooled * pooled
                total = partials.dtype.type(0)
                for c in range(class_channels):
                    for ph in range(pooled):
                        if ph * part_size // pooled == part_h:
                            for pw in range(pooled):
                                if pw * part_size // pooled == part_w:
                                    total += partials[at + (c * pooled + ph) * pooled + pw]
                grad_trans[item] = total

    return lists_kernel, gather_kernel, partials_kernel, params_sum_kernel


def _shape(input, output) -> tuple:
    """``shape`` of the kernels: (N, C, H, W) of the input, (C_out, PH, PW) of the output."""
    return tuple(int(s) for s in input.shape) + tuple(int(s) for s in output.shape[1:])


class _RoIKernelSet:
    """The kernel-set interface of :mod:`pydeform.roi`, mapped onto one forward and one backward
    entry point per family. The optional arrays travel as ``extras``, ``{name: array or None}``
    (offset and mask, or trans): subclasses name their scratch after them, and pass absent ones
    to the kernels as stand-ins that are never read."""

    def roi_align_forward(self, input, rois, output, params):
        self._forward("roi_align", input, rois, {}, output, params)

    def roi_align_backward(self, grad_output, input, rois, grad_input, params):
        self._backward("roi_align", grad_output, input, rois, {}, grad_input, (), params)

    def roi_pool_forward(self, input, rois, output, params):
        self._forward("roi_pool", input, rois, {}, output, params)

    def roi_pool_backward(self, grad_output, input, rois, grad_input, params):
        self._backward("roi_pool", grad_output, input, rois, {}, grad_input, (), params)

    def deform_roi_pool_forward(self, input, rois, offset, mask, output, params):
        self._forward("deform_roi_pool", input, rois, {"offset": offset, "mask": mask}, output, params)

    def deform_roi_pool_backward(self, grad_output, input, rois, offset, mask, grad_input, grad_offset, grad_mask,
                                 params):
        self._backward("deform_roi_pool", grad_output, input, rois, {"offset": offset, "mask": mask}, grad_input,
                       (grad_offset, grad_mask), params)

    def deform_psroi_pool_forward(self, input, rois, trans, output, params):
        self._forward("deform_psroi_pool", input, rois, {"trans": trans}, output, params)

    def deform_psroi_pool_backward(self, grad_output, input, rois, trans, grad_input, grad_trans, params):
        self._backward("deform_psroi_pool", grad_output, input, rois, {"trans": trans}, grad_input, (grad_trans,),
                       params)

    def _stand_ins(self, arrays, like):
        """Flat views of the two kernel arguments ``first`` and ``second`` from ``arrays`` (at
        most two, missing ones None), a one-element array of ``like``'s dtype for each None. Not
        a view of another argument: a host array passed to a CUDA kernel (the simulator) is
        copied back after the launch, and an untouched alias would overwrite the real result."""
        arrays = (*arrays, None, None)[:2]
        return tuple(flat(self.xp.zeros(1, like.dtype) if a is None else a) for a in arrays)


def _reads_channels_last(family: str, params) -> bool:
    """Whether the CPU forward of ``family`` reads a channels-last copy of the input: plain
    roi_align and roi_pool share each bin's set-up across channels (position-sensitive bins read
    one channel each, nothing to share)."""
    return family in ("roi_align", "roi_pool") and not params.position_sensitive


class NumbaCpuRoIKernels(_RoIKernelSet):
    """RoI kernels for NumPy arrays, parallel with ``numba.prange``."""

    xp = np

    @staticmethod
    def workspace(family: str, params, shapes: dict, dtype, *, backward: bool) -> dict:
        """This kernel set's own scratch, ``{slot: (shape, dtype)}``: the channels-last input
        copy the forwards of plain roi_align and roi_pool read (``shapes["input"]`` its shape);
        nothing else."""
        if backward or not _reads_channels_last(family, params):
            return {}
        return {"input_hwc": ((math.prod(shapes["input"]),), np.dtype(dtype))}

    # Every task of the backward's passes owns what it writes and adds in a fixed order, and the
    # tasks depend on the shapes only (not on the thread count): its bits are the same in every
    # run already, so the deterministic backward is the backward.
    roi_align_backward_deterministic = _RoIKernelSet.roi_align_backward
    roi_pool_backward_deterministic = _RoIKernelSet.roi_pool_backward
    deform_roi_pool_backward_deterministic = _RoIKernelSet.deform_roi_pool_backward
    deform_psroi_pool_backward_deterministic = _RoIKernelSet.deform_psroi_pool_backward

    @staticmethod
    def deterministic_workspace(family: str, params, shapes: dict, dtype) -> dict:
        """Nothing beyond the backward's own buffers."""
        return {}

    def _forward(self, family, input, rois, extras, output, params):
        kernels, shape = cpu_kernels(family), _shape(input, output)
        if _reads_channels_last(family, params):
            plan = self.workspace(family, params, {"input": input.shape}, input.dtype, backward=False)
            input_hwc = channels_last(input, scratch(np, "input_hwc", *plan["input_hwc"]))
            rows = rois.shape[0] * params.pooled_h
            kernels.shared_bin_forward(input_hwc, flat(rois), flat(output), shape, tuple(params), rows)
            return
        first, second = self._stand_ins(extras.values(), input)
        kernels.forward(flat(input), flat(rois), first, second, flat(output), shape, tuple(params), output.size)

    def _backward(self, family, grad_output, input, rois, extras, grad_input, grad_extras, params):
        reads = (flat(grad_output), flat(input), flat(rois), *self._stand_ins(extras.values(), input))
        shape, params, n_rois = _shape(input, grad_output), tuple(params), rois.shape[0]
        kernels = cpu_kernels(family)
        kernels.input_pass(*reads, flat(grad_input), shape, params, n_rois)
        if any(g is not None for g in grad_extras):
            kernels.params_pass(*reads, *self._stand_ins(grad_extras, grad_input), shape, params, n_rois)


class NumbaCudaRoIKernels(_RoIKernelSet):
    """RoI kernels compiled with ``numba.cuda.jit`` for CuPy arrays.

    float16 / bfloat16 arrays are converted to float32 on the device before a launch (into the
    scratch slots :meth:`workspace` plans) and a float16 / bfloat16 output is written back from
    float32, so the arithmetic is float32. With ``xp=numpy`` the kernels run on host arrays
    under the CUDA simulator.
    """

    def __init__(self, xp=None):
        if xp is None:
            import cupy as xp
        self.xp = xp

    @staticmethod
    def workspace(family: str, params, shapes: dict, dtype, *, backward: bool) -> dict:
        """float32 copies, for half types, of the arrays the kernels read (``shapes``: input,
        output and the present extras) and of the forward's output; nothing otherwise."""
        copies = {name: shape for name, shape in shapes.items() if name != "output"}
        copies["grad_output" if backward else "output"] = shapes["output"]
        return accumulator_plans(copies, dtype)

    @staticmethod
    def deterministic_workspace(family: str, params, shapes: dict, dtype) -> dict:
        """The scratch of the ``*_backward_deterministic`` method of ``family`` (``shapes`` as
        for :meth:`workspace`); raises ValueError where its size depends on the boxes."""
        return roi_lists_plan(family, params, shapes, dtype)

    def roi_align_backward_deterministic(self, grad_output, input, rois, grad_input, params):
        self._deterministic_backward("roi_align", grad_output, input, rois, {}, grad_input, (), params)

    def roi_pool_backward_deterministic(self, grad_output, input, rois, grad_input, params):
        self._deterministic_backward("roi_pool", grad_output, input, rois, {}, grad_input, (), params)

    def deform_roi_pool_backward_deterministic(self, grad_output, input, rois, offset, mask, grad_input, grad_offset,
                                               grad_mask, params):
        self._deterministic_backward("deform_roi_pool", grad_output, input, rois, {"offset": offset, "mask": mask},
                                     grad_input, (grad_offset, grad_mask), params)

    def deform_psroi_pool_backward_deterministic(self, grad_output, input, rois, trans, grad_input, grad_trans,
                                                 params):
        self._deterministic_backward("deform_psroi_pool", grad_output, input, rois, {"trans": trans}, grad_input,
                                     (grad_trans,), params)

    def _deterministic_backward(self, family, grad_output, input, rois, extras, grad_input, grad_extras, params):
        """The gradients from sorted contribution lists (the input's) and from per-output
        partials summed in a fixed order (offset / mask / trans); every element written."""
        xp = self.xp
        grad_output, input, *extras = converted_arrays(xp, {"grad_output": grad_output, "input": input, **extras})
        reads = (flat(input), flat(rois), *self._stand_ins(extras, input))
        acc = accumulation_dtype(input.dtype)
        shape, params_tuple = _shape(input, grad_output), typed_floats(params, acc)
        layout = roi_contribution_layout(family, input.shape, rois.shape[0], params)
        keys = (layout.position_channels, layout.position_step, layout.cells, layout.class_step, layout.classes)
        lists_kernel, gather_kernel, partials_kernel, params_sum_kernel = cuda_deterministic_kernels(family, acc)

        def lists_step(cursors, items, locals_, weights, fill):
            launch_cuda(lists_kernel, layout.position_items, xp, *reads, cursors, items, locals_, weights, acc.type(1),
                        np.int64(fill), shape, params_tuple, keys, layout.position_items)

        def sort_step(ends, *entries):
            launch_cuda(contributions.sort_kernel(), ends.size, xp, ends, *entries, ends.size)

        lists = contribution_lists(
            xp, layout.buckets, layout.capacity, acc,
            lambda counts: lists_step(counts, *contributions.stand_ins(xp, acc), False),
            lambda cursors, *entries: lists_step(cursors, *entries, True),
            sort_step,
        )
        launch_cuda(gather_kernel, grad_input.size, xp, lists.bucket_ends, lists.item, lists.weight,
                    flat(grad_output), flat(grad_input), shape, keys, grad_input.size)
        if all(g is None for g in grad_extras):
            return
        partials = scratch(xp, "param_partials", roi_param_partials_shape(family, grad_output.size), acc)
        # x and y of one gradient element are PH*PW (offset) / part_size**2 (trans) elements apart.
        period = shape[_PH] * shape[_PW] if family == "deform_roi_pool" else params.part_size ** 2
        launch_cuda(partials_kernel, grad_output.size, xp, flat(grad_output), *reads, flat(partials), period, shape,
                    params_tuple, grad_output.size)
        if family == "deform_roi_pool":
            n_sums = rois.shape[0] * 3 * shape[_PH] * shape[_PW]
        else:
            n_sums = grad_extras[0].size
        launch_cuda(params_sum_kernel, n_sums, xp, flat(partials), *self._stand_ins(grad_extras, grad_input), shape,
                    params_tuple, n_sums)

    def _launch(self, family, backward, n_items, *args):
        """Launch a family's kernel on ``args``, the last one the param record: the kernel built
        for the dtype of the first argument (input or grad_output, converted: the accumulation
        dtype), with the float fields of the record in that dtype."""
        *arrays, params = args
        dtype = arrays[0].dtype
        launch_cuda(cuda_kernels(family, dtype)[backward], n_items, self.xp, *arrays, typed_floats(params, dtype),
                    n_items)

    def _forward(self, family, input, rois, extras, output, params):
        input, *extras = converted_arrays(self.xp, {"input": input, **extras})
        (computed,) = converted_arrays(self.xp, {"output": output})
        self._launch(family, False, output.size, flat(input), flat(rois), *self._stand_ins(extras, input),
                     flat(computed), _shape(input, output), params)
        if computed is not output:
            output[...] = computed

    def _backward(self, family, grad_output, input, rois, extras, grad_input, grad_extras, params):
        grad_output, input, *extras = converted_arrays(
            self.xp, {"grad_output": grad_output, "input": input, **extras})
        self._launch(
            family, True, grad_output.size,
            flat(grad_output), flat(input), flat(rois), *self._stand_ins(extras, input),
            flat(grad_input), *self._stand_ins(grad_extras, grad_input), _shape(input, grad_output), params,
        )
