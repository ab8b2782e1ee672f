"""Deformable convolution v1 and modulated deformable convolution (DCNv2).

Semantics are torchvision's ``deform_conv2d`` (docs/deform_conv.md). This module is the one place
where arguments are checked, shapes inferred and dtype rules applied; it then runs a
backend-independent driver: deformable im2col into a column buffer, GEMM with the array
library's ``matmul`` (cuBLAS for CuPy, BLAS for NumPy), the batch processed in chunks so the
column buffer stays under :data:`COLUMN_BUFFER_BYTES`. The kernels come from a *kernel set*
(CuPy RawKernels, Numba CUDA or Numba CPU), see :mod:`pydeform.backends`.

Kernel-set interface (arrays C-contiguous; ``columns`` ``[B, C*kh*kw, Ho*Wo]`` in the
accumulation dtype):

- ``im2col(input, offset, mask, columns, geometry)`` fills ``columns``;
- ``col2im_coord(input, offset, mask, grad_columns, grad_offset, grad_mask, geometry)`` writes
  the offset and mask gradients;
- ``col2im(offset, mask, grad_columns, grad_input, geometry)`` adds into ``grad_input`` (zero
  filled by the driver);
- ``col2im_deterministic(offset, mask, grad_columns, grad_input, geometry)``: the same input
  gradient with bits that do not depend on the order the threads run in (the GPU sets: sorted
  contribution lists, :mod:`pydeform._contributions`; the Numba CPU set: its ``col2im``, which
  is deterministic already), with ``col2im_deterministic_workspace(batch, geometry, dtype)``
  its scratch slots for a chunk of ``batch`` images;
- ``direct_forward``: True when the set computes the forward itself with
  ``forward(input, offset, mask, weight, bias, output, geometry)`` (the Numba CPU set: sampling
  and GEMM fused per tile of output pixels, no column buffer), False when the driver runs
  im2col and the GEMMs;
- ``workspace(batch, geometry, dtype, *, backward, masked)``: the set's own scratch slots
  ``{slot: (shape, dtype)}``, part of :func:`deform_conv2d_workspace`'s plan.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from ._arrays import accumulation_dtype, check_arrays, check_backend, check_bool, int_pair, shape_of
from ._interop import dlpack_entry
from ._workspace import accumulator, accumulator_plans, accumulator_slot, converted, finish, output, scratch
from .backends import deform_conv2d_kernels

__all__ = [
    "COLUMN_BUFFER_BYTES",
    "DeformConv2dGeometry",
    "DeformConv2dGrads",
    "deform_conv2d",
    "deform_conv2d_backward",
    "deform_conv2d_geometry",
    "deform_conv2d_workspace",
]

#: Upper bound, in bytes, of each column buffer the driver allocates (forward: one buffer,
#: backward: two). A batch whose columns would exceed it is processed in chunks of images;
#: one image is always processed whole.
COLUMN_BUFFER_BYTES = 256 * 2**20


class DeformConv2dGeometry(NamedTuple):
    """Sizes every kernel needs; the batch size comes from the arrays themselves."""

    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dilation_h: int
    dilation_w: int
    groups: int
    offset_groups: int
    out_h: int
    out_w: int


class DeformConv2dGrads(NamedTuple):
    """Gradients of :func:`deform_conv2d`; ``bias`` / ``mask`` are None when not given."""

    input: object
    offset: object
    weight: object
    bias: Optional[object]
    mask: Optional[object]



def deform_conv2d_geometry(shapes: dict, stride, padding, dilation) -> DeformConv2dGeometry:
    """Check the argument shapes and the int-or-pair arguments; return the geometry.

    ``shapes`` maps ``input``, ``offset``, ``weight`` and, when given, ``bias``, ``mask`` and
    ``grad_output`` to shape tuples of the ranks :func:`deform_conv2d` documents (None or missing:
    absent). Used by the array API and by :mod:`pydeform.jax`, which has only shapes at trace time.
    """
    stride_h, stride_w = int_pair("stride", stride, minimum=1)
    pad_h, pad_w = int_pair("padding", padding, minimum=0)
    dil_h, dil_w = int_pair("dilation", dilation, minimum=1)

    n, channels, height, width = shapes["input"]
    if channels == 0:
        raise ValueError(f"input: expected at least one channel, got shape {shapes['input']}")
    out_channels, channels_per_group, kernel_h, kernel_w = shapes["weight"]
    if out_channels == 0 or channels_per_group == 0 or kernel_h == 0 or kernel_w == 0:
        raise ValueError(f"weight: expected a non-empty [C_out, C/groups, kh, kw] array, got shape {shapes['weight']}")
    if channels % channels_per_group:
        raise ValueError(
            f"weight: shape[1] = {channels_per_group} must divide the input's {channels} channels "
            f"(weight is [C_out, C/groups, kh, kw]), got weight shape {shapes['weight']}"
        )
    groups = channels // channels_per_group
    if out_channels % groups:
        raise ValueError(
            f"weight: C_out = {out_channels} must be divisible by groups = {groups} "
            f"(inferred from input channels {channels} / weight.shape[1] {channels_per_group})"
        )
    kernel_points = kernel_h * kernel_w
    offset_channels = shapes["offset"][1]
    if offset_channels == 0 or offset_channels % (2 * kernel_points):
        raise ValueError(
            f"offset: shape[1] must be a positive multiple of 2*kh*kw = {2 * kernel_points}, "
            f"got offset shape {shapes['offset']}"
        )
    offset_groups = offset_channels // (2 * kernel_points)
    if channels % offset_groups:
        raise ValueError(
            f"offset: {offset_groups} offset groups (shape[1] / (2*kh*kw)) must divide the "
            f"input's {channels} channels"
        )

    out_h = (height + 2 * pad_h - (dil_h * (kernel_h - 1) + 1)) // stride_h + 1
    out_w = (width + 2 * pad_w - (dil_w * (kernel_w - 1) + 1)) // stride_w + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"input: spatial size {height}x{width} with padding {(pad_h, pad_w)}, dilation "
            f"{(dil_h, dil_w)} and kernel {kernel_h}x{kernel_w} gives an empty output ({out_h}x{out_w})"
        )

    expected = {
        "offset": (n, 2 * offset_groups * kernel_points, out_h, out_w),
        "mask": (n, offset_groups * kernel_points, out_h, out_w),
        "bias": (out_channels,),
        "grad_output": (n, out_channels, out_h, out_w),
    }
    for name, shape in expected.items():
        given = shapes.get(name)
        if given is not None and tuple(given) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(given)}")

    return DeformConv2dGeometry(
        channels, height, width, out_channels, kernel_h, kernel_w, stride_h, stride_w,
        pad_h, pad_w, dil_h, dil_w, groups, offset_groups, out_h, out_w,
    )


def _prepare(input, offset, weight, bias, stride, padding, dilation, mask, backend, grad_output=None):
    """Check every argument once; return (kernel set, contiguous arrays, geometry)."""
    arrays = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    ranks = {"input": 4, "offset": 4, "weight": 4, "bias": 1, "mask": 4}
    if grad_output is not None:
        arrays = {"grad_output": grad_output, **arrays}
        ranks["grad_output"] = 4
    for name in ("input", "offset", "weight"):
        if arrays[name] is None:
            raise TypeError(f"{name}: expected an array, got None")
    library, dtype = check_arrays(arrays, ranks=ranks)
    kind = check_backend(backend, library)
    shapes = {k: (None if v is None else shape_of(v)) for k, v in arrays.items()}
    geometry = deform_conv2d_geometry(shapes, stride, padding, dilation)
    kernels = deform_conv2d_kernels(library, kind)
    xp = kernels.xp
    contiguous = {k: (None if v is None else xp.ascontiguousarray(v)) for k, v in arrays.items()}
    return kernels, contiguous, geometry


def _chunk_size(n: int, geometry: DeformConv2dGeometry, itemsize: int, buffers: int) -> int:
    g = geometry
    per_image = g.in_channels * g.kernel_h * g.kernel_w * g.out_h * g.out_w * itemsize * buffers
    return max(1, min(n, COLUMN_BUFFER_BYTES // per_image))


def _grouped(weight, geometry):
    """weight [C_out, C/G, kh, kw] -> [G, C_out/G, C/G*kh*kw] (a view)."""
    g = geometry
    return weight.reshape(g.groups, g.out_channels // g.groups, -1)


def deform_conv2d_workspace(kernels, batch: int, geometry: DeformConv2dGeometry, dtype, *, backward: bool,
                            masked: bool, deterministic: bool = False) -> dict:
    """The scratch buffers one forward (or backward) driver call uses: ``{slot: (shape, dtype)}``.

    ``kernels`` is the kernel set that will run (its own scratch is part of the plan) and
    ``masked`` says whether a mask is given. The drivers take every scratch buffer through this
    plan, so a caller that provides the buffers (:func:`pydeform._workspace.provided`, as
    :mod:`pydeform.jax` does) provides exactly these. Half types add float32 copies of the
    weight, bias and grad_output chunks and float32 accumulators of the results. A kernel set
    with a direct forward needs no column buffer in the forward. A ``deterministic`` backward
    adds the kernel set's contribution lists for one chunk.
    """
    g = geometry
    plan = dict(kernels.workspace(batch, g, dtype, backward=backward, masked=masked))
    if kernels.direct_forward and not backward:
        return plan
    acc = accumulation_dtype(dtype)
    chunk = _chunk_size(max(batch, 1), g, acc.itemsize, buffers=2 if backward else 1)
    column_shape = (chunk, g.in_channels * g.kernel_h * g.kernel_w, g.out_h * g.out_w)
    weight_shape = (g.out_channels, g.in_channels // g.groups, g.kernel_h, g.kernel_w)
    chunk_out_shape = (chunk, g.out_channels, g.out_h, g.out_w)
    plan["columns"] = (column_shape, acc)
    if not backward:
        plan.update(accumulator_plans(
            {"weight": weight_shape, "bias": (g.out_channels,), "output": chunk_out_shape}, dtype))
        return plan
    plan["grad_columns"] = (column_shape, acc)
    if deterministic:
        plan.update(kernels.col2im_deterministic_workspace(chunk, g, dtype))
    plan["grad_weight_chunk"] = ((chunk, g.groups, g.out_channels // g.groups, column_shape[1] // g.groups), acc)
    plan.update(accumulator_plans({
        "weight": weight_shape, "grad_output": chunk_out_shape,
        "grad_input": (batch, g.in_channels, g.height, g.width), "grad_weight": weight_shape,
        "grad_bias": (g.out_channels,),
    }, dtype))
    return plan


def _batch(array, start, stop):
    return None if array is None else array[start:stop]


def run_deform_conv2d_forward(kernels, input, offset, mask, weight, bias, geometry):
    """The forward driver, shared by every backend (arrays checked and contiguous).

    Per chunk of ``B`` images: ``columns [B, C*kh*kw, Ho*Wo] = im2col(...)``, then
    ``out[b, group] = weight[group] @ columns[b, group]`` as one batched GEMM; or the kernel
    set's own ``forward`` when it has a direct one.
    """
    xp, g = kernels.xp, geometry
    n = input.shape[0]
    acc = accumulation_dtype(input.dtype)
    out = output(xp, "output", (n, g.out_channels, g.out_h, g.out_w), input.dtype)
    if n == 0:
        return out
    if kernels.direct_forward:
        kernels.forward(input, offset, mask, weight, bias, out, g)
        return out
    plan = deform_conv2d_workspace(kernels, n, g, input.dtype, backward=False, masked=mask is not None)
    weight_g = _grouped(converted(xp, "weight", weight), g)
    bias_acc = None if bias is None else converted(xp, "bias", bias).reshape(1, -1, 1, 1)
    columns = scratch(xp, "columns", *plan["columns"])
    chunk = columns.shape[0]
    # The GEMM writes straight into the output unless a cast to a half type is needed.
    direct = out.dtype == acc
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        b = stop - start
        cols = columns[:b]
        kernels.im2col(input[start:stop], offset[start:stop], _batch(mask, start, stop), cols, g)
        grouped_cols = cols.reshape(b, g.groups, weight_g.shape[2], -1)
        result = out[start:stop] if direct else scratch(xp, accumulator_slot("output"), (b,) + out.shape[1:], acc)
        xp.matmul(weight_g, grouped_cols, out=result.reshape(b, g.groups, -1, g.out_h * g.out_w))
        if bias_acc is not None:
            result += bias_acc
        if not direct:
            out[start:stop] = result
    return out


def bias_gradient(xp, grad_output, dtype):
    """``grad_output.sum((0, 2, 3))`` accumulated in the accumulation dtype, returned in ``dtype``
    (the planned ``grad_bias`` slot); shared with the transposed convolution's backward."""
    grad_bias = accumulator(xp, "grad_bias", grad_output.shape[1:2], dtype)
    xp.sum(grad_output, axis=(0, 2, 3), dtype=grad_bias.dtype, out=grad_bias)
    return finish(xp, "grad_bias", grad_bias, dtype)


