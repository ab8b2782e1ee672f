"""deform_pool2d kernels for Numba: the per-item arithmetic once, compiled for CPU and CUDA.

Items: an *output element* ``(b, c, p)`` (flat index ``(b*C + c)*Ho*Wo + p``, p = y*Wo + x)
pools the kh*kw samples of channel c; a *sample* ``((b*Goff + g)*kh*kw + k)*Ho*Wo + p`` is one
kernel point of one offset group, shared by that group's channels (its offset and mask
gradients sum over them).

- forward: CUDA, one thread per output element; CPU, a task per output row of one offset group,
  setting each pixel's samples up once for all the group's channels and reading their corners
  from a channels-last copy of the input (:mod:`.layout`) as contiguous runs of channels (SIMD
  loads, as deform_conv2d's CPU forward does).
- input gradient: one item per output element. On the CPU a task owns a channel plane (b, c)
  and walks its output pixels, so the scatter (which lands in that plane only) needs no
  atomics; CUDA threads scatter with atomics. The deterministic CUDA input gradient takes the
  sorted contribution lists of deform_conv2d's col2im on the depthwise geometry that samples
  where the pooling does (they depend on the offsets and mask only) and gathers each input
  element's list in its fixed order (:mod:`pydeform._contributions`).
- offset and mask gradients: one item per sample, looping over the group's channels.

Arithmetic stays in the arrays' type: the kernels take a typed ``one`` (and the avg scale
``1/(kh*kw)``) instead of Python float literals. ``geometry`` is a plain tuple of ints in the
field order of :class:`pydeform.deform_unet.DeformPool2dGeometry`.
"""

from __future__ import annotations

import functools

import numpy as np

from ..._arrays import accumulation_dtype
from ..._workspace import accumulator_plans, accumulator_slot, converted, converted_arrays, scratch
from ...deform_unet import depthwise_geometry
from . import contributions
from .deform_conv import NumbaCudaDeformConv2dKernels
from .layout import channels_last
from .targets import bind_cuda, cpu_kernel, cpu_target, cuda_kernel, cuda_target, flat, launch_cuda

# numba.cuda once a CUDA kernel is built (see targets.bind_cuda for why a module global).
cuda = None


