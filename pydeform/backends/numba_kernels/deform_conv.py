"""deform_conv2d kernels for Numba: the per-item arithmetic once, compiled for CPU and CUDA.

A work item is one (image b, offset group g, kernel point ij, output pixel y, x), numbered with
x fastest. It computes its sampling position and bilinear set-up once and reuses them for every
channel of offset group g. Array layouts are those of the kernel-set interface in
:mod:`pydeform.deform_conv`: ``columns`` / ``grad_columns`` are ``[B, C*kh*kw, Ho*Wo]``.

``geometry`` reaches the kernels as a plain tuple of ints in the field order of
:class:`pydeform.deform_conv.DeformConv2dGeometry`.
"""

from __future__ import annotations

import functools

import numpy as np

from .targets import cpu_kernel, cpu_target, cuda_kernel, cuda_target, launch_cuda

# CPU im2col / input-gradient tasks own blocks of this many channels: no two threads write the
# same element (no atomics needed), each task's reads and writes stay within a few pages, and
# the bilinear set-up of an item is shared by the block.
CPU_CHANNEL_BLOCK = 16


def _item_functions(t):
    """Compile the per-item functions of the three kernels for target ``t``."""
    setup, corners, flags = t.zero_padded_setup, t.zero_padded_corners, t.zero_padded_corner_flags
    value_of, gradient_of, atomic_add = t.bilinear_value, t.bilinear_gradient, t.atomic_add

    @t.device
    def sample(item, offset, mask, has_mask, geometry):
        """Decode ``item`` and return (b, g, ij, y, x, h, w, m, offset channel of dy)."""
        (_, _, _, _, kernel_h, kernel_w, stride_h, stride_w,
         pad_h, pad_w, dil_h, dil_w, _, offset_groups, out_h, out_w) = geometry
        points = kernel_h * kernel_w
        x = item % out_w
        rest = item // out_w
        y = rest % out_h
        rest //= out_h
        ij = rest % points
        rest //= points
        g = rest % offset_groups
        b = rest // offset_groups
        i = ij // kernel_w
        j = ij - i * kernel_w
        dy_channel = g * 2 * points + 2 * ij
        h = y * stride_h - pad_h + i * dil_h + offset[b, dy_channel, y, x]
        w = x * stride_w - pad_w + j * dil_w + offset[b, dy_channel + 1, y, x]
        m = mask[b, g * points + ij, y, x] if has_mask else 1.0
        return b, g, ij, y, x, h, w, m, dy_channel

    @t.device
    def im2col_item(item, c_begin, c_end, input, offset, mask, has_mask, columns, geometry):
        height, width = geometry[1], geometry[2]
        points = geometry[4] * geometry[5]
        b, g, ij, y, x, h, w, m, _ = sample(item, offset, mask, has_mask, geometry)
        column = y * geometry[15] + x
        inside, h0, w0, lh, lw = setup(h, w, height, width)
        in00, in01, in10, in11 = flags(h0, w0, height, width)
        for c in range(c_begin, c_end):
            value = 0.0
            if inside:
                v00, v01, v10, v11 = corners(input, b, c, h0, w0, in00, in01, in10, in11)
                value = m * value_of(v00, v01, v10, v11, lh, lw)
            columns[b, c * points + ij, column] = value

    @t.device
    def col2im_coord_item(item, input, offset, mask, has_mask, grad_columns, grad_offset, grad_mask, geometry):
        channels, height, width = geometry[0], geometry[1], geometry[2]
        points = geometry[4] * geometry[5]
        per_group = channels // geometry[13]
        b, g, ij, y, x, h, w, m, dy_channel = sample(item, offset, mask, has_mask, geometry)
        column = y * geometry[15] + x
        inside, h0, w0, lh, lw = setup(h, w, height, width)
        grad_h = 0.0
        grad_w = 0.0
        grad_m = 0.0
        if inside:
            in00, in01, in10, in11 = flags(h0, w0, height, width)
            for c in range(g * per_group, (g + 1) * per_group):
                grad_col = grad_columns[b, c * points + ij, column]
                v00, v01, v10, v11 = corners(input, b, c, h0, w0, in00, in01, in10, in11)
                d_dh, d_dw = gradient_of(v00, v01, v10, v11, lh, lw)
                grad_h += grad_col * d_dh
                grad_w += grad_col * d_dw
                grad_m += grad_col * value_of(v00, v01, v10, v11, lh, lw)
        grad_offset[b, dy_channel, y, x] = m * grad_h
        grad_offset[b, dy_channel + 1, y, x] = m * grad_w
        if has_mask:
            grad_mask[b, g * points + ij, y, x] = grad_m

    @t.device
    def col2im_item(item, c_begin, c_end, offset, mask, has_mask, grad_columns, grad_input, geometry):
        height, width = geometry[1], geometry[2]
        points = geometry[4] * geometry[5]
        b, g, ij, y, x, h, w, m, _ = sample(item, offset, mask, has_mask, geometry)
        inside, h0, w0, lh, lw = setup(h, w, height, width)
        if not inside:
            return
        column = y * geometry[15] + x
        in00, in01, in10, in11 = flags(h0, w0, height, width)
        for c in range(c_begin, c_end):
            grad = m * grad_columns[b, c * points + ij, column]
            if in00:
                atomic_add(grad_input, b, c, h0, w0, (1.0 - lh) * (1.0 - lw) * grad)
            if in01:
                atomic_add(grad_input, b, c, h0, w0 + 1, (1.0 - lh) * lw * grad)
            if in10:
                atomic_add(grad_input, b, c, h0 + 1, w0, lh * (1.0 - lw) * grad)
            if in11:
                atomic_add(grad_input, b, c, h0 + 1, w0 + 1, lh * lw * grad)

    return im2col_item, col2im_coord_item, col2im_item