def sampled_gradients(kernels, geometry, sampled, offset, mask, grad_out, weight_t, grad_columns, columns,
                      grad_weight_chunk, grad_offset, grad_mask, grad_weight_g):
    """One chunk of the backward's gradients that sample ``sampled`` [B, C, H, W]: with
    ``grad_out`` [B, G, C_out/G, Ho*Wo] as the output gradient, ``grad_columns = weight^T @
    grad_out``, the offset and mask gradients (``col2im_coord``), and the weight gradient
    ``grad_out @ im2col(sampled)^T`` added into ``grad_weight_g`` (through the per-image
    ``grad_weight_chunk``). Returns ``columns`` grouped as [B, G, C/G*kh*kw, Ho*Wo]; ``grad_columns``
    is left for the input gradient. Shared with the transposed convolution's backward, which
    samples its output gradient."""
    xp, g = kernels.xp, geometry
    b = sampled.shape[0]
    group_rows = weight_t.shape[1]
    xp.matmul(weight_t, grad_out, out=grad_columns.reshape(b, g.groups, group_rows, -1))
    kernels.col2im_coord(sampled, offset, mask, grad_columns, grad_offset, grad_mask, g)
    kernels.im2col(sampled, offset, mask, columns, g)
    grouped_cols = columns.reshape(b, g.groups, group_rows, -1)
    xp.matmul(grad_out, grouped_cols.transpose(0, 1, 3, 2), out=grad_weight_chunk)
    # In-place adds: no weight-sized temporary outside the planned buffers.
    for image in grad_weight_chunk:
        grad_weight_g += image
    return grouped_cols


