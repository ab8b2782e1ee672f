"""deform_conv2d kernels for Numba: the per-sample arithmetic once, compiled for CPU and CUDA.

A *sample* is one (image b, offset group g, kernel point ij, output pixel p = y*Wo + x),
numbered ``item = ((b*Goff + g)*kh*kw + ij)*Ho*Wo + p``; it is shared by the C/Goff channels
of group g. Its *plan* is computed once: the flat index of its top-left corner, the set of
corners inside the image and the four bilinear weights with the mask folded in.

- CUDA: one thread per sample keeps the plan in registers and loops over the group's channels
  (gather for im2col, atomic scatter for the input gradient).
- CPU forward (direct, no column buffer): a task takes a tile of output pixels of one image,
  samples them for every kernel point from the channels-last input copy into a buffer that
  stays in the core's L2 cache (values[t, (weight group, ij, c)]), and multiplies it by the
  weight right away, in blocks of 2 pixels x 4 output channels whose eight sums stay in
  registers over contiguous runs of values and weights (SIMD). The 19 MB column buffer of the
  CPU shape of docs/benchmarks.md is never written or read back, and no BLAS thread pool runs beside
  Numba's (on 2 cores the two pools took each other's cores: 14-17 ms with im2col + BLAS,
  7-8 ms direct).
- CPU im2col (the backward's weight gradient): the input is copied channels-last once
  (:mod:`.layout`); a task takes a tile of CPU_TILE_PIXELS output pixels of one kernel point
  (image, offset group, ij), sets up each
  sample's plan once (stepping along the pixels without divisions) and reads its four corners
  for all the group's channels as contiguous runs (SIMD loads) into a small L1-resident
  buffer, which it then writes out transposed, as runs of pixels in each channel row of the
  column buffer.
- CPU col2im: the plans of a chunk are computed in parallel into arrays, then each task, owning
  a few channels of one (image, offset group), walks every sample of the group, loading each
  plan once for its channels. Its writes stay in a few image planes (channel planes are
  multiples of 4 KiB apart, so touching many channels per sample would thrash the cache sets),
  and since a task owns its channels the input-gradient scatter needs no atomics.

Kernels take flat (1-d) views of C-contiguous arrays (the direct forward: 2-d weight rows and
a 3-d output) with the layouts of the kernel-set interface in :mod:`pydeform.deform_conv`;
``geometry`` is a plain tuple of ints in the field order of
:class:`pydeform.deform_conv.DeformConv2dGeometry`.
"""

from __future__ import annotations

import functools

import numpy as np

from ..._arrays import accumulation_dtype
from ..._contributions import col2im_buckets, col2im_capacity, col2im_lists_plan, contribution_lists
from ..._workspace import accumulator_plans, converted_arrays, scratch
from . import contributions
from .layout import channels_last
from .targets import (
    bind_cuda, cpu_kernel, cpu_kernel_fast_sums, cpu_target, cuda_kernel, cuda_target, flat, launch_cuda,
)

# Output pixels per CPU im2col task (one kernel point of one image and offset group); the task's
# values buffer is CPU_TILE_PIXELS x C/Goff (16 KiB at C/Goff = 64 in float32: L1-resident).
CPU_TILE_PIXELS = 64

# Bytes of sampled values per task of the direct CPU forward: the tile is read once per block of
# 4 output channels, so it is kept within a core's L2 cache with room for the weight rows.
CPU_FORWARD_TILE_BYTES = 192 * 2**10

# Channels per CPU task: the task loads a sample's plan once for all of them. Four measured best
# on the CPU shape of docs/benchmarks.md (2, 8 and 16 were slower: more planes in flight per sample).
CPU_TASK_CHANNELS = 4

# numba.cuda once a CUDA kernel is built (see targets.bind_cuda for why a module global).
cuda = None