def item_count(batch, geometry):
    """Number of work items of a kernel launch over ``batch`` images (host side)."""
    return batch * geometry[13] * geometry[4] * geometry[5] * geometry[14] * geometry[15]


@functools.lru_cache(maxsize=None)
def _cpu_kernels():
    from numba import prange

    im2col_item, col2im_coord_item, col2im_item = _item_functions(cpu_target())

    @cpu_target().device
    def channel_block_task(task, n_items, batch, geometry):
        """Task -> (first item, last item, c_begin, c_end): one block of channels of one
        (image, offset group), so tasks never write the same element."""
        offset_groups = geometry[13]
        per_group = geometry[0] // offset_groups
        blocks = (per_group + CPU_CHANNEL_BLOCK - 1) // CPU_CHANNEL_BLOCK
        items_per_group = n_items // (batch * offset_groups)
        image_group = task // blocks
        g = image_group % offset_groups
        c_begin = g * per_group + (task % blocks) * CPU_CHANNEL_BLOCK
        c_end = min(c_begin + CPU_CHANNEL_BLOCK, (g + 1) * per_group)
        first = image_group * items_per_group
        return first, first + items_per_group, c_begin, c_end

    @cpu_target().device
    def task_count(batch, geometry):
        per_group = geometry[0] // geometry[13]
        return batch * geometry[13] * ((per_group + CPU_CHANNEL_BLOCK - 1) // CPU_CHANNEL_BLOCK)

    @cpu_kernel
    def im2col(input, offset, mask, has_mask, columns, geometry, n_items):
        batch = input.shape[0]
        for task in prange(task_count(batch, geometry)):
            first, last, c_begin, c_end = channel_block_task(task, n_items, batch, geometry)
            for item in range(first, last):
                im2col_item(item, c_begin, c_end, input, offset, mask, has_mask, columns, geometry)

    @cpu_kernel
    def col2im_coord(input, offset, mask, has_mask, grad_columns, grad_offset, grad_mask, geometry, n_items):
        # Each item sums over all channels of its group, so this one is parallel over items.
        for item in prange(n_items):
            col2im_coord_item(item, input, offset, mask, has_mask, grad_columns, grad_offset, grad_mask, geometry)

    @cpu_kernel
    def col2im(offset, mask, has_mask, grad_columns, grad_input, geometry, n_items):
        batch = offset.shape[0]
        for task in prange(task_count(batch, geometry)):
            first, last, c_begin, c_end = channel_block_task(task, n_items, batch, geometry)
            for item in range(first, last):
                col2im_item(item, c_begin, c_end, offset, mask, has_mask, grad_columns, grad_input, geometry)

    return im2col, col2im_coord, col2im


@functools.lru_cache(maxsize=None)
def _cuda_kernels():
    from ..numba_cuda import cuda

    im2col_item, col2im_coord_item, col2im_item = _item_functions(cuda_target())

    @cuda_kernel
    def im2col(input, offset, mask, has_mask, columns, geometry, n_items):
        per_group = geometry[0] // geometry[13]
        items_per_group = geometry[4] * geometry[5] * geometry[14] * geometry[15]
        for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            g = (item // items_per_group) % geometry[13]
            im2col_item(item, g * per_group, (g + 1) * per_group, input, offset, mask, has_mask, columns, geometry)

    @cuda_kernel
    def col2im_coord(input, offset, mask, has_mask, grad_columns, grad_offset, grad_mask, geometry, n_items):
        for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            col2im_coord_item(item, input, offset, mask, has_mask, grad_columns, grad_offset, grad_mask, geometry)

    @cuda_kernel
    def col2im(offset, mask, has_mask, grad_columns, grad_input, geometry, n_items):
        per_group = geometry[0] // geometry[13]
        items_per_group = geometry[4] * geometry[5] * geometry[14] * geometry[15]
        for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            g = (item // items_per_group) % geometry[13]
            col2im_item(item, g * per_group, (g + 1) * per_group, offset, mask, has_mask, grad_columns, grad_input, geometry)

    return im2col, col2im_coord, col2im


def _mask_args(mask, stand_in):
    """Kernels always take a mask array; without one they get a stand-in and has_mask=False."""
    return (stand_in, False) if mask is None else (mask, True)


class NumbaCpuDeformConv2dKernels:
    """deform_conv2d kernels for NumPy arrays, parallel over work items with ``prange``."""

    xp = np

    def im2col(self, input, offset, mask, columns, geometry):
        mask, has_mask = _mask_args(mask, offset)
        g = tuple(geometry)
        _cpu_kernels()[0](input, offset, mask, has_mask, columns, g, item_count(input.shape[0], g))

    def col2im_coord(self, input, offset, mask, grad_columns, grad_offset, grad_mask, geometry):
        mask, has_mask = _mask_args(mask, offset)
        grad_mask = grad_offset if grad_mask is None else grad_mask
        g = tuple(geometry)
        _cpu_kernels()[1](
            input, offset, mask, has_mask, grad_columns, grad_offset, grad_mask, g, item_count(input.shape[0], g)
        )

    def col2im(self, offset, mask, grad_columns, grad_input, geometry):
        mask, has_mask = _mask_args(mask, offset)
        g = tuple(geometry)
        _cpu_kernels()[2](offset, mask, has_mask, grad_columns, grad_input, g, item_count(offset.shape[0], g))


class NumbaCudaDeformConv2dKernels:
    """deform_conv2d kernels compiled with ``numba.cuda.jit`` for CuPy arrays.

    float16 / bfloat16 arrays are converted to float32 on the device before a launch and the
    float16 / bfloat16 outputs written back from float32, so the arithmetic is float32. With
    ``xp=numpy`` the kernels run on host arrays under the CUDA simulator.
    """

    def __init__(self, xp=None):
        if xp is None:
            import cupy as xp
        self.xp = xp

    def _as_float(self, array):
        return array if array is None or array.dtype.itemsize >= 4 else array.astype(np.float32)

    def _launch(self, index, n_items, *args):
        launch_cuda(_cuda_kernels()[index], n_items, self.xp, *args, n_items)

    def im2col(self, input, offset, mask, columns, geometry):
        input, offset, mask = (self._as_float(a) for a in (input, offset, mask))
        mask, has_mask = _mask_args(mask, offset)
        g = tuple(geometry)
        self._launch(0, item_count(input.shape[0], g), input, offset, mask, has_mask, columns, g)

    def col2im_coord(self, input, offset, mask, grad_columns, grad_offset, grad_mask, geometry):
        input, offset, mask = (self._as_float(a) for a in (input, offset, mask))
        mask, has_mask = _mask_args(mask, offset)
        out_offset, out_mask = self._as_float(grad_offset), self._as_float(grad_mask)
        g = tuple(geometry)
        self._launch(
            1, item_count(input.shape[0], g), input, offset, mask, has_mask, grad_columns,
            out_offset, out_offset if out_mask is None else out_mask, g,
        )
        # Half-type outputs were computed into float32 copies: write them back.
        if out_offset is not grad_offset:
            grad_offset[...] = out_offset
        if out_mask is not grad_mask:
            grad_mask[...] = out_mask

    def col2im(self, offset, mask, grad_columns, grad_input, geometry):
        offset, mask = self._as_float(offset), self._as_float(mask)
        mask, has_mask = _mask_args(mask, offset)
        g = tuple(geometry)
        self._launch(2, item_count(offset.shape[0], g), offset, mask, has_mask, grad_columns, grad_input, g)