def run_deform_conv2d_backward(kernels, grad_output, input, offset, mask, weight, bias, geometry,
                               deterministic=False):
    """The backward driver, shared by every backend; returns :class:`DeformConv2dGrads`.

    Per chunk: ``grad_columns = weight^T @ grad_output`` (batched GEMM), then one kernel for the
    offset and mask gradients, one scattering onto the input gradient (accumulated in float32
    for half types; ``deterministic``: the kernel set's ``col2im_deterministic``), and the
    weight gradient as ``grad_output @ columns^T`` with the columns recomputed by im2col.
    """
    xp, g = kernels.xp, geometry
    n = input.shape[0]
    dtype = input.dtype
    plan = deform_conv2d_workspace(kernels, n, g, dtype, backward=True, masked=mask is not None,
                                   deterministic=deterministic)
    col2im = kernels.col2im_deterministic if deterministic else kernels.col2im
    weight_g = _grouped(converted(xp, "weight", weight), g)
    weight_t = weight_g.transpose(0, 2, 1)
    grad_input = accumulator(xp, "grad_input", input.shape, dtype)
    grad_offset = output(xp, "grad_offset", offset.shape, dtype)
    grad_mask = None if mask is None else output(xp, "grad_mask", mask.shape, dtype)
    grad_weight = accumulator(xp, "grad_weight", weight.shape, dtype)
    grad_weight_g = _grouped(grad_weight, g)
    grad_columns = scratch(xp, "grad_columns", *plan["grad_columns"])
    columns = scratch(xp, "columns", *plan["columns"])
    grad_weight_chunk = scratch(xp, "grad_weight_chunk", *plan["grad_weight_chunk"])
    chunk = columns.shape[0]
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        b = stop - start
        inp, off, msk = input[start:stop], offset[start:stop], _batch(mask, start, stop)
        grad_out = converted(xp, "grad_output", grad_output[start:stop]).reshape(b, g.groups, -1, g.out_h * g.out_w)
        gcols = grad_columns[:b]
        sampled_gradients(kernels, g, inp, off, msk, grad_out, weight_t, gcols, columns[:b], grad_weight_chunk[:b],
                          grad_offset[start:stop], _batch(grad_mask, start, stop), grad_weight_g)
        col2im(off, msk, gcols, grad_input[start:stop], g)
    grad_bias = None if bias is None else bias_gradient(xp, grad_output, dtype)
    return DeformConv2dGrads(
        finish(xp, "grad_input", grad_input, dtype),
        grad_offset,
        finish(xp, "grad_weight", grad_weight, dtype),
        grad_bias,
        grad_mask,
    )


