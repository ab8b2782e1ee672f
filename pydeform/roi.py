"""Region-of-interest pooling: RoI Align, RoI Pool, their position-sensitive variants,
deformable RoI pooling (mmcv, with its modulated variant) and deformable PS RoI pooling.

Semantics are those of docs/roi.md. This module checks every argument once, infers the output shape,
allocates outputs and gradients and calls the RoI kernel set of the backend
(:func:`pydeform.backends.roi_kernels`), which has one ``<op>_forward`` and one
``<op>_backward`` method per kernel family below; position-sensitive variants are flags of
their plain op's kernels:

``roi_align_forward(input, rois, output, params)`` and
``roi_align_backward(grad_output, input, rois, grad_input, params)`` with
:class:`RoIAlignParams` (also ps_roi_align); ``roi_pool_*`` likewise with
:class:`RoIPoolParams` (also ps_roi_pool);
``deform_roi_pool_forward(input, rois, offset, mask, output, params)``,
``deform_roi_pool_backward(grad_output, input, rois, offset, mask, grad_input, grad_offset,
grad_mask, params)`` with :class:`DeformRoIPoolParams`;
``deform_psroi_pool_forward(input, rois, trans, output, params)``,
``deform_psroi_pool_backward(grad_output, input, rois, trans, grad_input, grad_trans, params)``
with :class:`DeformPSRoIPoolParams`.

Arrays reaching the kernels are C-contiguous: ``input [N, C, H, W]`` and ``grad_output`` /
``output [K, C_out, PH, PW]`` in the storage dtype T; ``rois [K, 5]`` in the accumulation
dtype A (float64 for float64, else float32); ``offset [K, 2, PH, PW]``, ``mask [K, 1, PH, PW]``,
``trans [K, 2*classes, P, P]`` in T or None when absent. Gradients are A arrays zero-filled
here, which the kernels accumulate into (atomically on the GPU); every ``output`` element is
written by the forward kernel.

A kernel set also has ``workspace(family, params, shapes, dtype, *, backward)``: the scratch
slots ``{slot: (shape, dtype)}`` its forward (or backward) of ``family`` (``"roi_align"``,
``"roi_pool"``, ``"deform_roi_pool"``, ``"deform_psroi_pool"``: the method prefixes) takes
through :func:`pydeform._workspace.scratch`, given the shapes of ``input``, ``output`` and the
present ``offset`` / ``mask`` / ``trans``; part of :func:`roi_workspace`'s plan.

Every ``<op>_backward`` method has a ``<op>_backward_deterministic`` twin with the same
arguments, run for ``deterministic=True``: the same gradients with bits that do not depend on
the order the threads run in (the GPU sets: sorted contribution lists and fixed-order sums, see
:mod:`pydeform._contributions`; it writes every gradient element. The Numba CPU set's backward
is deterministic already and serves both). ``deterministic_workspace(family, params, shapes,
dtype)`` gives its scratch slots.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

from ._arrays import check_arrays, check_backend, check_bool, check_finite_float, check_int, int_pair, shape_of
from ._interop import dlpack_entry
from ._rois import check_positive_float, check_samples_per_axis, normalize_rois
from ._workspace import accumulator, accumulator_plans, finish, output
from .backends import roi_kernels

__all__ = [
    "DeformPSRoIPoolGrads",
    "DeformRoIPoolGrads",
    "RoIGrads",
    "deform_psroi_pool",
    "deform_psroi_pool_backward",
    "deform_roi_pool",
    "deform_roi_pool_backward",
    "ps_roi_align",
    "ps_roi_align_backward",
    "ps_roi_pool",
    "ps_roi_pool_backward",
    "roi_align",
    "roi_align_backward",
    "roi_pool",
    "roi_pool_backward",
]


class RoIAlignParams(NamedTuple):
    channels: int
    height: int
    width: int
    pooled_h: int
    pooled_w: int
    channels_out: int
    spatial_scale: float
    sampling_ratio: int
    aligned: bool
    max_mode: bool
    position_sensitive: bool


class RoIPoolParams(NamedTuple):
    """roi_pool (max over the bin) or, with ``position_sensitive``, ps_roi_pool (average)."""

    channels: int
    height: int
    width: int
    pooled_h: int
    pooled_w: int
    channels_out: int
    spatial_scale: float
    position_sensitive: bool


class DeformRoIPoolParams(NamedTuple):
    channels: int
    height: int
    width: int
    pooled_h: int
    pooled_w: int
    spatial_scale: float
    sampling_ratio: int
    gamma: float
    has_offset: bool
    has_mask: bool


class DeformPSRoIPoolParams(NamedTuple):
    channels: int
    height: int
    width: int
    output_dim: int
    group_size: int
    pooled_size: int
    part_size: int
    sample_per_part: int
    trans_std: float
    spatial_scale: float
    num_classes: int
    has_trans: bool


class RoIGrads(NamedTuple):
    """Gradient of roi_align / roi_pool / ps_roi_align / ps_roi_pool (the boxes get none)."""

    input: object


class DeformRoIPoolGrads(NamedTuple):
    """Gradients of :func:`deform_roi_pool`; ``offset`` / ``mask`` are None when not given."""

    input: object
    offset: Optional[object]
    mask: Optional[object]


class DeformPSRoIPoolGrads(NamedTuple):
    """Gradients of :func:`deform_psroi_pool`; ``trans`` is None when not given."""

    input: object
    trans: Optional[object]


class _Call(NamedTuple):
    kernels: object
    xp: object
    arrays: dict
    rois: object


def _prepare(arrays: dict, ranks: dict, rois, backend) -> _Call:
    """Shared checks: one library / device / dtype for the arrays, the boxes normalised."""
    if arrays["input"] is None:
        raise TypeError("input: expected an array, got None")
    library, _ = check_arrays(arrays, ranks=ranks)
    kind = check_backend(backend, library)
    kernels = roi_kernels(library, kind)
    xp = kernels.xp
    contiguous = {k: (None if v is None else xp.ascontiguousarray(v)) for k, v in arrays.items()}
    boxes = normalize_rois(rois, contiguous["input"], library, xp)
    return _Call(kernels, xp, contiguous, boxes)


def _shapes(arrays: dict) -> dict:
    return {name: (None if value is None else shape_of(value)) for name, value in arrays.items()}


def _image(shape):
    """``[N, C, H, W]`` of the input, which must hold at least one pixel."""
    if min(shape[2:]) < 1:
        # Bilinear sampling has no pixel to clamp to in an empty image.
        raise ValueError(f"input: expected an image of at least 1x1 pixels, got shape {shape}")
    return shape


def _check_shape(name, shape, expected):
    if shape is not None and tuple(shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(shape)}")


def _require_grad_output(grad_output):
    """The backward functions' grad_output is not optional (the forward helpers share its slot)."""
    if grad_output is None:
        raise TypeError("grad_output: expected an array, got None")