def _item_functions(t):
    """Compile the per-item functions for target ``t``."""
    setup, weights_of, corners, combine = t.zero_padded_setup, t.bilinear_weights, t.zero_padded_corners, \
        t.bilinear_combine
    gradient_of, atomic_add = t.bilinear_gradient, t.atomic_add
    real = t.real

    @t.device
    def point(b, g, k, p, offset, mask, has_mask, geometry, one):
        """Kernel point k of offset group g at output pixel p of image b: (h, w, mask value m,
        flat index of its y offset (x follows Ho*Wo later), flat index of m)."""
        kernel_w, out_w = geometry[4], geometry[13]
        pixels = geometry[12] * out_w
        point_row = (b * geometry[11] + g) * (geometry[3] * kernel_w) + k
        i = k // kernel_w
        y = p // out_w
        dy_index = 2 * point_row * pixels + p
        # The integer grid position converted first: int64 + float32 would be a float64.
        h = real(y * geometry[5] - geometry[7] + i * geometry[9]) + offset[dy_index]
        w = real((p - y * out_w) * geometry[6] - geometry[8] + (k - i * kernel_w) * geometry[10]) + offset[dy_index + pixels]
        mask_index = point_row * pixels + p
        m = mask[mask_index] if has_mask else one
        return h, w, m, dy_index, mask_index

    @t.device
    def pooled(item, input, offset, mask, has_mask, geometry, max_mode, scale, one):
        """Output element ``item``: (pooled value, arg-max kernel point; 0 in avg mode)."""
        channels, height, width = geometry[0], geometry[1], geometry[2]
        pixels = geometry[12] * geometry[13]
        plane_index = item // pixels
        p = item - plane_index * pixels
        b = plane_index // channels
        g = (plane_index - b * channels) // (channels // geometry[11])
        plane = plane_index * height * width
        zero = one - one
        result = zero
        arg = 0
        for k in range(geometry[3] * geometry[4]):
            h, w, m, _, _ = point(b, g, k, p, offset, mask, has_mask, geometry, one)
            inside, corner, lh, lw = setup(h, w, height, width)
            value = zero
            if inside:
                # m times the sample (not m folded into the weights: an infinite m times a zero
                # weight would make a NaN of an exact sample)
                w00, w01, w10, w11 = weights_of(lh, lw, one)
                v00, v01, v10, v11 = corners(input, plane, corner, inside, width)
                value = m * combine(v00, v01, v10, v11, w00, w01, w10, w11)
            if not max_mode:
                result += value
            elif k == 0 or value > result or (value != value and result == result):
                # Strictly greater: ties keep the lowest k; the first NaN wins over any number.
                result = value
                arg = k
        if not max_mode:
            result *= scale
        return result, arg

    @t.device
    def scatter_point(b, g, k, p, plane, offset, mask, has_mask, grad_input, geometry, grad, one):
        """Add ``grad * m * corner weight`` of kernel point k's sample to the plane's corners."""
        height, width = geometry[1], geometry[2]
        h, w, m, _, _ = point(b, g, k, p, offset, mask, has_mask, geometry, one)
        inside, corner, lh, lw = setup(h, w, height, width)
        if not inside:
            return
        w00, w01, w10, w11 = weights_of(lh, lw, m * grad)
        at = plane + corner
        if inside & 1:
            atomic_add(grad_input, at, w00)
        if inside & 2:
            atomic_add(grad_input, at + 1, w01)
        if inside & 4:
            atomic_add(grad_input, at + width, w10)
        if inside & 8:
            atomic_add(grad_input, at + width + 1, w11)

    @t.device
    def input_grad_item(item, offset, mask, has_mask, grad_output, indices, grad_input, geometry, max_mode, scale,
                        one):
        """Output element ``item``'s gradient onto its own input plane: every point's share in
        avg mode, the arg-max point's (an index outside [0, kh*kw) routes nothing) in max mode."""
        channels = geometry[0]
        pixels = geometry[12] * geometry[13]
        points = geometry[3] * geometry[4]
        plane_index = item // pixels
        p = item - plane_index * pixels
        b = plane_index // channels
        g = (plane_index - b * channels) // (channels // geometry[11])
        plane = plane_index * geometry[1] * geometry[2]
        grad = grad_output[item]
        if max_mode:
            k = indices[item]
            if k >= 0 and k < points:
                scatter_point(b, g, k, p, plane, offset, mask, has_mask, grad_input, geometry, grad, one)
        else:
            for k in range(points):
                scatter_point(b, g, k, p, plane, offset, mask, has_mask, grad_input, geometry, grad * scale, one)

    @t.device
    def coord_grad_item(item, input, offset, mask, has_mask, grad_output, indices, grad_offset, grad_mask,
                        geometry, max_mode, scale, one):
        """Sample ``item``'s offset and mask gradients, summed over its group's channels that
        route gradient through it (all in avg mode; those whose arg-max it is in max mode; 0
        when none does)."""
        channels, height, width, offset_groups = geometry[0], geometry[1], geometry[2], geometry[11]
        pixels = geometry[12] * geometry[13]
        points = geometry[3] * geometry[4]
        point_row = item // pixels
        p = item - point_row * pixels
        group_row = point_row // points
        k = point_row - group_row * points
        b = group_row // offset_groups
        g = group_row - b * offset_groups
        per_group = channels // offset_groups
        h, w, m, dy_index, mask_index = point(b, g, k, p, offset, mask, has_mask, geometry, one)
        inside, corner, lh, lw = setup(h, w, height, width)
        w00, w01, w10, w11 = weights_of(lh, lw, one)
        zero = one - one
        grad_h = zero
        grad_w = zero
        grad_m = zero
        routed = False
        for c in range(g * per_group, (g + 1) * per_group):
            out_index = (b * channels + c) * pixels + p
            if max_mode:
                if indices[out_index] != k:
                    continue
                grad = grad_output[out_index]
            else:
                grad = grad_output[out_index] * scale
            routed = True
            if inside:
                v00, v01, v10, v11 = corners(input, (b * channels + c) * height * width, corner, inside, width)
                d_dh, d_dw = gradient_of(v00, v01, v10, v11, lh, lw)
                grad_h += grad * d_dh
                grad_w += grad * d_dw
                grad_m += grad * combine(v00, v01, v10, v11, w00, w01, w10, w11)
        if routed:
            grad_offset[dy_index] = m * grad_h
            grad_offset[dy_index + pixels] = m * grad_w
        else:
            grad_offset[dy_index] = zero
            grad_offset[dy_index + pixels] = zero
        if has_mask:
            grad_mask[mask_index] = grad_m

    return point, pooled, input_grad_item, coord_grad_item