@dlpack_entry
def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None, *, backend=None):
    r"""Deformable convolution (v1), or modulated deformable convolution (DCNv2) with ``mask``.

    .. math::
        out[n,o,y,x] = bias[o] + \sum_{c \in grp(o), i, j} weight[o, c, i, j]\, m\,
        B_A(input[n,c],\ y s_h - p_h + i d_h + \Delta y,\ x s_w - p_w + j d_w + \Delta x)

    with ``B_A`` zero-padded bilinear sampling and ``m`` the mask value (1 without mask).

    Args:
        input: ``[N, C, H, W]``.
        offset: ``[N, 2*Goff*kh*kw, Ho, Wo]``; for kernel point ``(i, j)`` of offset group ``g``,
            channel ``g*2*kh*kw + 2*(i*kw + j)`` is the y offset and the next one the x offset.
        weight: ``[C_out, C/G, kh, kw]``; the weight groups ``G = C // weight.shape[1]``.
        bias: ``[C_out]`` or None.
        stride, padding, dilation: an int or an ``(h, w)`` pair.
        mask: ``[N, Goff*kh*kw, Ho, Wo]`` modulation scalars, or None for DCNv1.
        backend: None (NumPy arrays: Numba CPU; CuPy arrays: CuPy RawKernels), ``"cupy"`` or
            ``"numba"`` (Numba CUDA kernels for CuPy arrays, Numba CPU for NumPy arrays).

    Returns:
        ``[N, C_out, Ho, Wo]`` with ``Ho = (H + 2*ph - (dh*(kh-1)+1)) // sh + 1`` (same for Wo),
        same array type, device and dtype as ``input``.

    All arrays share one library, device and dtype: float32 or float64 on the CPU, also float16
    and bfloat16 on the GPU (accumulated in float32). Inputs are never modified. A sampling
    position outside ``(-1, H) x (-1, W)`` (or not finite) contributes 0.
    """
    kernels, a, geometry = _prepare(input, offset, weight, bias, stride, padding, dilation, mask, backend)
    return run_deform_conv2d_forward(kernels, a["input"], a["offset"], a["mask"], a["weight"], a["bias"], geometry)