def _position_sensitive_channels(channels, pooled_h, pooled_w):
    if channels % (pooled_h * pooled_w):
        raise ValueError(
            f"input: position-sensitive pooling needs channels divisible by output_size "
            f"{pooled_h}x{pooled_w} = {pooled_h * pooled_w}, got {channels} channels"
        )
    return channels // (pooled_h * pooled_w)


def roi_align_params(shapes, k, output_size, spatial_scale, sampling_ratio, aligned, mode,
                     position_sensitive) -> RoIAlignParams:
    """Check roi_align / ps_roi_align arguments given the array shapes (``shapes["input"]``,
    optional ``shapes["grad_output"]``) and the roi count ``k``; used by :mod:`pydeform.jax` too."""
    n, channels, height, width = _image(shapes["input"])
    pooled_h, pooled_w = int_pair("output_size", output_size, minimum=1)
    if mode not in ("avg", "max"):
        raise ValueError(f"mode: expected 'avg' or 'max', got {mode!r}")
    if not isinstance(aligned, bool):
        raise TypeError(f"aligned: expected a bool, got {aligned!r}")
    channels_out = _position_sensitive_channels(channels, pooled_h, pooled_w) if position_sensitive else channels
    params = RoIAlignParams(
        channels, height, width, pooled_h, pooled_w, channels_out,
        check_positive_float("spatial_scale", spatial_scale), check_samples_per_axis("sampling_ratio", sampling_ratio),
        aligned, mode == "max", position_sensitive,
    )
    _check_shape("grad_output", shapes.get("grad_output"), roi_output_shape(params, k))
    return params