@functools.lru_cache(maxsize=None)
def _cpu_kernels():
    from numba import prange

    t = cpu_target()
    point, _, input_grad_item, coord_grad_item = _item_functions(t)
    setup, weights_of, run = t.zero_padded_setup, t.bilinear_weights, t.zero_padded_run

    @cpu_kernel
    def forward_channels_last(input_hwc, offset, mask, has_mask, output, indices, has_indices, geometry, max_mode,
                              scale, one, n_rows):
        """A task per output row (b, g, y) of one offset group. Each sample is set up once and
        read from the channels-last input copy for all the group's channels as contiguous runs
        (SIMD), then summed into (avg) or compared with (max) the pixel's per-channel results;
        the row's results are written out channel by channel at the end."""
        channels, height, width, offset_groups = geometry[0], geometry[1], geometry[2], geometry[11]
        out_h, out_w = geometry[12], geometry[13]
        points = geometry[3] * geometry[4]
        per_group = channels // offset_groups
        for row in prange(n_rows):
            y = row % out_h
            group_row = row // out_h  # b*Goff + g
            b = group_row // offset_groups
            g = group_row - b * offset_groups
            sample = np.empty(per_group, output.dtype)
            result = np.empty(per_group, output.dtype)
            arg = np.zeros(per_group, np.int32)
            row_results = np.empty((per_group, out_w), output.dtype)
            row_args = np.empty((per_group, out_w), np.int32)
            weights = np.empty(4, output.dtype)
            zero = one - one
            for x in range(out_w):
                p = y * out_w + x
                for k in range(points):
                    h, w, m, _, _ = point(b, g, k, p, offset, mask, has_mask, geometry, one)
                    inside, corner, lh, lw = setup(h, w, height, width)
                    # Values m * sample (not m folded into the weights: an infinite m times a zero
                    # weight would make a NaN of an exact sample); 0 outside the image, whatever m.
                    if inside:
                        weights[0], weights[1], weights[2], weights[3] = weights_of(lh, lw, one)
                        run(input_hwc, (b * height * width + corner) * channels + g * per_group, inside, weights,
                            channels, width * channels, sample, 0, per_group)
                    else:
                        m = one
                        for c in range(per_group):
                            sample[c] = zero
                    if k == 0:
                        for c in range(per_group):
                            result[c] = m * sample[c]
                            arg[c] = 0
                    elif not max_mode:
                        for c in range(per_group):
                            result[c] += m * sample[c]
                    else:
                        for c in range(per_group):
                            # Strictly greater: ties keep the lowest k; the first NaN wins over
                            # any number. Branch-free, so that the loop runs in SIMD lanes.
                            value, current = m * sample[c], result[c]
                            take = (value > current) | ((value != value) & (current == current))
                            result[c] = value if take else current
                            arg[c] = k if take else arg[c]
                for c in range(per_group):
                    row_results[c, x] = result[c] if max_mode else result[c] * scale
                    row_args[c, x] = arg[c]
            first = ((b * channels + g * per_group) * out_h + y) * out_w
            for c in range(per_group):
                at = first + c * out_h * out_w
                for x in range(out_w):
                    output[at + x] = row_results[c, x]
                if has_indices:
                    for x in range(out_w):
                        indices[at + x] = row_args[c, x]

    @cpu_kernel
    def backward_input(offset, mask, has_mask, grad_output, indices, grad_input, geometry, max_mode, scale, one,
                       n_planes):
        # A task per (b, c) plane: every scatter of its output elements lands in that plane.
        pixels = geometry[12] * geometry[13]
        for plane in prange(n_planes):
            for item in range(plane * pixels, (plane + 1) * pixels):
                input_grad_item(item, offset, mask, has_mask, grad_output, indices, grad_input, geometry, max_mode,
                                scale, one)

    @cpu_kernel
    def backward_coord(input, offset, mask, has_mask, grad_output, indices, grad_offset, grad_mask, geometry,
                       max_mode, scale, one, n_rows):
        pixels = geometry[12] * geometry[13]
        for row in prange(n_rows):
            for item in range(row * pixels, (row + 1) * pixels):
                coord_grad_item(item, input, offset, mask, has_mask, grad_output, indices, grad_offset, grad_mask,
                                geometry, max_mode, scale, one)

    return forward_channels_last, backward_input, backward_coord