@dlpack_entry
def deform_conv2d_backward(
    grad_output, input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None, *, backend=None,
    deterministic=False,
) -> DeformConv2dGrads:
    """Gradients of :func:`deform_conv2d` with respect to every array argument.

    Args:
        grad_output: ``[N, C_out, Ho, Wo]``, the gradient of the loss with respect to the output.
        input, offset, weight, bias, stride, padding, dilation, mask, backend: as for
            :func:`deform_conv2d`.
        deterministic: compute the input gradient so that its bits are the same in every run
            and for every launch configuration (on the GPU: sorted contribution lists instead of
            float atomics; the Numba CPU backward always is).

    Returns:
        :class:`DeformConv2dGrads` ``(input, offset, weight, bias, mask)``, each with its
        argument's shape and dtype; ``bias`` and ``mask`` are None when not given. The offset
        and mask gradients are 0 where a sample lies outside ``(-1, H) x (-1, W)``, where the
        forward is constant.
    """
    if grad_output is None:
        raise TypeError("grad_output: expected an array, got None")
    check_bool("deterministic", deterministic)
    kernels, a, geometry = _prepare(
        input, offset, weight, bias, stride, padding, dilation, mask, backend, grad_output=grad_output
    )
    return run_deform_conv2d_backward(
        kernels, a["grad_output"], a["input"], a["offset"], a["mask"], a["weight"], a["bias"], geometry, deterministic
    )