def _roi_align_call(input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode,
                    position_sensitive, backend, grad_output=None):
    call = _prepare({"input": input, "grad_output": grad_output}, {"input": 4, "grad_output": 4}, rois, backend)
    return call, roi_align_params(_shapes(call.arrays), call.rois.shape[0], output_size, spatial_scale,
                                  sampling_ratio, aligned, mode, position_sensitive)


def roi_pool_params(shapes, k, output_size, spatial_scale, position_sensitive) -> RoIPoolParams:
    """Check roi_pool / ps_roi_pool arguments given the array shapes and the roi count ``k``."""
    n, channels, height, width = _image(shapes["input"])
    pooled_h, pooled_w = int_pair("output_size", output_size, minimum=1)
    channels_out = _position_sensitive_channels(channels, pooled_h, pooled_w) if position_sensitive else channels
    params = RoIPoolParams(
        channels, height, width, pooled_h, pooled_w, channels_out,
        check_positive_float("spatial_scale", spatial_scale), position_sensitive,
    )
    _check_shape("grad_output", shapes.get("grad_output"), roi_output_shape(params, k))
    return params


def _roi_pool_call(input, rois, output_size, spatial_scale, position_sensitive, backend, grad_output=None):
    call = _prepare({"input": input, "grad_output": grad_output}, {"input": 4, "grad_output": 4}, rois, backend)
    return call, roi_pool_params(_shapes(call.arrays), call.rois.shape[0], output_size, spatial_scale,
                                 position_sensitive)


def roi_output_shape(params, k: int) -> tuple:
    """The ``[K, C_out, PH, PW]`` output shape of the op ``params`` describes."""
    if isinstance(params, DeformPSRoIPoolParams):
        return (k, params.output_dim, params.pooled_size, params.pooled_size)
    channels = params.channels if isinstance(params, DeformRoIPoolParams) else params.channels_out
    return (k, channels, params.pooled_h, params.pooled_w)


_FAMILIES = {RoIAlignParams: "roi_align", RoIPoolParams: "roi_pool", DeformRoIPoolParams: "deform_roi_pool",
             DeformPSRoIPoolParams: "deform_psroi_pool"}


def roi_workspace(kernels, params, shapes: dict, dtype, *, backward: bool, deterministic: bool = False) -> dict:
    """The scratch one forward (or backward) driver call of the op ``params`` describes takes,
    ``{slot: (shape, dtype)}``, on the kernel set ``kernels``.

    ``shapes`` holds the shapes of the op's arrays: ``input``, ``rois`` and the present ones of
    ``offset``, ``mask``, ``trans``. The plan is the kernel set's own scratch (none when the
    output is empty: no kernel runs) and, for the backward of half types, float32 accumulators
    of the gradients. A caller that provides the buffers (:func:`pydeform._workspace.provided`,
    as :mod:`pydeform.jax` does) provides exactly these. A ``deterministic`` backward adds the
    kernel set's ``deterministic_workspace``.
    """
    arrays = {name: tuple(shape) for name, shape in shapes.items() if name != "rois"}
    output_shape = roi_output_shape(params, shapes["rois"][0])
    plan = {}
    if math.prod(output_shape):
        family, kernel_shapes = _FAMILIES[type(params)], {**arrays, "output": output_shape}
        plan.update(kernels.workspace(family, params, kernel_shapes, dtype, backward=backward))
        if backward and deterministic:
            plan.update(kernels.deterministic_workspace(family, params, kernel_shapes, dtype))
    if backward:
        plan.update(accumulator_plans({"grad_" + name: shape for name, shape in arrays.items()}, dtype))
    return plan


def _forward(call, params, method, *extra):
    input = call.arrays["input"]
    out = output(call.xp, "output", roi_output_shape(params, call.rois.shape[0]), input.dtype)
    if out.size:
        getattr(call.kernels, method)(input, call.rois, *extra, out, params)
    return out


