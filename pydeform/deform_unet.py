"""The Deformable U-Net operators: transposed deformable convolution and deformable pooling.

This module is the one place where their arguments are checked, shapes inferred and dtype
rules applied (see docs/deform_unet.md for the definitions).

:func:`deform_conv_transpose2d` is the adjoint of :func:`pydeform.deform_conv2d` and runs on
deform_conv2d's kernel sets (:mod:`pydeform.deform_conv`): its forward is deform_conv2d's
input-gradient path (``columns = weight^T @ input`` by a batched GEMM, then ``col2im`` with the
offsets onto the output grid), its backward is deform_conv2d's forward and its offset, mask and
weight gradients with ``input := grad_output`` (``im2col`` of grad_output, ``col2im_coord``,
two GEMMs). Its geometry is the :class:`~pydeform.deform_conv.DeformConv2dGeometry` of that
adjoint deformable convolution.

:func:`deform_pool2d` is depthwise and has no GEMM; its kernels come from a *deform_pool2d
kernel set* (CuPy RawKernels, Numba CUDA or Numba CPU, see :mod:`pydeform.backends`), with the
interface (arrays C-contiguous, ``max_mode`` a bool, ``indices`` int32 ``[N, C, Ho, Wo]`` or
None):

- ``forward(input, offset, mask, output, indices, geometry, max_mode)`` writes every element of
  ``output`` (and of ``indices`` when given: the arg-max kernel point, max mode only);
- ``backward_input(offset, mask, grad_output, indices, grad_input, geometry, max_mode)`` adds
  into ``grad_input`` (accumulation dtype, zero-filled by the driver); ``indices`` is given in
  max mode;
- ``backward_input_deterministic(...)``: the same input gradient, its bits the same in every run
  (every element written), with ``backward_input_deterministic_workspace(batch, geometry,
  dtype)`` its scratch;
- ``backward_coord(input, offset, mask, grad_output, indices, grad_offset, grad_mask, geometry,
  max_mode)`` writes every element of the offset and mask gradients;
- ``workspace(batch, geometry, dtype, *, backward, masked)``: the set's own scratch slots.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from ._arrays import (
    accumulation_dtype, array_library, check_arrays, check_backend, check_bool, check_int, int_pair, shape_of,
    values_checked,
)
from ._interop import dlpack_entry
from ._workspace import accumulator, accumulator_plans, converted, finish, output, scratch
from .backends import deform_conv2d_kernels, deform_pool2d_kernels
from .deform_conv import (
    DeformConv2dGeometry, _batch, _chunk_size, _grouped, bias_gradient, deform_conv2d_geometry, sampled_gradients,
)

__all__ = [
    "DeformConvTranspose2dGrads",
    "DeformPool2dGeometry",
    "DeformPool2dGrads",
    "deform_conv_transpose2d",
    "deform_conv_transpose2d_backward",
    "deform_conv_transpose2d_geometry",
    "deform_conv_transpose2d_workspace",
    "deform_pool2d",
    "deform_pool2d_backward",
    "deform_pool2d_geometry",
    "deform_pool2d_workspace",
]

POOL_MODES = ("avg", "max")


class DeformConvTranspose2dGrads(NamedTuple):
    """Gradients of :func:`deform_conv_transpose2d`; ``bias`` / ``mask`` are None when not given."""

    input: object
    offset: object
    weight: object
    bias: Optional[object]
    mask: Optional[object]


class DeformPool2dGrads(NamedTuple):
    """Gradients of :func:`deform_pool2d`; ``mask`` is None when not given."""

    input: object
    offset: object
    mask: Optional[object]


class DeformPool2dGeometry(NamedTuple):
    """Sizes every deform_pool2d kernel needs; the batch size comes from the arrays."""

    channels: int
    height: int
    width: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dilation_h: int
    dilation_w: int
    offset_groups: int
    out_h: int
    out_w: int


def depthwise_geometry(geom) -> DeformConv2dGeometry:
    """deform_conv2d's geometry of the depthwise convolution that samples where the pooling does
    (its col2im's contribution lists are the pooling's)."""
    return DeformConv2dGeometry(geom.channels, geom.height, geom.width, geom.channels, geom.kernel_h, geom.kernel_w,
                                geom.stride_h, geom.stride_w, geom.pad_h, geom.pad_w, geom.dilation_h,
                                geom.dilation_w, geom.channels, geom.offset_groups, geom.out_h, geom.out_w)


def _check_shapes(shapes: dict, expected: dict) -> None:
    for name, shape in expected.items():
        given = shapes.get(name)
        if given is not None and tuple(given) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(given)}")


def _offset_groups(offset_shape, kernel_points: int, channels: int, channels_name: str) -> int:
    offset_channels = offset_shape[1]
    if offset_channels == 0 or offset_channels % (2 * kernel_points):
        raise ValueError(
            f"offset: shape[1] must be a positive multiple of 2*kh*kw = {2 * kernel_points}, "
            f"got offset shape {tuple(offset_shape)}"
        )
    offset_groups = offset_channels // (2 * kernel_points)
    if channels % offset_groups:
        raise ValueError(
            f"offset: {offset_groups} offset groups (shape[1] / (2*kh*kw)) must divide the "
            f"{channels} {channels_name}"
        )
    return offset_groups


# Transposed deformable convolution.


def deform_conv_transpose2d_geometry(shapes: dict, stride, padding, output_padding, dilation,
                                     groups) -> DeformConv2dGeometry:
    """Check the argument shapes and options of :func:`deform_conv_transpose2d`; return the
    geometry of the deformable convolution it is the adjoint of: its input is this op's output
    (``in_channels`` = C_out, ``height`` x ``width`` = H_out x W_out), its output this op's
    input (``out_channels`` = C_in, ``out_h`` x ``out_w`` = H x W).

    ``shapes`` maps ``input``, ``offset``, ``weight`` and, when given, ``bias``, ``mask`` and
    ``grad_output`` to shape tuples (None or missing: absent); used by the array API and by
    :mod:`pydeform.jax`.
    """
    stride_h, stride_w = int_pair("stride", stride, minimum=1)
    pad_h, pad_w = int_pair("padding", padding, minimum=0)
    out_pad_h, out_pad_w = int_pair("output_padding", output_padding, minimum=0)
    dil_h, dil_w = int_pair("dilation", dilation, minimum=1)
    groups = check_int("groups", groups, minimum=1)
    if out_pad_h >= stride_h or out_pad_w >= stride_w:
        raise ValueError(
            f"output_padding: expected values smaller than the stride {(stride_h, stride_w)}, "
            f"got {output_padding!r}"
        )
    n, in_channels, height, width = shapes["input"]
    if in_channels == 0:
        raise ValueError(f"input: expected at least one channel, got shape {shapes['input']}")
    weight_in, out_per_group, kernel_h, kernel_w = shapes["weight"]
    if out_per_group == 0 or kernel_h == 0 or kernel_w == 0:
        raise ValueError(f"weight: expected a non-empty [C_in, C_out/groups, kh, kw] array, got shape {shapes['weight']}")
    if weight_in != in_channels:
        raise ValueError(
            f"weight: shape[0] must equal the input's {in_channels} channels (weight is "
            f"[C_in, C_out/groups, kh, kw]), got weight shape {shapes['weight']}"
        )
    if in_channels % groups:
        raise ValueError(f"groups: {groups} must divide the input's {in_channels} channels")
    out_channels = out_per_group * groups
    offset_groups = _offset_groups(shapes["offset"], kernel_h * kernel_w, out_channels, "output channels")
    out_h = (height - 1) * stride_h - 2 * pad_h + dil_h * (kernel_h - 1) + out_pad_h + 1
    out_w = (width - 1) * stride_w - 2 * pad_w + dil_w * (kernel_w - 1) + out_pad_w + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"input: spatial size {height}x{width} with stride {(stride_h, stride_w)}, padding "
            f"{(pad_h, pad_w)}, dilation {(dil_h, dil_w)} and kernel {kernel_h}x{kernel_w} gives an "
            f"empty output ({out_h}x{out_w})"
        )
    points = offset_groups * kernel_h * kernel_w
    _check_shapes(shapes, {
        "offset": (n, 2 * points, height, width),
        "mask": (n, points, height, width),
        "bias": (out_channels,),
        "grad_output": (n, out_channels, out_h, out_w),
    })
    # The adjoint deformable convolution, checked by its own rules (they hold by construction).
    weight_of_adjoint = (in_channels, out_per_group, kernel_h, kernel_w)
    return deform_conv2d_geometry(
        {"input": (n, out_channels, out_h, out_w), "offset": shapes["offset"], "weight": weight_of_adjoint},
        (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w),
    )


def _prepare_transpose(arrays: dict, options: tuple, backend):
    ranks = {"grad_output": 4, "input": 4, "offset": 4, "weight": 4, "bias": 1, "mask": 4}
    for name in ("input", "offset", "weight"):
        if arrays[name] is None:
            raise TypeError(f"{name}: expected an array, got None")
    library, _ = check_arrays(arrays, ranks={k: ranks[k] for k in arrays})
    kind = check_backend(backend, library)
    shapes = {k: (None if v is None else shape_of(v)) for k, v in arrays.items()}
    geometry = deform_conv_transpose2d_geometry(shapes, *options)
    kernels = deform_conv2d_kernels(library, kind)
    contiguous = {k: (None if v is None else kernels.xp.ascontiguousarray(v)) for k, v in arrays.items()}
    return kernels, contiguous, geometry


def deform_conv_transpose2d_workspace(kernels, batch: int, geometry: DeformConv2dGeometry, dtype, *,
                                      backward: bool, masked: bool, deterministic: bool = False) -> dict:
    """The scratch buffers one forward (or backward) call uses: ``{slot: (shape, dtype)}``.

    ``kernels`` is the deform_conv2d kernel set that will run and ``geometry`` the one
    :func:`deform_conv_transpose2d_geometry` returns. Both passes run the kernels of
    deform_conv2d's backward (so the set's backward scratch), on column buffers
    ``[chunk, C_out*kh*kw, H*W]``; the backward has two of them, and the scratch of the set's
    direct forward where it has one (the input gradient runs it). A ``deterministic`` forward
    adds the set's contribution lists of ``col2im_deterministic`` for one chunk.
    """
    g = geometry
    plan = dict(kernels.workspace(batch, g, dtype, backward=True, masked=masked))
    if backward and kernels.direct_forward:
        # The input gradient runs the set's direct forward.
        plan.update(kernels.workspace(batch, g, dtype, backward=False, masked=masked))
    acc = accumulation_dtype(dtype)
    chunk = _chunk_size(max(batch, 1), g, acc.itemsize, buffers=2 if backward else 1)
    column_shape = (chunk, g.in_channels * g.kernel_h * g.kernel_w, g.out_h * g.out_w)
    weight_shape = (g.out_channels, g.in_channels // g.groups, g.kernel_h, g.kernel_w)
    input_chunk = (chunk, g.out_channels, g.out_h, g.out_w)
    plan["grad_columns"] = (column_shape, acc)
    if not backward:
        if deterministic:
            plan.update(kernels.col2im_deterministic_workspace(chunk, g, dtype))
        plan.update(accumulator_plans({
            "weight": weight_shape, "bias": (g.in_channels,), "input": input_chunk,
            "output": (batch, g.in_channels, g.height, g.width),
        }, dtype))
        return plan
    plan["columns"] = (column_shape, acc)
    plan["grad_weight_chunk"] = ((chunk, g.groups, g.out_channels // g.groups, column_shape[1] // g.groups), acc)
    plan.update(accumulator_plans({
        "weight": weight_shape, "input": input_chunk, "grad_input": (batch, g.out_channels, g.out_h, g.out_w),
        "grad_weight": weight_shape, "grad_bias": (g.in_channels,),
    }, dtype))
    return plan


def run_deform_conv_transpose2d_forward(kernels, input, offset, mask, weight, bias, geometry, deterministic=False):
    """The forward driver (arrays checked and contiguous), on deform_conv2d's kernels.

    Per chunk of images: ``columns[b, group] = weight[group]^T @ input[b, group]`` (batched
    GEMM; weight ``[C_in, C_out/G, kh, kw]`` is deform_conv2d's ``[C_out', C/G, kh, kw]`` of the
    adjoint), then ``col2im`` splats the columns onto the output with the offsets and mask
    (``deterministic``: the kernel set's ``col2im_deterministic``).
    """
    xp, g = kernels.xp, geometry
    n = input.shape[0]
    dtype = input.dtype
    plan = deform_conv_transpose2d_workspace(kernels, n, g, dtype, backward=False, masked=mask is not None,
                                             deterministic=deterministic)
    col2im = kernels.col2im_deterministic if deterministic else kernels.col2im
    # The adjoint's weight is [C_in, C_out/G, kh, kw] = [its C_out, its C/G, kh, kw], grouped
    # as [G, C_in/G, C_out/G*kh*kw]; its transpose maps input channels to columns.
    weight_t = _grouped(converted(xp, "weight", weight), g).transpose(0, 2, 1)
    result = accumulator(xp, "output", (n, g.in_channels, g.height, g.width), dtype)
    if n:
        grad_columns = scratch(xp, "grad_columns", *plan["grad_columns"])
        chunk = grad_columns.shape[0]
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            b = stop - start
            cols = grad_columns[:b]
            inp = converted(xp, "input", input[start:stop]).reshape(b, g.groups, -1, g.out_h * g.out_w)
            xp.matmul(weight_t, inp, out=cols.reshape(b, g.groups, weight_t.shape[1], -1))
            col2im(offset[start:stop], _batch(mask, start, stop), cols, result[start:stop], g)
    if bias is not None:
        result += converted(xp, "bias", bias).reshape(1, -1, 1, 1)
    return finish(xp, "output", result, dtype)


def run_deform_conv_transpose2d_backward(kernels, grad_output, input, offset, mask, weight, bias, geometry):
    """The backward driver, on deform_conv2d's kernels; returns :class:`DeformConvTranspose2dGrads`.

    deform_conv2d's forward and parameter gradients with ``input := grad_output`` and
    ``grad_output := input``, per chunk: ``grad_columns = weight^T @ input`` and
    ``col2im_coord`` give the offset and mask gradients; ``columns = im2col(grad_output)``
    gives the input gradient ``weight @ columns`` (or the kernel set's direct forward, where
    it has one) and the weight gradient ``input @ columns^T``.
    """
    xp, g = kernels.xp, geometry
    n = input.shape[0]
    dtype = input.dtype
    plan = deform_conv_transpose2d_workspace(kernels, n, g, dtype, backward=True, masked=mask is not None)
    weight_g = _grouped(converted(xp, "weight", weight), g)
    weight_t = weight_g.transpose(0, 2, 1)
    grad_input = accumulator(xp, "grad_input", input.shape, dtype)
    grad_offset = output(xp, "grad_offset", offset.shape, dtype)
    grad_mask = None if mask is None else output(xp, "grad_mask", mask.shape, dtype)
    grad_weight = accumulator(xp, "grad_weight", weight.shape, dtype)
    grad_weight_g = _grouped(grad_weight, g)
    if n:
        grad_columns = scratch(xp, "grad_columns", *plan["grad_columns"])
        columns = scratch(xp, "columns", *plan["columns"])
        grad_weight_chunk = scratch(xp, "grad_weight_chunk", *plan["grad_weight_chunk"])
        chunk = columns.shape[0]
        pixels = g.out_h * g.out_w
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            b = stop - start
            grad_out, off, msk = grad_output[start:stop], offset[start:stop], _batch(mask, start, stop)
            inp = converted(xp, "input", input[start:stop]).reshape(b, g.groups, -1, pixels)
            grouped_cols = sampled_gradients(
                kernels, g, grad_out, off, msk, inp, weight_t, grad_columns[:b], columns[:b], grad_weight_chunk[:b],
                grad_offset[start:stop], _batch(grad_mask, start, stop), grad_weight_g)
            if kernels.direct_forward:
                # deform_conv2d's own forward (sampling and GEMM fused, faster than a GEMM on the columns).
                kernels.forward(grad_out, off, msk, weight, None, grad_input[start:stop], g)
            else:
                xp.matmul(weight_g, grouped_cols, out=grad_input[start:stop].reshape(b, g.groups, -1, pixels))
    grad_bias = None if bias is None else bias_gradient(xp, grad_output, dtype)
    return DeformConvTranspose2dGrads(
        finish(xp, "grad_input", grad_input, dtype),
        grad_offset,
        finish(xp, "grad_weight", grad_weight, dtype),
        grad_bias,
        grad_mask,
    )


@dlpack_entry
def deform_conv_transpose2d(input, offset, weight, bias=None, stride=1, padding=0, output_padding=0, dilation=1,
                            groups=1, mask=None, *, backend=None, deterministic=False):
    r"""Transposed deformable convolution: the adjoint of :func:`pydeform.deform_conv2d`, plus a bias.

    .. math::
        out = D^T\, input + bias

    where ``D = deform_conv2d(., offset, weight, stride, padding, dilation, mask)`` maps
    ``[N, C_out, H_out, W_out]`` to ``[N, C_in, H, W]``: every input value ``input[n, c, y, x]``
    is splatted, times ``weight[c, o', i, j] * m``, onto the four bilinear (zero-padded) corners
    of ``(y*sh - ph + i*dh + dy, x*sw - pw + j*dw + dx)`` in each output channel ``o`` of
    ``c``'s group. With zero offsets and no mask it is ``torch.nn.functional.conv_transpose2d``.

    Args:
        input: ``[N, C_in, H, W]``.
        offset: ``[N, 2*Goff*kh*kw, H, W]``, on the **input** grid, deform_conv2d's layout;
            output channel ``o`` uses offset group ``o // (C_out/Goff)``.
        weight: ``[C_in, C_out/groups, kh, kw]`` (``conv_transpose2d``'s layout).
        bias: ``[C_out]`` or None.
        stride, padding, output_padding, dilation: an int or an ``(h, w)`` pair;
            ``0 <= output_padding < stride``.
        groups: weight groups (``C_in`` and ``C_out`` divisible by it).
        mask: ``[N, Goff*kh*kw, H, W]`` modulation scalars, or None.
        backend: as for :func:`pydeform.deform_conv2d`.
        deterministic: compute the output so that its bits are the same in every run and for
            every launch configuration (its splat is deform_conv2d's input-gradient scatter: on
            the GPU sorted contribution lists instead of float atomics; the Numba CPU forward
            always is).

    Returns:
        ``[N, C_out, H_out, W_out]`` with ``H_out = (H-1)*sh - 2*ph + dh*(kh-1) + output_padding_h + 1``
        (same for W), same array type, device and dtype as ``input``.
    """
    check_bool("deterministic", deterministic)
    kernels, a, geometry = _prepare_transpose(
        {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask},
        (stride, padding, output_padding, dilation, groups), backend,
    )
    return run_deform_conv_transpose2d_forward(
        kernels, a["input"], a["offset"], a["mask"], a["weight"], a["bias"], geometry, deterministic)


@dlpack_entry
def deform_conv_transpose2d_backward(grad_output, input, offset, weight, bias=None, stride=1, padding=0,
                                     output_padding=0, dilation=1, groups=1, mask=None, *,
                                     backend=None) -> DeformConvTranspose2dGrads:
    """Gradients of :func:`deform_conv_transpose2d` with respect to every array argument.

    ``grad_input = deform_conv2d(grad_output, offset, weight, ...)``; the offset, mask and
    weight gradients are deform_conv2d's with ``input := grad_output`` and ``grad_output :=
    input``; ``grad_bias = grad_output.sum((0, 2, 3))``.

    Returns:
        :class:`DeformConvTranspose2dGrads` ``(input, offset, weight, bias, mask)``, each with its
        argument's shape and dtype; ``bias`` and ``mask`` are None when not given.
    """
    if grad_output is None:
        raise TypeError("grad_output: expected an array, got None")
    kernels, a, geometry = _prepare_transpose(
        {"grad_output": grad_output, "input": input, "offset": offset, "weight": weight, "bias": bias,
         "mask": mask},
        (stride, padding, output_padding, dilation, groups), backend,
    )
    return run_deform_conv_transpose2d_backward(
        kernels, a["grad_output"], a["input"], a["offset"], a["mask"], a["weight"], a["bias"], geometry)


# Deformable pooling.


def deform_pool2d_geometry(shapes: dict, kernel_size, stride, padding, dilation) -> DeformPool2dGeometry:
    """Check the argument shapes and options of :func:`deform_pool2d`; return the geometry.

    ``shapes`` maps ``input``, ``offset`` and, when given, ``mask``, ``grad_output`` and
    ``indices`` to shape tuples (None or missing: absent); used by the array API and by
    :mod:`pydeform.jax`.
    """
    kernel_h, kernel_w = int_pair("kernel_size", kernel_size, minimum=1)
    stride_h, stride_w = (kernel_h, kernel_w) if stride is None else int_pair("stride", stride, minimum=1)
    pad_h, pad_w = int_pair("padding", padding, minimum=0)
    dil_h, dil_w = int_pair("dilation", dilation, minimum=1)
    n, channels, height, width = shapes["input"]
    if channels == 0:
        raise ValueError(f"input: expected at least one channel, got shape {shapes['input']}")
    offset_groups = _offset_groups(shapes["offset"], kernel_h * kernel_w, channels, "input channels")
    out_h = (height + 2 * pad_h - (dil_h * (kernel_h - 1) + 1)) // stride_h + 1
    out_w = (width + 2 * pad_w - (dil_w * (kernel_w - 1) + 1)) // stride_w + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"input: spatial size {height}x{width} with padding {(pad_h, pad_w)}, dilation "
            f"{(dil_h, dil_w)} and kernel {kernel_h}x{kernel_w} gives an empty output ({out_h}x{out_w})"
        )
    points = offset_groups * kernel_h * kernel_w
    _check_shapes(shapes, {
        "offset": (n, 2 * points, out_h, out_w),
        "mask": (n, points, out_h, out_w),
        "grad_output": (n, channels, out_h, out_w),
        "indices": (n, channels, out_h, out_w),
    })
    return DeformPool2dGeometry(channels, height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                dil_h, dil_w, offset_groups, out_h, out_w)


def _check_mode(mode, return_indices=False) -> bool:
    """``mode`` -> max mode; ``return_indices`` only where there is an arg-max."""
    if mode not in POOL_MODES:
        raise ValueError(f"mode: expected 'avg' or 'max', got {mode!r}")
    if not isinstance(return_indices, bool):
        raise TypeError(f"return_indices: expected a bool, got {return_indices!r}")
    if return_indices and mode != "max":
        raise ValueError("return_indices: the arg-max indices exist in mode='max' only, got mode='avg'")
    return mode == "max"


def _check_indices(indices, like, library: str, points: int, max_mode: bool):
    """The arg-max ``indices`` a backward call was given: int32, ``like``'s library and device,
    values in [0, kh*kw) (checked on the host unless inside an unchecked_values block; the
    kernels route nothing through an index outside that range)."""
    if indices is None:
        return None
    if not max_mode:
        raise ValueError("indices: the arg-max indices exist in mode='max' only, got mode='avg'")
    if array_library("indices", indices) != library:
        raise TypeError(f"indices: expected a {library} array like input, got a {array_library('indices', indices)} array")
    if library == "cupy" and indices.device.id != like.device.id:
        raise ValueError(f"indices: expected an array on GPU {like.device.id} like input, got GPU {indices.device.id}")
    if np.dtype(indices.dtype) != np.int32:
        raise TypeError(f"indices: expected dtype int32, got {np.dtype(indices.dtype).name}")
    if indices.ndim != 4:
        raise ValueError(f"indices: expected a 4-d array, got {indices.ndim}-d with shape {tuple(indices.shape)}")
    if values_checked() and indices.size and bool(((indices < 0) | (indices >= points)).any()):
        raise ValueError(f"indices: expected kernel point indices in [0, {points}), got values outside it")
    return indices


def _prepare_pool(arrays: dict, options: tuple, backend, indices=None, mode="max"):
    ranks = {"grad_output": 4, "input": 4, "offset": 4, "mask": 4}
    for name in ("input", "offset"):
        if arrays[name] is None:
            raise TypeError(f"{name}: expected an array, got None")
    library, _ = check_arrays(arrays, ranks={k: ranks[k] for k in arrays})
    kind = check_backend(backend, library)
    shapes = {k: (None if v is None else shape_of(v)) for k, v in arrays.items()}
    if indices is not None and hasattr(indices, "shape"):
        shapes["indices"] = shape_of(indices)
    geometry = deform_pool2d_geometry(shapes, *options)
    indices = _check_indices(indices, arrays["input"], library, geometry.kernel_h * geometry.kernel_w, mode == "max")
    kernels = deform_pool2d_kernels(library, kind)
    contiguous = {k: (None if v is None else kernels.xp.ascontiguousarray(v)) for k, v in arrays.items()}
    if indices is not None:
        contiguous["indices"] = kernels.xp.ascontiguousarray(indices)
    return kernels, contiguous, geometry


def deform_pool2d_workspace(kernels, batch: int, geometry: DeformPool2dGeometry, dtype, *, backward: bool,
                            masked: bool, recompute_indices: bool, deterministic: bool = False) -> dict:
    """The scratch buffers one forward (or backward) call uses: ``{slot: (shape, dtype)}``: the
    kernel set's own, the input gradient's float32 accumulator for half types, for a max-mode
    backward not given the indices (``recompute_indices``) the indices and the pooled values of
    the forward that recomputes them, and for a ``deterministic`` backward the contribution lists
    of the set's ``backward_input_deterministic``."""
    g = geometry
    plan = dict(kernels.workspace(batch, g, dtype, backward=backward, masked=masked))
    output_shape = (batch, g.channels, g.out_h, g.out_w)
    if backward:
        plan.update(accumulator_plans({"grad_input": (batch, g.channels, g.height, g.width)}, dtype))
        if deterministic:
            plan.update(kernels.backward_input_deterministic_workspace(batch, g, dtype))
        if recompute_indices:
            plan["indices"] = (output_shape, np.dtype(np.int32))
            plan["pooled"] = (output_shape, np.dtype(dtype))
    return plan


def run_deform_pool2d_forward(kernels, input, offset, mask, geometry, max_mode: bool, return_indices: bool):
    """The forward driver: one kernel writes the output (and the indices when asked)."""
    xp, g = kernels.xp, geometry
    shape = (input.shape[0], g.channels, g.out_h, g.out_w)
    out = output(xp, "output", shape, input.dtype)
    indices = output(xp, "indices", shape, np.int32) if return_indices else None
    if input.shape[0]:
        kernels.forward(input, offset, mask, out, indices, g, max_mode)
    return (out, indices) if return_indices else out


def run_deform_pool2d_backward(kernels, grad_output, input, offset, mask, indices, geometry, max_mode: bool,
                               deterministic: bool = False):
    """The backward driver; returns :class:`DeformPool2dGrads`. In max mode without
    ``indices`` the forward kernel recomputes them first; ``deterministic``: the input gradient
    by the kernel set's ``backward_input_deterministic``."""
    xp, g = kernels.xp, geometry
    n = input.shape[0]
    dtype = input.dtype
    grad_input = accumulator(xp, "grad_input", input.shape, dtype)
    grad_offset = output(xp, "grad_offset", offset.shape, dtype)
    grad_mask = None if mask is None else output(xp, "grad_mask", mask.shape, dtype)
    if n:
        if max_mode and indices is None:
            shape = (n, g.channels, g.out_h, g.out_w)
            indices = scratch(xp, "indices", shape, np.int32)
            kernels.forward(input, offset, mask, scratch(xp, "pooled", shape, dtype), indices, g, True)
        kernels.backward_coord(input, offset, mask, grad_output, indices, grad_offset, grad_mask, g, max_mode)
        backward_input = kernels.backward_input_deterministic if deterministic else kernels.backward_input
        backward_input(offset, mask, grad_output, indices, grad_input, g, max_mode)
    return DeformPool2dGrads(finish(xp, "grad_input", grad_input, dtype), grad_offset, grad_mask)


@dlpack_entry
def deform_pool2d(input, offset, kernel_size, stride=None, padding=0, dilation=1, mode="max", mask=None,
                  return_indices=False, *, backend=None):
    r"""Dense deformable pooling (depthwise, no weights), avg or max.

    .. math::
        v_k = m_k\, B_A(input[n,c],\ y s_h - p_h + i d_h + \Delta y_k,\ x s_w - p_w + j d_w + \Delta x_k)

    avg: ``out = sum_k v_k / (kh*kw)`` (samples outside the image count, as zeros); max:
    ``out = max_k v_k``, ties to the lowest kernel point ``k = i*kw + j``, a NaN ``v_k`` wins.

    Args:
        input: ``[N, C, H, W]``.
        offset: ``[N, 2*Goff*kh*kw, Ho, Wo]``, deform_conv2d's layout; channel ``c`` uses
            offset group ``c // (C/Goff)``.
        kernel_size, padding, dilation: an int or an ``(h, w)`` pair.
        stride: an int, a pair, or None for ``kernel_size``.
        mode: ``"max"`` or ``"avg"``.
        mask: ``[N, Goff*kh*kw, Ho, Wo]`` modulation scalars, or None.
        return_indices: also return the arg-max kernel point, int32 ``[N, C, Ho, Wo]`` (max
            mode only), which :func:`deform_pool2d_backward` may take.
        backend: as for :func:`pydeform.deform_conv2d`.

    Returns:
        ``[N, C, Ho, Wo]`` (and the indices), ``Ho = (H + 2*ph - (dh*(kh-1)+1)) // sh + 1``.
        With zero offsets, no mask, padding 0 and dilation 1 it is ``avg_pool2d`` / ``max_pool2d``.
    """
    max_mode = _check_mode(mode, return_indices)
    kernels, a, geometry = _prepare_pool({"input": input, "offset": offset, "mask": mask},
                                         (kernel_size, stride, padding, dilation), backend)
    return run_deform_pool2d_forward(kernels, a["input"], a["offset"], a["mask"], geometry, max_mode, return_indices)


@dlpack_entry
def deform_pool2d_backward(grad_output, input, offset, kernel_size, stride=None, padding=0, dilation=1, mode="max",
                           mask=None, indices=None, *, backend=None, deterministic=False) -> DeformPool2dGrads:
    """Gradients of :func:`deform_pool2d` with respect to input, offset and mask.

    avg spreads ``grad / (kh*kw)`` over every kernel point; max routes the whole gradient through
    the arg-max point (``indices`` from ``return_indices=True``, or recomputed when None).
    ``deterministic``: compute the input gradient so that its bits are the same in every run
    and for every launch configuration (on the GPU sorted contribution lists instead of float
    atomics; the Numba CPU backward always is).

    Returns:
        :class:`DeformPool2dGrads` ``(input, offset, mask)``; ``mask`` is None when not given.
    """
    if grad_output is None:
        raise TypeError("grad_output: expected an array, got None")
    max_mode = _check_mode(mode)
    check_bool("deterministic", deterministic)
    kernels, a, geometry = _prepare_pool(
        {"grad_output": grad_output, "input": input, "offset": offset, "mask": mask},
        (kernel_size, stride, padding, dilation), backend, indices, mode,
    )
    return run_deform_pool2d_backward(kernels, a["grad_output"], a["input"], a["offset"], a["mask"],
                                      a.get("indices"), geometry, max_mode, deterministic)