@functools.lru_cache(maxsize=None)
def _cuda_kernels(dtype):
    """The CUDA kernels computing in ``dtype`` (the accumulation dtype of the arrays)."""
    global cuda
    cuda = bind_cuda()

    _, pooled, input_grad_item, coord_grad_item = _item_functions(cuda_target(dtype))

    @cuda_kernel
    def forward(input, offset, mask, has_mask, output, indices, has_indices, geometry, max_mode, scale, one,
                n_items):
        for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            value, arg = pooled(item, input, offset, mask, has_mask, geometry, max_mode, scale, one)
            output[item] = value
            if has_indices:
                indices[item] = arg

    @cuda_kernel
    def backward_input(offset, mask, has_mask, grad_output, indices, grad_input, geometry, max_mode, scale, one,
                       n_items):
        for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            input_grad_item(item, offset, mask, has_mask, grad_output, indices, grad_input, geometry, max_mode,
                            scale, one)

    @cuda_kernel
    def backward_coord(input, offset, mask, has_mask, grad_output, indices, grad_offset, grad_mask, geometry,
                       max_mode, scale, one, n_items):
        for item in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            coord_grad_item(item, input, offset, mask, has_mask, grad_output, indices, grad_offset, grad_mask,
                            geometry, max_mode, scale, one)

    return forward, backward_input, backward_coord