def _accumulated_grads(call, grads: dict, launch) -> tuple:
    """Zero-filled accumulators of the named gradients (``{"grad_input": "input", ...}``: the
    argument each belongs to, None when absent), filled by ``launch(*accumulators)`` unless
    grad_output is empty, then returned in the arguments' dtype."""
    xp, dtype = call.xp, call.arrays["input"].dtype
    arrays = {name: call.arrays[arg] for name, arg in grads.items()}
    accumulators = [None if a is None else accumulator(xp, name, a.shape, dtype) for name, a in arrays.items()]
    if call.arrays["grad_output"].size:
        launch(*accumulators)
    return tuple(None if a is None else finish(xp, name, a, dtype) for name, a in zip(arrays, accumulators))


def _backward_method(call, family, deterministic):
    """The kernel set's backward of ``family``, its deterministic twin if asked."""
    suffix = "_deterministic" if check_bool("deterministic", deterministic) else ""
    return getattr(call.kernels, f"{family}_backward{suffix}")


def _input_grad(call, params, method):
    def launch(grad_input):
        method(call.arrays["grad_output"], call.arrays["input"], call.rois, grad_input, params)

    return RoIGrads(*_accumulated_grads(call, {"grad_input": "input"}, launch))


@dlpack_entry
def roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, mode="avg", *,
              backend=None):
    """RoI Align (Mask R-CNN), torchvision semantics; ``mode="max"`` takes the maximum sample (ONNX / mmcv).

    Each of the ``PH x PW`` bins of a roi averages (or maxes) ``gh x gw`` border-clamped bilinear
    samples, ``gh = sampling_ratio`` if positive else ``min(ceil(roi_height / PH), 1024)`` (same
    for w). With ``aligned=True`` box corners are shifted by -0.5 pixel (half-pixel centres). A
    roi with a corner beyond ``2**24`` feature-map pixels once scaled gives 0 (docs/roi.md,
    "Bounded work").

    Args:
        input: ``[N, C, H, W]``.
        rois: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in input-image coordinates, or a
            list of per-image ``[L_i, 4]`` boxes; either also as Python lists of numbers. Same
            dtype as ``input`` (float32 also allowed with float16 / bfloat16 inputs).
        output_size: ``PH`` or ``(PH, PW)``.
        spatial_scale: feature-map size / image size (e.g. 1/16).
        sampling_ratio: samples per bin along each axis, at most 1024; ``<= 0`` for adaptive.
        aligned: half-pixel box coordinates.
        mode: ``"avg"`` or ``"max"``.
        backend: as for :func:`pydeform.deform_conv2d`.

    Returns:
        ``[K, C, PH, PW]``, input's array type, device and dtype.
    """
    call, p = _roi_align_call(input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode, False, backend)
    return _forward(call, p, "roi_align_forward")


@dlpack_entry
def roi_align_backward(grad_output, input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False,
                       mode="avg", *, backend=None, deterministic=False) -> RoIGrads:
    """Gradient of :func:`roi_align` with respect to ``input``.

    ``grad_output`` is ``[K, C, PH, PW]``; the other arguments are those of the forward.
    Average mode spreads each bin's gradient over its samples' bilinear corners; max mode routes
    it through the sample that held the maximum (first one on ties).

    With ``deterministic=True`` the gradient's bits are the same in every run and for every
    launch configuration: on the GPU each input element sums its contributions in a fixed order
    (sorted contribution lists) instead of receiving float atomics; the Numba CPU backward is
    deterministic either way. The same keyword, with the same meaning, is on every RoI backward.
    """
    _require_grad_output(grad_output)
    call, p = _roi_align_call(input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode, False, backend,
                              grad_output)
    return _input_grad(call, p, _backward_method(call, "roi_align", deterministic))


@dlpack_entry
def ps_roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, *, backend=None):
    """Position-sensitive RoI Align (R-FCN), torchvision semantics; always half-pixel aligned.

    Output channel ``c`` of bin ``(ph, pw)`` averages input channel ``(c*PH + ph)*PW + pw``.
    ``input`` is ``[N, C_out*PH*PW, H, W]``; returns ``[K, C_out, PH, PW]``. Other arguments as
    :func:`roi_align`.
    """
    call, p = _roi_align_call(input, rois, output_size, spatial_scale, sampling_ratio, True, "avg", True, backend)
    return _forward(call, p, "roi_align_forward")