def _sample_functions(t):
    """Compile the per-sample functions for target ``t``."""
    real = t.real
    setup, weights_of, corners = t.zero_padded_setup, t.bilinear_weights, t.zero_padded_corners
    combine, gradient_of, atomic_add = t.bilinear_combine, t.bilinear_gradient, t.atomic_add

    @t.device
    def position(point_row, i, j, y, x, offset, geometry):
        """Sampling position (h, w) of kernel point (i, j) at output pixel (y, x) for the point
        row ``point_row = (b*Goff + g)*kh*kw + ij``, and the flat index of its y offset (the x
        offset follows Ho*Wo later)."""
        (_, _, _, _, _, _, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, _, _, out_h, out_w) = geometry
        pixels = out_h * out_w
        # offset channel of dy: (b*Goff + g)*2*kh*kw + 2*ij = 2*point_row; dx is the next one
        dy_index = 2 * point_row * pixels + y * out_w + x
        h = real(y * stride_h - pad_h + i * dil_h) + offset[dy_index]
        w = real(x * stride_w - pad_w + j * dil_w) + offset[dy_index + pixels]
        return h, w, dy_index

    @t.device
    def locate(item, offset, mask, has_mask, geometry):
        """Sample ``item`` -> (b*Goff + g, index k = ij*Ho*Wo + p within the group's block,
        h, w, mask value, flat index of its y offset)."""
        kernel_w, out_w = geometry[5], geometry[15]
        pixels = geometry[14] * out_w
        p = item % pixels
        y = p // out_w
        point_row = item // pixels
        points = geometry[4] * kernel_w
        ij = point_row % points
        i = ij // kernel_w
        h, w, dy_index = position(point_row, i, ij - i * kernel_w, y, p - y * out_w, offset, geometry)
        m = mask[item] if has_mask else real(1)
        return point_row // points, ij * pixels + p, h, w, m, dy_index

    @t.device
    def plan(item, offset, mask, has_mask, geometry):
        """Sample ``item`` -> (b*Goff + g, k, corner, inside, w00, w01, w10, w11)."""
        group_row, k, h, w, m, _ = locate(item, offset, mask, has_mask, geometry)
        inside, corner, lh, lw = setup(h, w, geometry[1], geometry[2])
        w00, w01, w10, w11 = weights_of(lh, lw, m)
        return group_row, k, corner, inside, w00, w01, w10, w11

    @t.device
    def channel_span(group_row, geometry):
        """(first channel, end channel, image) of the channels sharing a group's samples."""
        per_group = geometry[0] // geometry[13]
        g = group_row % geometry[13]
        return g * per_group, (g + 1) * per_group, group_row // geometry[13]

    @t.device
    def im2col_sample(item, input, offset, mask, has_mask, columns, geometry):
        group_row, k, corner, inside, w00, w01, w10, w11 = plan(item, offset, mask, has_mask, geometry)
        c_begin, c_end, b = channel_span(group_row, geometry)
        block = geometry[4] * geometry[5] * geometry[14] * geometry[15]
        plane_size = geometry[1] * geometry[2]
        for c in range(c_begin, c_end):
            bc = b * geometry[0] + c
            # m * 0 outside the image (the weights of an outside sample are (m, 0, 0, 0)): NaN
            # for a NaN mask, like m * B everywhere else.
            value = real(0) * w00
            if inside:
                v00, v01, v10, v11 = corners(input, bc * plane_size, corner, inside, geometry[2])
                value = combine(v00, v01, v10, v11, w00, w01, w10, w11)
            columns[bc * block + k] = value

    @t.device
    def col2im_sample(item, offset, mask, has_mask, grad_columns, grad_input, geometry):
        group_row, k, corner, inside, w00, w01, w10, w11 = plan(item, offset, mask, has_mask, geometry)
        if not inside:
            return
        c_begin, c_end, b = channel_span(group_row, geometry)
        block = geometry[4] * geometry[5] * geometry[14] * geometry[15]
        plane_size = geometry[1] * geometry[2]
        width = geometry[2]
        for c in range(c_begin, c_end):
            bc = b * geometry[0] + c
            grad = grad_columns[bc * block + k]
            at = bc * plane_size + corner
            if inside & 1:
                atomic_add(grad_input, at, w00 * grad)
            if inside & 2:
                atomic_add(grad_input, at + 1, w01 * grad)
            if inside & 4:
                atomic_add(grad_input, at + width, w10 * grad)
            if inside & 8:
                atomic_add(grad_input, at + width + 1, w11 * grad)

    @t.device
    def col2im_coord_sample(item, input, offset, mask, has_mask, grad_columns, grad_offset, grad_mask, geometry):
        group_row, k, h, w, m, dy_index = locate(item, offset, mask, has_mask, geometry)
        inside, corner, lh, lw = setup(h, w, geometry[1], geometry[2])
        c_begin, c_end, b = channel_span(group_row, geometry)
        block = geometry[4] * geometry[5] * geometry[14] * geometry[15]
        plane_size = geometry[1] * geometry[2]
        w00, w01, w10, w11 = weights_of(lh, lw, real(1))
        grad_h = real(0)
        grad_w = real(0)
        grad_m = real(0)
        if inside:
            for c in range(c_begin, c_end):
                bc = b * geometry[0] + c
                grad = grad_columns[bc * block + k]
                v00, v01, v10, v11 = corners(input, bc * plane_size, corner, inside, geometry[2])
                d_dh, d_dw = gradient_of(v00, v01, v10, v11, lh, lw)
                grad_h += grad * d_dh
                grad_w += grad * d_dw
                grad_m += grad * combine(v00, v01, v10, v11, w00, w01, w10, w11)
        pixels = geometry[14] * geometry[15]
        # Outside the image square the offset gradient is 0, not m * 0: NaN for a NaN mask.
        grad_offset[dy_index] = m * grad_h if inside else real(0)
        grad_offset[dy_index + pixels] = m * grad_w if inside else real(0)
        if has_mask:
            grad_mask[item] = grad_m

    return plan, position, channel_span, im2col_sample, col2im_sample, col2im_coord_sample