@functools.lru_cache(maxsize=None)
def _cuda_gather_kernel(dtype):
    """The deterministic input gradient's gather computing in ``dtype`` (the accumulation dtype)."""
    global cuda
    cuda = bind_cuda()
    real = cuda_target(dtype).real
    element_list = contributions.element_list_function()

    @cuda_kernel
    def backward_input_gather(bucket_ends, items, weights, grad_output, indices, grad_input, geometry, max_mode,
                              scale, n_items):
        # grad_input[b, c, pixel] = the sum, in list order, over the contributions of bucket
        # (b*Goff + c/(C/Goff))*H*W + pixel (items: samples ((b*Goff + g)*kh*kw + k)*Ho*Wo + p) of
        # weight * grad_output[b, c, p] * scale in avg mode, weight * grad_output[b, c, p] where
        # k is the element's arg-max in max mode; every element written.
        plane_size = geometry[1] * geometry[2]
        pixels = geometry[12] * geometry[13]
        points = geometry[3] * geometry[4]
        for element in range(cuda.grid(1), n_items, cuda.gridsize(1)):
            plane, first, end = element_list(bucket_ends, element, geometry[0], geometry[11], plane_size)  # b*C + c
            grads = plane * pixels
            total = real(0)
            for slot in range(first, end):
                p = items[slot] % pixels
                if not max_mode:
                    total += weights[slot] * (grad_output[grads + p] * scale)
                elif indices[grads + p] == (items[slot] // pixels) % points:
                    total += weights[slot] * grad_output[grads + p]
            grad_input[element] = total

    return backward_input_gather


def _standin(array, like, dtype, xp):
    """Kernels always take an array: for an absent one, a one-element stand-in and False.
    The stand-in is never an argument array: for host arrays the CUDA simulator copies every
    argument back after a launch."""
    if array is None:
        return xp.zeros(1, dtype=dtype), False
    return flat(array), True


def _constants(dtype, geometry, max_mode):
    """(avg scale 1/(kh*kw), one), typed in the accumulation type of ``dtype``."""
    acc = accumulation_dtype(dtype).type
    return acc(1.0 if max_mode else 1.0 / (geometry.kernel_h * geometry.kernel_w)), acc(1)


def _sizes(batch, geometry):
    """(output elements, channel planes, sample rows of Ho*Wo samples)."""
    g = geometry
    planes = batch * g.channels
    return planes * g.out_h * g.out_w, planes, batch * g.offset_groups * g.kernel_h * g.kernel_w


class NumbaCpuDeformPool2dKernels:
    """deform_pool2d kernels for NumPy arrays, parallel over channel planes with ``numba.prange``."""

    xp = np

    @staticmethod
    def workspace(batch: int, geometry, dtype, *, backward: bool, masked: bool) -> dict:
        """The forward's channels-last input copy (a max-mode backward without the indices
        runs the forward too)."""
        g = geometry
        return {"input_hwc": ((batch * g.height * g.width * g.channels,), np.dtype(dtype))}

    def forward(self, input, offset, mask, output, indices, geometry, max_mode):
        mask, has_mask = _standin(mask, offset, offset.dtype, np)
        indices, has_indices = _standin(indices, output, np.int32, np)
        input_hwc = channels_last(input, scratch(np, "input_hwc", (input.size,), input.dtype))
        _cpu_kernels()[0](input_hwc, flat(offset), mask, has_mask, flat(output), indices, has_indices,
                          tuple(geometry), max_mode, *_constants(input.dtype, geometry, max_mode),
                          input.shape[0] * geometry.offset_groups * geometry.out_h)

    def backward_input(self, offset, mask, grad_output, indices, grad_input, geometry, max_mode):
        mask, has_mask = _standin(mask, offset, offset.dtype, np)
        indices = _standin(indices, grad_output, np.int32, np)[0]
        _cpu_kernels()[1](flat(offset), mask, has_mask, flat(grad_output), indices, flat(grad_input),
                          tuple(geometry), max_mode, *_constants(offset.dtype, geometry, max_mode),
                          _sizes(offset.shape[0], geometry)[1])

    # A task owns a channel plane and adds its samples in sample order, and the tasks depend on the
    # shapes only (not on the thread count): backward_input's bits are the same in every run already.
    backward_input_deterministic = backward_input

    @staticmethod
    def backward_input_deterministic_workspace(batch: int, geometry, dtype) -> dict:
        """Nothing beyond :meth:`backward_input`'s own buffers."""
        return {}

    def backward_coord(self, input, offset, mask, grad_output, indices, grad_offset, grad_mask, geometry, max_mode):
        mask, has_mask = _standin(mask, offset, offset.dtype, np)
        indices = _standin(indices, grad_output, np.int32, np)[0]
        grad_mask = _standin(grad_mask, grad_offset, grad_offset.dtype, np)[0]
        _cpu_kernels()[2](flat(input), flat(offset), mask, has_mask, flat(grad_output), indices, flat(grad_offset),
                          grad_mask, tuple(geometry), max_mode, *_constants(input.dtype, geometry, max_mode),
                          _sizes(input.shape[0], geometry)[2])


class NumbaCudaDeformPool2dKernels:
    """deform_pool2d kernels compiled with ``numba.cuda.jit`` for CuPy arrays.

    float16 / bfloat16 arrays are converted to float32 on the device before a launch (into the
    scratch slots :meth:`workspace` plans) and float16 / bfloat16 outputs written back from
    float32, so the arithmetic is float32. With ``xp=numpy`` the kernels run on host arrays
    under the CUDA simulator.
    """

    def __init__(self, xp=None):
        if xp is None:
            import cupy as xp
        self.xp = xp

    @staticmethod
    def workspace(batch: int, geometry, dtype, *, backward: bool, masked: bool) -> dict:
        """float32 copies of the arrays the kernels read and write, for half types."""
        g = geometry
        samples = (batch, g.offset_groups * g.kernel_h * g.kernel_w, g.out_h, g.out_w)
        pooled = (batch, g.channels, g.out_h, g.out_w)
        # "pooled": the float32 output of the forward kernel (also when a backward recomputes the indices).
        shapes = {"input": (batch, g.channels, g.height, g.width), "offset": (batch, 2 * samples[1]) + samples[2:],
                  "pooled": pooled}
        if masked:
            shapes["mask"] = samples
        if backward:
            shapes.update({"grad_output": pooled, "grad_offset": shapes["offset"]})
            if masked:
                shapes["grad_mask"] = samples
        return accumulator_plans(shapes, dtype)

    def _launch(self, index, n_items, *args):
        """Launch kernel ``index`` built for the dtype of the first argument (converted: the
        accumulation dtype)."""
        launch_cuda(_cuda_kernels(args[0].dtype)[index], n_items, self.xp, *args, n_items)

    def forward(self, input, offset, mask, output, indices, geometry, max_mode):
        xp = self.xp
        constants = _constants(input.dtype, geometry, max_mode)
        input, offset, mask = converted_arrays(xp, {"input": input, "offset": offset, "mask": mask})
        # Half types: the kernel writes float32 pooled values, copied into the output after.
        acc = accumulation_dtype(output.dtype)
        result = output if acc == output.dtype else scratch(xp, accumulator_slot("pooled"), output.shape, acc)
        mask, has_mask = _standin(mask, offset, offset.dtype, xp)
        indices_arg, has_indices = _standin(indices, output, np.int32, xp)
        self._launch(0, _sizes(input.shape[0], geometry)[0], flat(input), flat(offset), mask, has_mask,
                     flat(result), indices_arg, has_indices, tuple(geometry), max_mode, *constants)
        if result is not output:
            output[...] = result

    def backward_input(self, offset, mask, grad_output, indices, grad_input, geometry, max_mode):
        xp = self.xp
        constants = _constants(offset.dtype, geometry, max_mode)
        offset, mask, grad_output = converted_arrays(xp, {"offset": offset, "mask": mask, "grad_output": grad_output})
        mask, has_mask = _standin(mask, offset, offset.dtype, xp)
        indices = _standin(indices, grad_output, np.int32, xp)[0]
        self._launch(1, _sizes(offset.shape[0], geometry)[0], flat(offset), mask, has_mask, flat(grad_output),
                     indices, flat(grad_input), tuple(geometry), max_mode, *constants)

    @staticmethod
    def backward_input_deterministic_workspace(batch: int, geometry, dtype) -> dict:
        """The contribution lists of :meth:`backward_input_deterministic` on ``batch`` images."""
        return NumbaCudaDeformConv2dKernels.col2im_deterministic_workspace(batch, depthwise_geometry(geometry), dtype)

    def backward_input_deterministic(self, offset, mask, grad_output, indices, grad_input, geometry, max_mode):
        """:meth:`backward_input` by sorted contribution lists (deform_conv2d's deterministic
        col2im lists on the same samples, then a gather per grad_input element): bit-identical
        run to run; writes every grad_input element."""
        xp = self.xp
        scale = _constants(offset.dtype, geometry, max_mode)[0]
        lists = NumbaCudaDeformConv2dKernels(xp).col2im_contribution_lists(offset, mask, depthwise_geometry(geometry))
        grad_output = converted(xp, "grad_output", grad_output)
        indices = _standin(indices, grad_output, np.int32, xp)[0]
        launch_cuda(_cuda_gather_kernel(lists.weight.dtype), grad_input.size, xp, lists.bucket_ends, lists.item,
                    lists.weight, flat(grad_output), indices, flat(grad_input), tuple(geometry), max_mode, scale,
                    grad_input.size)

    def backward_coord(self, input, offset, mask, grad_output, indices, grad_offset, grad_mask, geometry, max_mode):
        xp = self.xp
        constants = _constants(input.dtype, geometry, max_mode)
        input, offset, mask, grad_output = converted_arrays(
            xp, {"input": input, "offset": offset, "mask": mask, "grad_output": grad_output})
        out_offset, out_mask = converted_arrays(xp, {"grad_offset": grad_offset, "grad_mask": grad_mask})
        mask, has_mask = _standin(mask, offset, offset.dtype, xp)
        indices = _standin(indices, grad_output, np.int32, xp)[0]
        rows = _sizes(input.shape[0], geometry)[2]
        self._launch(2, rows * geometry.out_h * geometry.out_w, flat(input), flat(offset), mask, has_mask,
                     flat(grad_output), indices, flat(out_offset), _standin(out_mask, out_offset, out_offset.dtype, xp)[0],
                     tuple(geometry), max_mode, *constants)
        # Half-type outputs were computed into float32 copies: write them back.
        if out_offset is not grad_offset:
            grad_offset[...] = out_offset
        if out_mask is not grad_mask:
            grad_mask[...] = out_mask