@dlpack_entry
def ps_roi_align_backward(grad_output, input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, *,
                          backend=None, deterministic=False) -> RoIGrads:
    """Gradient of :func:`ps_roi_align` with respect to ``input``; ``grad_output [K, C_out, PH, PW]``."""
    _require_grad_output(grad_output)
    call, p = _roi_align_call(input, rois, output_size, spatial_scale, sampling_ratio, True, "avg", True, backend,
                              grad_output)
    return _input_grad(call, p, _backward_method(call, "roi_align", deterministic))


@dlpack_entry
def roi_pool(input, rois, output_size, spatial_scale=1.0, *, backend=None):
    """RoI Pool (Fast R-CNN), torchvision semantics: max over integer bins of the rounded box.

    Box corners are rounded half away from zero after scaling; an empty bin gives 0 and the first
    maximum in row-major order wins. ``input [N, C, H, W]``, ``rois`` as :func:`roi_align`;
    returns ``[K, C, PH, PW]``.
    """
    call, p = _roi_pool_call(input, rois, output_size, spatial_scale, False, backend)
    return _forward(call, p, "roi_pool_forward")


@dlpack_entry
def roi_pool_backward(grad_output, input, rois, output_size, spatial_scale=1.0, *, backend=None,
                      deterministic=False) -> RoIGrads:
    """Gradient of :func:`roi_pool`: each bin's gradient goes to its arg-max element."""
    _require_grad_output(grad_output)
    call, p = _roi_pool_call(input, rois, output_size, spatial_scale, False, backend, grad_output)
    return _input_grad(call, p, _backward_method(call, "roi_pool", deterministic))


@dlpack_entry
def ps_roi_pool(input, rois, output_size, spatial_scale=1.0, *, backend=None):
    """Position-sensitive RoI Pool (R-FCN), torchvision semantics: the average over each bin.

    Bins are those of :func:`roi_pool` except that the rounded box spans ``max(x2 - x1, 1)``
    pixels (torchvision's ps_roi_pool has no +1). Channel mapping as :func:`ps_roi_align`.
    """
    call, p = _roi_pool_call(input, rois, output_size, spatial_scale, True, backend)
    return _forward(call, p, "roi_pool_forward")


@dlpack_entry
def ps_roi_pool_backward(grad_output, input, rois, output_size, spatial_scale=1.0, *, backend=None,
                         deterministic=False) -> RoIGrads:
    """Gradient of :func:`ps_roi_pool` with respect to ``input``."""
    _require_grad_output(grad_output)
    call, p = _roi_pool_call(input, rois, output_size, spatial_scale, True, backend, grad_output)
    return _input_grad(call, p, _backward_method(call, "roi_pool", deterministic))


def deform_roi_pool_params(shapes, k, output_size, spatial_scale, sampling_ratio, gamma) -> DeformRoIPoolParams:
    """Check deform_roi_pool arguments given the array shapes (``input``, optional ``offset``,
    ``mask``, ``grad_output``; None = absent) and the roi count ``k``."""
    n, channels, height, width = _image(shapes["input"])
    pooled_h, pooled_w = int_pair("output_size", output_size, minimum=1)
    _check_shape("offset", shapes.get("offset"), (k, 2, pooled_h, pooled_w))
    _check_shape("mask", shapes.get("mask"), (k, 1, pooled_h, pooled_w))
    params = DeformRoIPoolParams(
        channels, height, width, pooled_h, pooled_w,
        check_positive_float("spatial_scale", spatial_scale), check_samples_per_axis("sampling_ratio", sampling_ratio),
        check_finite_float("gamma", gamma), shapes.get("offset") is not None, shapes.get("mask") is not None,
    )
    _check_shape("grad_output", shapes.get("grad_output"), roi_output_shape(params, k))
    return params