@functools.lru_cache(maxsize=None)
def _cpu_kernels():
    from numba import prange

    plan, position, _, _, _, col2im_coord_sample = _sample_functions(cpu_target())
    t = cpu_target()
    setup, weights_of, run, atomic_add = t.zero_padded_setup, t.bilinear_weights, t.zero_padded_run, t.atomic_add

    @cpu_kernel
    def make_plans(offset, mask, has_mask, geometry, n_items, corner, inside, weights):
        for item in prange(n_items):
            _, _, corner[item], inside[item], w00, w01, w10, w11 = plan(item, offset, mask, has_mask, geometry)
            weights[0, item] = w00
            weights[1, item] = w01
            weights[2, item] = w10
            weights[3, item] = w11

    @cpu_target().device
    def task_span(task, geometry):
        """(plane b*C + c0 of the task's first channel, its channel count, first sample of
        its group): a task owns up to CPU_TASK_CHANNELS channels of one (image, offset group)."""
        channels, offset_groups = geometry[0], geometry[13]
        per_group = channels // offset_groups
        blocks = (per_group + CPU_TASK_CHANNELS - 1) // CPU_TASK_CHANNELS
        group_row = task // blocks  # b*Goff + g
        g = group_row % offset_groups
        c0 = g * per_group + (task % blocks) * CPU_TASK_CHANNELS
        count = min(CPU_TASK_CHANNELS, (g + 1) * per_group - c0)
        block = geometry[4] * geometry[5] * geometry[14] * geometry[15]
        return (group_row // offset_groups) * channels + c0, count, group_row * block

    @cpu_kernel
    def im2col_channels_last(input_hwc, offset, mask, has_mask, columns, geometry, n_tiles):
        channels, height, width = geometry[0], geometry[1], geometry[2]
        offset_groups = geometry[13]
        per_group = channels // offset_groups
        points = geometry[4] * geometry[5]
        pixels = geometry[14] * geometry[15]
        block = points * pixels
        tiles_per_point = (pixels + CPU_TILE_PIXELS - 1) // CPU_TILE_PIXELS
        for tile in prange(n_tiles):
            point_row = tile // tiles_per_point  # (b*Goff + g)*kh*kw + ij
            p_begin = (tile % tiles_per_point) * CPU_TILE_PIXELS
            count = min(CPU_TILE_PIXELS, pixels - p_begin)
            group_row = point_row // points
            b = group_row // offset_groups
            group_channel = (group_row - b * offset_groups) * per_group
            ij = point_row - group_row * points
            i = ij // geometry[5]
            j = ij - i * geometry[5]
            # output pixel (y, x) of the tile's sample t, stepped along without divisions
            y = p_begin // geometry[15]
            x = p_begin - y * geometry[15]
            # values[t, c]: the tile's samples with the group's channels contiguous, as read from
            # the channels-last input (SIMD over channels), written out transposed below.
            values = np.empty(CPU_TILE_PIXELS * per_group, columns.dtype)
            weight = np.empty(4, columns.dtype)  # the weights in the input's dtype
            for t in range(count):
                h, w, _ = position(point_row, i, j, y, x, offset, geometry)
                x += 1
                if x == geometry[15]:
                    x = 0
                    y += 1
                inside, corner, lh, lw = setup(h, w, height, width)
                weight[0], weight[1], weight[2], weight[3] = weights_of(
                    lh, lw, mask[point_row * pixels + p_begin + t] if has_mask else 1.0)
                at = (b * height * width + corner) * channels + group_channel
                run(input_hwc, at, inside, weight, channels, width * channels, values, t * per_group, per_group)
            first = (b * channels + group_channel) * block + (point_row - group_row * points) * pixels + p_begin
            for c in range(per_group):
                row = np.uint64(first + c * block)
                for t in range(count):
                    columns[row + np.uint64(t)] = values[t * per_group + c]

    @cpu_kernel_fast_sums
    def forward_channels_last(input_hwc, offset, mask, has_mask, weight_rows, bias, has_bias, output, geometry,
                              tile_values, n_tiles):
        """output [N, C_out, Ho*Wo] for tiles of ``tile_pixels`` output pixels of one image:
        the tile's samples into values[t, (group, ij, c)], then the tile's GEMM block by block.
        tile_values [workers, tile_pixels, C*kh*kw] holds each worker's values; worker w takes
        the w-th of ``workers`` equal runs of tiles (tiles cost the same, so a static split
        balances; one buffer per worker, not a fresh allocation per tile, which the allocator
        served by mapping and faulting in new pages).
        weight_rows[group * out_rows + o, ij * C/G + c] is weight[group's o, c, i, j], with the
        rows of each group padded with zeros to out_rows, a multiple of 4."""
        channels, height, width = geometry[0], geometry[1], geometry[2]
        kernel_w, groups, offset_groups, out_w = geometry[5], geometry[12], geometry[13], geometry[15]
        points = geometry[4] * kernel_w
        pixels = geometry[14] * out_w
        per_offset_group = channels // offset_groups
        per_group = channels // groups
        out_per_group = geometry[3] // groups
        out_rows = weight_rows.shape[0] // groups
        depth = points * per_group  # the GEMM's inner size per weight group
        workers, tile_pixels = tile_values.shape[0], tile_values.shape[1]
        tiles_per_image = (pixels + tile_pixels - 1) // tile_pixels
        per_worker = (n_tiles + workers - 1) // workers
        for worker in prange(workers):
            values = tile_values[worker]
            weight = np.empty(4, output.dtype)  # the weights in the input's dtype
            # Sums start from a zero of the dtype (not from the first product), so the loops
            # over k run whole SIMD steps.
            zero = np.zeros(1, output.dtype)
            for tile in range(worker * per_worker, min(n_tiles, (worker + 1) * per_worker)):
                b = tile // tiles_per_image
                p_begin = (tile - b * tiles_per_image) * tile_pixels
                count = min(tile_pixels, pixels - p_begin)
                for g in range(offset_groups):
                    for ij in range(points):
                        point_row = (b * offset_groups + g) * points + ij
                        i = ij // kernel_w
                        j = ij - i * kernel_w
                        y = p_begin // out_w
                        x = p_begin - y * out_w
                        for t in range(count):
                            h, w, _ = position(point_row, i, j, y, x, offset, geometry)
                            x += 1
                            if x == out_w:
                                x = 0
                                y += 1
                            inside, corner, lh, lw = setup(h, w, height, width)
                            weight[0], weight[1], weight[2], weight[3] = weights_of(
                                lh, lw, mask[point_row * pixels + p_begin + t] if has_mask else 1.0)
                            at = (b * height * width + corner) * channels
                            # The offset group's channels, split where a weight group ends.
                            c = g * per_offset_group
                            end = c + per_offset_group
                            while c < end:
                                group = c // per_group
                                stop = min(end, (group + 1) * per_group)
                                run(input_hwc, at + c, inside, weight, channels, width * channels, values[t],
                                    group * depth + ij * per_group + c - group * per_group, stop - c)
                                c = stop
                if count % 2:
                    values[count] = 0.0  # the odd last pixel's partner: computed, never stored
                for group in range(groups):
                    k0 = group * depth
                    for o in range(0, out_per_group, 4):
                        row = group * out_rows + o
                        w0, w1 = weight_rows[row], weight_rows[row + 1]
                        w2, w3 = weight_rows[row + 2], weight_rows[row + 3]
                        first = group * out_per_group + o
                        channels_here = min(4, out_per_group - o)
                        for t in range(0, count, 2):
                            # A 2 pixels x 4 output channels block: eight sums kept in registers, each
                            # over contiguous runs of values and weights (SIMD).
                            v0 = values[t, k0:k0 + depth]
                            v1 = values[t + 1, k0:k0 + depth]
                            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero[0]
                            for k in range(depth):
                                x0 = v0[k]
                                x1 = v1[k]
                                s00 += x0 * w0[k]
                                s01 += x0 * w1[k]
                                s02 += x0 * w2[k]
                                s03 += x0 * w3[k]
                                s10 += x1 * w0[k]
                                s11 += x1 * w1[k]
                                s12 += x1 * w2[k]
                                s13 += x1 * w3[k]
                            sums = ((s00, s01, s02, s03), (s10, s11, s12, s13))
                            for r in range(min(2, count - t)):
                                for q in range(channels_here):
                                    value = sums[r][q]
                                    if has_bias:
                                        value += bias[first + q]
                                    output[b, first + q, p_begin + t + r] = value

    @cpu_kernel
    def apply_col2im(grad_columns, grad_input, geometry, n_tasks, corner, inside, weights):
        block = geometry[4] * geometry[5] * geometry[14] * geometry[15]
        plane_size = geometry[1] * geometry[2]
        width = geometry[2]
        for task in prange(n_tasks):
            first_plane, count, first = task_span(task, geometry)
            for k in range(block):
                s = first + k
                if inside[s]:
                    for bc in range(first_plane, first_plane + count):
                        grad = grad_columns[bc * block + k]
                        at = bc * plane_size + corner[s]
                        if inside[s] & 1:
                            atomic_add(grad_input, at, weights[0, s] * grad)
                        if inside[s] & 2:
                            atomic_add(grad_input, at + 1, weights[1, s] * grad)
                        if inside[s] & 4:
                            atomic_add(grad_input, at + width, weights[2, s] * grad)
                        if inside[s] & 8:
                            atomic_add(grad_input, at + width + 1, weights[3, s] * grad)

    @cpu_kernel
    def col2im_coord(input, offset, mask, has_mask, grad_columns, grad_offset, grad_mask, geometry, n_items):
        for item in prange(n_items):
            col2im_coord_sample(item, input, offset, mask, has_mask, grad_columns, grad_offset, grad_mask, geometry)

    return make_plans, apply_col2im, col2im_coord, im2col_channels_last, forward_channels_last


@functools.lru_cache(maxsize=None)
def _cuda_kernels(dtype):
    """``(im2col, col2im_coord, col2im)`` computing in ``dtype``, the accumulation dtype."""
    global cuda
    cuda = bind_cuda()

    _, _, _, im2col_sample, col2im_sample, col2im_coord_sample = _sample_functions(cuda_target(dtype))

    @cuda_kernel
    def im2col(input, offset, mask, has_mask, columns, geometry, n_items):
        for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            im2col_sample(item, input, offset, mask, has_mask, columns, geometry)

    @cuda_kernel
    def col2im_coord(input, offset, mask, has_mask, grad_columns, grad_offset, grad_mask, geometry, n_items):
        for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            col2im_coord_sample(item, input, offset, mask, has_mask, grad_columns, grad_offset, grad_mask, geometry)

    @cuda_kernel
    def col2im(offset, mask, has_mask, grad_columns, grad_input, geometry, n_items):
        for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            col2im_sample(item, offset, mask, has_mask, grad_columns, grad_input, geometry)

    return im2col, col2im_coord, col2im


@functools.lru_cache(maxsize=None)
def _cuda_deterministic_kernels(dtype):
    """col2im's deterministic twin (:mod:`pydeform._contributions`) computing in ``dtype`` (the
    accumulation dtype): ``(lists, gather)``. The buckets are (b*Goff + g)*H*W + pixel, shared
    by the channels of group g; a sample's contributions are its corners inside the image,
    numbered 0..3, weight m * corner weight."""
    global cuda
    cuda = bind_cuda()

    plan = _sample_functions(cuda_target(dtype))[0]
    add_contribution = contributions.list_functions()[0]
    element_list = contributions.element_list_function()

    @cuda_kernel
    def col2im_lists(offset, mask, has_mask, cursors, items, locals_, weights, fill, geometry, n_items):
        plane_size = geometry[1] * geometry[2]
        width = geometry[2]
        for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            group_row, _, corner, inside, w00, w01, w10, w11 = plan(item, offset, mask, has_mask, geometry)
            at = group_row * plane_size + corner
            if inside & 1:
                add_contribution(cursors, items, locals_, weights, fill, at, item, 0, w00)
            if inside & 2:
                add_contribution(cursors, items, locals_, weights, fill, at + 1, item, 1, w01)
            if inside & 4:
                add_contribution(cursors, items, locals_, weights, fill, at + width, item, 2, w10)
            if inside & 8:
                add_contribution(cursors, items, locals_, weights, fill, at + width + 1, item, 3, w11)

    @cuda_kernel
    def col2im_gather(bucket_ends, items, weights, grad_columns, grad_input, geometry, n_items):
        # grad_input[b, c, pixel] = the sum, in list order, of weight * gcol[b, c, k] over the
        # list of bucket (b*Goff + c/(C/Goff))*H*W + pixel; every element written.
        plane_size = geometry[1] * geometry[2]
        channel_columns = geometry[4] * geometry[5] * geometry[14] * geometry[15]  # k = item % this
        for element in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            plane, first, end = element_list(bucket_ends, element, geometry[0], geometry[13], plane_size)  # b*C + c
            columns = plane * channel_columns
            total = grad_input.dtype.type(0)
            for slot in range(first, end):
                total += weights[slot] * grad_columns[columns + items[slot] % channel_columns]
            grad_input[element] = total

    return col2im_lists, col2im_gather


def sample_count(batch: int, geometry) -> int:
    """Number of samples (work items) of ``batch`` images."""
    g = geometry
    return batch * g.offset_groups * g.kernel_h * g.kernel_w * g.out_h * g.out_w


def _cpu_task_count(batch: int, geometry) -> int:
    per_group = geometry.in_channels // geometry.offset_groups
    return batch * geometry.offset_groups * -(-per_group // CPU_TASK_CHANNELS)


def _cpu_tile_count(batch: int, geometry) -> int:
    pixels = geometry.out_h * geometry.out_w
    return sample_count(batch, geometry) // pixels * -(-pixels // CPU_TILE_PIXELS)


def _padded_rows(rows: int) -> int:
    """Weight rows per group in the direct CPU forward: a multiple of its 4-channel blocks."""
    return -(-rows // 4) * 4


def _forward_tile_pixels(bytes_per_pixel: int) -> int:
    """Output pixels per task of the direct CPU forward: an even count (pixels go in pairs)
    whose sampled values, ``bytes_per_pixel`` each, fit in CPU_FORWARD_TILE_BYTES, at most 64."""
    return max(2, min(64, CPU_FORWARD_TILE_BYTES // bytes_per_pixel) // 2 * 2)


def _flat_mask(mask, like, xp):
    """Kernels always take a mask array: without one, a one-element stand-in of ``like``'s dtype
    and has_mask=False. The stand-in is never an argument array: for host arrays the CUDA
    simulator copies every argument back after a launch."""
    if mask is None:
        return xp.zeros(1, dtype=like.dtype), False
    return flat(mask), True


class NumbaCpuDeformConv2dKernels:
    """deform_conv2d kernels for NumPy arrays, parallel with ``numba.prange``; the forward is
    direct (no column buffer: see :meth:`forward`)."""

    xp = np
    direct_forward = True

    @staticmethod
    def workspace(batch: int, geometry, dtype, *, backward: bool, masked: bool) -> dict:
        """This kernel set's own scratch: the channels-last input copy, and for the forward the
        rearranged weight (rows padded to a multiple of 4 per group) and one tile of sampled
        values per Numba thread."""
        import numba

        g = geometry
        plan = {"input_hwc": ((batch * g.height * g.width * g.in_channels,), dtype)}
        if not backward:
            depth = g.kernel_h * g.kernel_w * (g.in_channels // g.groups)
            plan["weight_rows"] = ((g.groups * _padded_rows(g.out_channels // g.groups), depth), dtype)
            row = g.groups * depth
            tile = _forward_tile_pixels(row * np.dtype(dtype).itemsize)
            # One per thread of the pool (fixed for the process; set_num_threads only lowers the
            # count in use, and the workers are then shared out among fewer threads).
            plan["tile_values"] = ((numba.config.NUMBA_NUM_THREADS, tile, row), dtype)
        return plan

    def _channels_last(self, input, geometry):
        slot, (shape, dtype) = "input_hwc", self.workspace(input.shape[0], geometry, input.dtype,
                                                          backward=True, masked=False)["input_hwc"]
        return channels_last(input, scratch(np, slot, shape, dtype))

    def _plans(self, offset, mask, geometry, dtype):
        n = sample_count(offset.shape[0], geometry)
        corner = np.empty(n, np.int64)
        inside = np.empty(n, np.uint8)
        weights = np.empty((4, n), dtype)
        mask, has_mask = _flat_mask(mask, offset, np)
        _cpu_kernels()[0](flat(offset), mask, has_mask, tuple(geometry), n, corner, inside, weights)
        return corner, inside, weights

    def forward(self, input, offset, mask, weight, bias, output, geometry):
        """output = deform_conv2d(...) computed tile by tile: each task samples
        :func:`_forward_tile_pixels` output pixels of one image into a cache-resident buffer and
        multiplies it by the weight right away, so no column buffer is written or read."""
        g = geometry
        group_out, per_group = g.out_channels // g.groups, g.in_channels // g.groups
        points = g.kernel_h * g.kernel_w
        plan = self.workspace(input.shape[0], g, input.dtype, backward=False, masked=False)
        rows = scratch(np, "weight_rows", *plan["weight_rows"])
        grouped = rows.reshape(g.groups, -1, points, per_group)
        grouped[:, group_out:] = 0.0
        # weight[group's o, c, i, j] -> rows[group, o, i*kw + j, c]
        grouped[:, :group_out] = weight.reshape(g.groups, group_out, per_group, points).transpose(0, 1, 3, 2)
        mask, has_mask = _flat_mask(mask, offset, np)
        bias, has_bias = (np.zeros(1, input.dtype), False) if bias is None else (bias, True)
        pixels = g.out_h * g.out_w
        tile_values = scratch(np, "tile_values", *plan["tile_values"])
        _cpu_kernels()[4](
            self._channels_last(input, g), flat(offset), mask, has_mask, rows, bias, has_bias,
            output.reshape(output.shape[0], g.out_channels, pixels), tuple(g), tile_values,
            input.shape[0] * -(-pixels // tile_values.shape[1]),
        )

    def im2col(self, input, offset, mask, columns, geometry):
        mask, has_mask = _flat_mask(mask, offset, np)
        _cpu_kernels()[3](
            self._channels_last(input, geometry), flat(offset), mask, has_mask, flat(columns), tuple(geometry),
            _cpu_tile_count(input.shape[0], geometry),
        )

    def col2im(self, offset, mask, grad_columns, grad_input, geometry):
        plans = self._plans(offset, mask, geometry, grad_columns.dtype)
        tasks = _cpu_task_count(offset.shape[0], geometry)
        _cpu_kernels()[1](flat(grad_columns), flat(grad_input), tuple(geometry), tasks, *plans)

    # A task owns its channels and adds their samples in sample order, and the tasks depend on the
    # shapes only (not on the thread count): col2im's bits are the same in every run already.
    col2im_deterministic = col2im

    @staticmethod
    def col2im_deterministic_workspace(batch: int, geometry, dtype) -> dict:
        """Nothing beyond :meth:`col2im`'s own buffers."""
        return {}

    def col2im_coord(self, input, offset, mask, grad_columns, grad_offset, grad_mask, geometry):
        mask, has_mask = _flat_mask(mask, offset, np)
        grad_mask = _flat_mask(grad_mask, grad_offset, np)[0]
        _cpu_kernels()[2](
            flat(input), flat(offset), mask, has_mask, flat(grad_columns), flat(grad_offset), grad_mask,
            tuple(geometry), sample_count(input.shape[0], geometry),
        )


class NumbaCudaDeformConv2dKernels:
    """deform_conv2d kernels compiled with ``numba.cuda.jit`` for CuPy arrays.

    float16 / bfloat16 arrays are converted to float32 on the device before a launch (into the
    scratch slots :meth:`workspace` plans) and the float16 / bfloat16 outputs written back from
    float32, so the arithmetic is float32. With ``xp=numpy`` the kernels run on host arrays
    under the CUDA simulator.
    """

    direct_forward = False

    def __init__(self, xp=None):
        if xp is None:
            import cupy as xp
        self.xp = xp

    @staticmethod
    def workspace(batch: int, geometry, dtype, *, backward: bool, masked: bool) -> dict:
        """float32 copies of the arrays the kernels read (and of the offset and mask gradients
        they write) for half types; nothing otherwise."""
        g = geometry
        samples = (batch, g.offset_groups * g.kernel_h * g.kernel_w, g.out_h, g.out_w)
        shapes = {"input": (batch, g.in_channels, g.height, g.width), "offset": (batch, 2 * samples[1]) + samples[2:]}
        if masked:
            shapes["mask"] = samples
        if backward:
            shapes.update({"grad_" + name: shape for name, shape in shapes.items() if name != "input"})
        return accumulator_plans(shapes, dtype)

    def _launch(self, index, n_items, *args):
        """Launch kernel ``index`` of :func:`_cuda_kernels` for the dtype of the first argument
        (converted arrays are in the accumulation dtype)."""
        launch_cuda(_cuda_kernels(args[0].dtype)[index], n_items, self.xp, *args, n_items)

    def im2col(self, input, offset, mask, columns, geometry):
        input, offset, mask = converted_arrays(self.xp, {"input": input, "offset": offset, "mask": mask})
        mask, has_mask = _flat_mask(mask, offset, self.xp)
        self._launch(
            0, sample_count(input.shape[0], geometry),
            flat(input), flat(offset), mask, has_mask, flat(columns), tuple(geometry),
        )

    def col2im_coord(self, input, offset, mask, grad_columns, grad_offset, grad_mask, geometry):
        input, offset, mask = converted_arrays(self.xp, {"input": input, "offset": offset, "mask": mask})
        mask, has_mask = _flat_mask(mask, offset, self.xp)
        out_offset, out_mask = converted_arrays(self.xp, {"grad_offset": grad_offset, "grad_mask": grad_mask})
        self._launch(
            1, sample_count(input.shape[0], geometry),
            flat(input), flat(offset), mask, has_mask, flat(grad_columns), flat(out_offset),
            _flat_mask(out_mask, out_offset, self.xp)[0], tuple(geometry),
        )
        # Half-type outputs were computed into float32 copies: write them back.
        if out_offset is not grad_offset:
            grad_offset[...] = out_offset
        if out_mask is not grad_mask:
            grad_mask[...] = out_mask

    @staticmethod
    def col2im_deterministic_workspace(batch: int, geometry, dtype) -> dict:
        """The contribution lists of :meth:`col2im_deterministic` on ``batch`` images."""
        return col2im_lists_plan(batch, geometry, dtype)

    def col2im_contribution_lists(self, offset, mask, geometry):
        """The sorted contribution lists of col2im's scatter (:mod:`pydeform._contributions`;
        buckets ``(b*Goff + g)*H*W + pixel``, items the samples, weights m * corner weight, in
        the accumulation dtype): they depend on the offsets and mask only, so deform_pool2d's
        deterministic input gradient reuses them."""
        xp, batch = self.xp, offset.shape[0]
        offset, mask = converted_arrays(xp, {"offset": offset, "mask": mask})
        mask, has_mask = _flat_mask(mask, offset, xp)
        acc = accumulation_dtype(offset.dtype)
        lists_kernel = _cuda_deterministic_kernels(acc)[0]
        n_items, geometry_tuple = sample_count(batch, geometry), tuple(geometry)

        def lists_step(cursors, items, locals_, weights, fill):
            launch_cuda(lists_kernel, n_items, xp, flat(offset), mask, has_mask, cursors, items, locals_, weights,
                        fill, geometry_tuple, n_items)

        def sort_step(ends, *entries):
            launch_cuda(contributions.sort_kernel(), ends.size, xp, ends, *entries, ends.size)

        return contribution_lists(
            xp, col2im_buckets(batch, geometry), col2im_capacity(batch, geometry), acc,
            lambda counts: lists_step(counts, *contributions.stand_ins(xp, acc), False),
            lambda cursors, *entries: lists_step(cursors, *entries, True),
            sort_step,
        )

    def col2im_deterministic(self, offset, mask, grad_columns, grad_input, geometry):
        """col2im by sorted contribution lists (:meth:`col2im_contribution_lists`): the same sums
        in an order the inputs fix, bit-identical run to run; writes every grad_input element."""
        lists = self.col2im_contribution_lists(offset, mask, geometry)
        gather_kernel = _cuda_deterministic_kernels(lists.weight.dtype)[1]
        launch_cuda(gather_kernel, grad_input.size, self.xp, lists.bucket_ends, lists.item, lists.weight,
                    flat(grad_columns), flat(grad_input), tuple(geometry), grad_input.size)

    def col2im(self, offset, mask, grad_columns, grad_input, geometry):
        offset, mask = converted_arrays(self.xp, {"offset": offset, "mask": mask})
        mask, has_mask = _flat_mask(mask, offset, self.xp)
        self._launch(
            2, sample_count(offset.shape[0], geometry),
            flat(offset), mask, has_mask, flat(grad_columns), flat(grad_input), tuple(geometry),
        )