def _deform_roi_pool_call(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask, backend,
                          grad_output=None):
    arrays = {"input": input, "offset": offset, "mask": mask, "grad_output": grad_output}
    call = _prepare(arrays, {"input": 4, "offset": 4, "mask": 4, "grad_output": 4}, rois, backend)
    return call, deform_roi_pool_params(_shapes(call.arrays), call.rois.shape[0], output_size, spatial_scale,
                                        sampling_ratio, gamma)


@dlpack_entry
def deform_roi_pool(input, rois, offset=None, output_size=7, spatial_scale=1.0, sampling_ratio=0, gamma=0.1,
                    mask=None, *, backend=None):
    """Deformable RoI pooling (mmcv ``DeformRoIPool``; with ``mask``, ``ModulatedDeformRoIPool``).

    RoI Align with half-pixel box coordinates and no minimum roi size, each bin shifted by
    ``gamma * roi_width * offset[k, 0, ph, pw]`` in x and ``gamma * roi_height * offset[k, 1, ph, pw]``
    in y, its average multiplied by ``mask[k, 0, ph, pw]`` when given.

    Args:
        input: ``[N, C, H, W]``.
        rois: as :func:`roi_align`.
        offset: ``[K, 2, PH, PW]`` (x first) or None (plain RoI Align, aligned).
        output_size: ``PH`` or ``(PH, PW)``.
        spatial_scale, sampling_ratio: as :func:`roi_align` (``sampling_ratio <= 0``: adaptive).
        gamma: offset scale.
        mask: ``[K, 1, PH, PW]`` modulation or None.

    Returns:
        ``[K, C, PH, PW]``.
    """
    call, p = _deform_roi_pool_call(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask,
                                    backend)
    a = call.arrays
    return _forward(call, p, "deform_roi_pool_forward", a["offset"], a["mask"])


@dlpack_entry
def deform_roi_pool_backward(grad_output, input, rois, offset=None, output_size=7, spatial_scale=1.0,
                             sampling_ratio=0, gamma=0.1, mask=None, *, backend=None,
                             deterministic=False) -> DeformRoIPoolGrads:
    """Gradients of :func:`deform_roi_pool` with respect to ``input``, ``offset`` and ``mask``.

    ``grad_output`` is ``[K, C, PH, PW]``; the offset and mask gradients are None when the
    forward had none.
    """
    _require_grad_output(grad_output)
    call, p = _deform_roi_pool_call(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask,
                                    backend, grad_output)
    a = call.arrays
    method = _backward_method(call, "deform_roi_pool", deterministic)

    def launch(grad_input, grad_offset, grad_mask):
        method(
            a["grad_output"], a["input"], call.rois, a["offset"], a["mask"], grad_input, grad_offset, grad_mask, p
        )

    grads = {"grad_input": "input", "grad_offset": "offset", "grad_mask": "mask"}
    return DeformRoIPoolGrads(*_accumulated_grads(call, grads, launch))


def deform_psroi_pool_params(shapes, k, output_dim, group_size, pooled_size, part_size, sample_per_part,
                             trans_std, spatial_scale) -> DeformPSRoIPoolParams:
    """Check deform_psroi_pool arguments given the array shapes (``input``, optional ``trans``,
    ``grad_output``) and the roi count ``k``."""
    n, channels, height, width = _image(shapes["input"])
    group_size = check_int("group_size", group_size, 1)
    pooled_size = check_int("pooled_size", pooled_size, 1)
    part_size = pooled_size if part_size is None or part_size == 0 else check_int("part_size", part_size, 1)
    sample_per_part = check_samples_per_axis("sample_per_part", sample_per_part, 1)
    if output_dim is None:
        if channels % (group_size * group_size):
            raise ValueError(
                f"input: channels ({channels}) must be output_dim * group_size^2 = output_dim * {group_size**2}"
            )
        output_dim = channels // (group_size * group_size)
    output_dim = check_int("output_dim", output_dim, 1)
    if channels != output_dim * group_size * group_size:
        raise ValueError(
            f"input: expected output_dim * group_size^2 = {output_dim * group_size * group_size} channels, "
            f"got {channels}"
        )
    num_classes = 1
    t = shapes.get("trans")
    if t is not None:
        if t[1] == 0 or t[1] % 2 or output_dim % (t[1] // 2):
            raise ValueError(
                f"trans: expected [K, 2*num_classes, part_size, part_size] with num_classes dividing "
                f"output_dim = {output_dim}, got shape {tuple(t)}"
            )
        num_classes = t[1] // 2
        _check_shape("trans", t, (k, 2 * num_classes, part_size, part_size))
    params = DeformPSRoIPoolParams(
        channels, height, width, output_dim, group_size, pooled_size, part_size, sample_per_part,
        check_finite_float("trans_std", trans_std), check_positive_float("spatial_scale", spatial_scale), num_classes,
        t is not None,
    )
    _check_shape("grad_output", shapes.get("grad_output"), roi_output_shape(params, k))
    return params


def _deform_psroi_pool_call(input, rois, trans, output_dim, group_size, pooled_size, part_size, sample_per_part,
                            trans_std, spatial_scale, backend, grad_output=None):
    arrays = {"input": input, "trans": trans, "grad_output": grad_output}
    call = _prepare(arrays, {"input": 4, "trans": 4, "grad_output": 4}, rois, backend)
    return call, deform_psroi_pool_params(_shapes(call.arrays), call.rois.shape[0], output_dim, group_size,
                                          pooled_size, part_size, sample_per_part, trans_std, spatial_scale)


@dlpack_entry
def deform_psroi_pool(input, rois, trans=None, output_dim=None, group_size=1, pooled_size=7, part_size=None,
                      sample_per_part=4, trans_std=0.0, spatial_scale=1.0, *, backend=None):
    """Deformable position-sensitive RoI pooling (Deformable ConvNets, MXNet ``DeformablePSROIPooling``).

    Each ``pooled_size^2`` bin averages ``sample_per_part^2`` bilinear samples of input channel
    ``(c*group_size + gh)*group_size + gw``, shifted by ``trans * trans_std * roi size``.

    Args:
        input: ``[N, output_dim*group_size^2, H, W]``.
        rois: as :func:`roi_align` (box corners are rounded, then scaled).
        trans: ``[K, 2*num_classes, part_size, part_size]`` or None (no deformation).
        output_dim: output channels; default ``C // group_size^2``.
        group_size: position-sensitive grid size.
        pooled_size: output is ``pooled_size x pooled_size``.
        part_size: trans grid size; None or 0 means ``pooled_size``.
        sample_per_part: samples per bin along each axis, 1 to 1024.
        trans_std: scale of ``trans``.
        spatial_scale: feature-map size / image size.

    Returns:
        ``[K, output_dim, pooled_size, pooled_size]``.
    """
    call, p = _deform_psroi_pool_call(input, rois, trans, output_dim, group_size, pooled_size, part_size,
                                      sample_per_part, trans_std, spatial_scale, backend)
    return _forward(call, p, "deform_psroi_pool_forward", call.arrays["trans"])


@dlpack_entry
def deform_psroi_pool_backward(grad_output, input, rois, trans=None, output_dim=None, group_size=1, pooled_size=7,
                               part_size=None, sample_per_part=4, trans_std=0.0, spatial_scale=1.0, *,
                               backend=None, deterministic=False) -> DeformPSRoIPoolGrads:
    """Gradients of :func:`deform_psroi_pool` with respect to ``input`` and ``trans``.

    ``grad_output`` is ``[K, output_dim, pooled_size, pooled_size]``; the trans gradient is None
    when ``trans`` is None.
    """
    _require_grad_output(grad_output)
    call, p = _deform_psroi_pool_call(input, rois, trans, output_dim, group_size, pooled_size, part_size,
                                      sample_per_part, trans_std, spatial_scale, backend, grad_output)
    a = call.arrays
    method = _backward_method(call, "deform_psroi_pool", deterministic)

    def launch(grad_input, grad_trans):
        method(a["grad_output"], a["input"], call.rois, a["trans"], grad_input, grad_trans, p)

    return DeformPSRoIPoolGrads(*_accumulated_grads(call, {"grad_input": "input", "grad_trans": "trans"}, launch))
