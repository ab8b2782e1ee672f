"""JAX integration: every pydeform op as a JAX function, differentiable ops with ``jax.custom_vjp``.

The forward and backward passes launch pydeform's kernels inside
``jax.experimental.buffer_callback`` on XLA's stream, so the functions work eagerly, under
``jax.jit`` and with ``jax.grad``; ``jax.vmap`` maps them sequentially (one launch per element).
XLA allocates everything: the results are XLA's output buffers, and the scratch the drivers
need (column buffers, float32 accumulators of half-type results) is requested from XLA as
extra outputs of the callback, sized by the op's workspace plan
(:func:`pydeform.deform_conv.deform_conv2d_workspace`, :func:`pydeform.roi.roi_workspace`,
:func:`pydeform.centernet.centernet_workspace`), the same plan the drivers take their buffers
from. Inputs are never written (on the CPU the
callback even hands them to the kernels as read-only NumPy views).

JAX CPU arrays run the Numba CPU kernels; JAX GPU arrays run the CuPy kernels (``backend=None``
or ``"cupy"``) or the Numba CUDA kernels (``backend="numba"``) on XLA's CUDA stream.

On a JAX without ``buffer_callback`` the functions fall back, with a one-time warning, to the
array-level API through DLPack when called eagerly and to ``jax.pure_callback`` under
transformations (which runs the Numba CPU kernels on host copies of the arrays).

Example::

    import jax, jax.numpy as jnp
    import pydeform.jax as pdj

    def loss(weight, x, offset):
        return pdj.deform_conv2d(x, offset, weight, padding=1).sum()

    grad = jax.jit(jax.grad(loss))(weight, x, offset)
"""

from __future__ import annotations

import collections
import contextlib
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from . import centernet as _centernet
from . import deform_conv as _deform_conv
from . import deform_unet as _deform_unet
from . import roi as _roi
from . import semiconv as _semiconv
from ._arrays import (
    _CPU_DTYPES, _GPU_DTYPES, accumulation_dtype, check_backend, check_bool, dtype_mismatch, int_pair,
    unchecked_values,
)
from ._interop import _DLPACK_CUDA
from ._rois import boxes_from_lists, check_box_dtype, check_roi_values
from ._workspace import provided
from .backends import kernel_set
from .deform_conv import deform_conv2d_geometry, deform_conv2d_workspace

__all__ = [
    "affinity",
    "assign_to_centers",
    "centernet_decode",
    "centernet_focal_loss",
    "centernet_targets",
    "deform_conv2d",
    "deform_conv_transpose2d",
    "deform_pool2d",
    "deform_psroi_pool",
    "deform_roi_pool",
    "hough_peaks",
    "hough_votes",
    "instance_mean_loss",
    "instance_means",
    "ps_roi_align",
    "ps_roi_pool",
    "roi_align",
    "roi_pool",
    "seeded_mask_logits",
    "semiconv_embed",
]


def buffer_callback_available() -> bool:
    """Whether this JAX has ``jax.experimental.buffer_callback`` (else the fallback is used)."""
    try:
        from jax.experimental.buffer_callback import buffer_callback  # noqa: F401
    except ImportError:
        return False
    return True


_fallback_warned = False


def _warn_fallback():
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(
            f"pydeform.jax: this JAX ({jax.__version__}) has no jax.experimental.buffer_callback; "
            "eager calls go through DLPack and traced calls through jax.pure_callback (host copies, "
            "Numba CPU kernels)",
            RuntimeWarning,
            stacklevel=4,
        )


# ----------------------------------------------------------------------------------------------
# Running a driver on XLA's buffers


def _native(buffer, *, writeable: bool):
    """A NumPy (CPU) or CuPy (GPU) view of an XLA buffer."""
    if int(buffer.__dlpack_device__()[0]) == _DLPACK_CUDA:
        import cupy

        # CuPy takes the dtype from the CUDA array interface's typestr, which for bfloat16 is
        # "<V2" (a void type): the buffer's own dtype says what the bytes are.
        return cupy.asarray(buffer).view(buffer.dtype)
    array = np.asarray(buffer)
    if not writeable:
        array = array.view()
        array.flags.writeable = False
    return array


@contextlib.contextmanager
def _on_xla_stream(ctx, buffer):
    """Make XLA's stream (and the buffer's GPU) CuPy's current ones; nothing to do on the CPU.

    Box and label values are not checked inside a callback (see :func:`_check_values`), where an
    exception could only surface as XLA's runtime error: the kernels give a bad roi zero outputs
    and draw no bad CenterNet object."""
    device_type, device_id = (int(v) for v in buffer.__dlpack_device__())
    if device_type != _DLPACK_CUDA:
        with unchecked_values():
            yield
        return
    import cupy

    with cupy.cuda.Device(device_id), cupy.cuda.ExternalStream(ctx.stream, device_id), unchecked_values():
        yield


def _pointer(array) -> int:
    interface = getattr(array, "__cuda_array_interface__", None) or array.__array_interface__
    return interface["data"][0]


@functools.lru_cache(maxsize=None)
def _callback(run, names: tuple, backend):
    """The buffer_callback body for ``run``; cached so that equal calls reuse XLA's compilation.
    The driver gets XLA's buffers for its outputs and scratch and nothing else."""

    def callback(ctx, out, *buffers):
        with _on_xla_stream(ctx, (buffers + tuple(out.values()))[0]):
            arrays = {name: _native(b, writeable=False) for name, b in zip(names, buffers)}
            targets = {slot: _native(b, writeable=True) for slot, b in out.items()}
            with provided(targets):
                results = run(arrays, backend)
            for name, value in results.items():
                # Every result must be written in XLA's output buffer itself, never copied in.
                if value is not None and value.size and _pointer(value) != _pointer(targets[name]):
                    raise RuntimeError(f"pydeform.jax: result {name!r} was not written into XLA's output buffer")

    return callback


def _varying_axes(values) -> frozenset:
    """The mesh axes along which any of ``values`` varies inside ``shard_map`` (none elsewhere)."""
    typeof = getattr(jax, "typeof", None)  # JAX without it has no varying-axes types
    if typeof is None:
        return frozenset()
    axes = set()
    for value in values:
        aval = typeof(value)
        manual = getattr(aval, "manual_axis_type", None)  # JAX >= 0.10; before: aval.vma
        axes.update(manual.varying if manual is not None else getattr(aval, "vma", ()))
    return frozenset(axes)


def _varying(value, axes: frozenset):
    """``value`` typed as varying along ``axes`` too, as JAX types a primitive's operands and
    results inside ``shard_map``: a callback's results carry no varying axes of their own, and a
    custom_vjp's gradients must have the type of their inputs."""
    missing = tuple(sorted(axes - _varying_axes([value])))
    return jax.lax.pcast(value, missing, to="varying") if missing else value


def _launch(run, arrays: dict, outputs: dict, plan: dict, backend) -> dict:
    """Run ``run(native arrays, backend) -> {name: result}`` on ``arrays`` (JAX arrays or tracers).

    ``outputs`` and ``plan`` map output and scratch slot names to ``(shape, dtype)``; XLA
    allocates both and the drivers find them through :func:`pydeform._workspace.provided`.
    Returns the outputs as JAX arrays.
    """
    names = tuple(arrays)
    values = [arrays[name] for name in names]
    if not buffer_callback_available():
        return _fallback(run, names, values, outputs, backend)
    from jax.experimental.buffer_callback import buffer_callback

    slots = {**outputs, **plan}
    results = {slot: jax.ShapeDtypeStruct(tuple(shape), dtype) for slot, (shape, dtype) in slots.items()}
    flat = buffer_callback(_callback(run, names, backend), results, vmap_method="sequential")(*values)
    axes = _varying_axes(values)
    return {name: _varying(flat[name], axes) for name in outputs}


def _fallback(run, names, values, outputs, backend) -> dict:
    _warn_fallback()
    if not any(isinstance(v, jax.core.Tracer) for v in values):
        # The array-level API takes JAX arrays through DLPack and returns JAX arrays.
        results = run(dict(zip(names, values)), backend)
        return {name: results[name] for name in outputs}

    def host(*arrays):
        with unchecked_values():  # traced values: not checked, as in a buffer_callback
            results = run(dict(zip(names, (np.asarray(a) for a in arrays))), None)
        return {name: np.asarray(results[name]) for name in outputs}

    shapes = {name: jax.ShapeDtypeStruct(tuple(shape), dtype) for name, (shape, dtype) in outputs.items()}
    return jax.pure_callback(host, shapes, *values, vmap_method="sequential")


# ----------------------------------------------------------------------------------------------
# Differentiable ops


def _library() -> str:
    """The array library the callbacks see on this JAX's default platform."""
    return "numpy" if jax.default_backend() == "cpu" else "cupy"


def _kernels(family: str, backend):
    """The kernel set of ``family`` the callbacks will run on this JAX's default platform."""
    return kernel_set(family, _library(), check_backend(backend, _library()))


def _check_values(check, *arrays) -> None:
    """Run the array API's ``check(*numpy arrays, np)`` of box / label values on ``arrays`` when
    they are concrete CPU arrays (an eager call on the CPU), before anything is launched.

    Traced values (under ``jit``, ``vmap``, ...) are not known yet, and on the GPU reading them
    would synchronise; there the kernels keep bad values out (see :func:`_on_xla_stream`).
    """
    if _library() == "numpy" and not any(isinstance(a, jax.core.Tracer) for a in arrays):
        check(*(np.asarray(a) for a in arrays), np)


def _check_arrays(arrays: dict, ranks: dict) -> np.dtype:
    """JAX-side twin of :func:`pydeform._arrays.check_arrays` on abstract values: one floating
    dtype for all, the documented ranks. Returns the dtype."""
    present = {name: value for name, value in arrays.items() if value is not None}
    first_name, first = next(iter(present.items()))
    allowed = _CPU_DTYPES if jax.default_backend() == "cpu" else _GPU_DTYPES
    for name, value in present.items():
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise TypeError(f"{name}: expected a JAX array, got {type(value).__module__}.{type(value).__qualname__}")
        dtype = np.dtype(value.dtype)
        if dtype.name not in allowed:
            raise TypeError(
                f"{name}: expected a floating dtype among {', '.join(allowed)} on the {jax.default_backend()} "
                f"backend, got {dtype.name}"
            )
        if dtype != np.dtype(first.dtype):
            raise dtype_mismatch(name, first_name, present)
        if value.ndim != ranks[name]:
            raise ValueError(f"{name}: expected a {ranks[name]}-d array, got {value.ndim}-d with shape {value.shape}")
    return np.dtype(first.dtype)


def _hashable(value):
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


class _Op:
    """One array-level op and its backward as a family of ``custom_vjp`` functions.

    ``forward(**arrays, **static, backend=)`` and ``backward(grad_output=, **arrays, **static,
    backend=)`` are the array-level API functions; ``plan(shapes, dtype, static, backend,
    deterministic)`` checks the shapes and static arguments and returns ``(output shape, output
    dtype, forward plan, backward plan)`` (scratch plans, see :func:`_launch`); ``dtype`` is the
    first array's. A static ``deterministic`` (the ops with a deterministic mode) goes to the
    backward only, or to the forward only with ``deterministic_forward`` (an op whose forward
    scatters: deform_conv_transpose2d).
    Gradients are returned for every array argument; ``no_grad`` ones (the boxes, a target) get
    zeros. A backward returning one array (not a NamedTuple) gives the first argument's gradient.
    """

    def __init__(self, forward, backward, plan, no_grad=(), deterministic_forward=False):
        self.forward, self.backward, self.plan, self.no_grad = forward, backward, plan, no_grad
        self.deterministic_forward = deterministic_forward

    def __call__(self, arrays: dict, static: dict, backend):
        check_backend(backend, _library())
        present = tuple(name for name, value in arrays.items() if value is not None)
        key = tuple(sorted((name, _hashable(value)) for name, value in static.items()))
        # Check everything at trace time, before a callback is built.
        forward_static, deterministic = _split_deterministic(static)
        self.plan({name: tuple(arrays[name].shape) for name in present}, np.dtype(arrays[present[0]].dtype),
                  forward_static, backend, deterministic)
        op = self._vjp(present, key, backend)
        # Under shard_map every array enters varying along the same axes (a replicated weight
        # too), so each gradient has its input's type; JAX sums a replicated input's gradient.
        axes = _varying_axes(arrays[name] for name in present)
        return op(*(_varying(arrays[name], axes) for name in present))

    @functools.lru_cache(maxsize=None)
    def _vjp(self, present: tuple, key: tuple, backend):
        static, deterministic = _split_deterministic(dict(key))
        forward_static, backward_static = static, dict(key)
        if self.deterministic_forward:
            forward_static, backward_static = dict(key), static

        def plan(arrays: dict):
            shapes = {name: tuple(a.shape) for name, a in arrays.items()}
            return (*self.plan(shapes, np.dtype(arrays[present[0]].dtype), static, backend, deterministic), shapes)

        def run_forward(arrays, backend):
            return {"output": self.forward(**arrays, **forward_static, backend=backend)}

        def run_backward(arrays, backend):
            grads = self.backward(**arrays, **backward_static, backend=backend)
            if not isinstance(grads, tuple):
                return {f"grad_{present[0]}": grads}
            return {f"grad_{name}": value for name, value in grads._asdict().items() if value is not None}

        def fwd(*values):
            arrays = dict(zip(present, values))
            output_shape, output_dtype, forward_plan, _, _ = plan(arrays)
            out = _launch(run_forward, arrays, {"output": (output_shape, output_dtype)}, forward_plan, backend)
            return out["output"], values

        def bwd(values, grad_output):
            arrays = dict(zip(present, values))
            _, _, _, backward_plan, shapes = plan(arrays)
            dtype = arrays[present[0]].dtype
            grads = {f"grad_{name}": (shapes[name], dtype) for name in present if name not in self.no_grad}
            results = _launch(run_backward, {"grad_output": grad_output, **arrays}, grads, backward_plan, backend)
            return tuple(
                jnp.zeros_like(arrays[name]) if name in self.no_grad else results[f"grad_{name}"] for name in present
            )

        @jax.custom_vjp
        def op(*values):
            return fwd(*values)[0]

        op.defvjp(fwd, bwd)
        return op


def _split_deterministic(static: dict) -> tuple:
    """``(static without "deterministic", its value or False)``."""
    rest = {name: value for name, value in static.items() if name != "deterministic"}
    return rest, static.get("deterministic", False)


def _deform_conv2d_plan(shapes, dtype, static, backend, deterministic):
    geometry = deform_conv2d_geometry(shapes, static["stride"], static["padding"], static["dilation"])
    n = shapes["input"][0]
    kernels, masked = _kernels("deform_conv2d", backend), shapes.get("mask") is not None
    return (
        (n, geometry.out_channels, geometry.out_h, geometry.out_w),
        dtype,
        deform_conv2d_workspace(kernels, n, geometry, dtype, backward=False, masked=masked),
        deform_conv2d_workspace(kernels, n, geometry, dtype, backward=True, masked=masked,
                                deterministic=deterministic),
    )


_DEFORM_CONV2D = _Op(_deform_conv.deform_conv2d, _deform_conv.deform_conv2d_backward, _deform_conv2d_plan)


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None, *, backend=None,
                  deterministic=False):
    """:func:`pydeform.deform_conv2d` on JAX arrays, differentiable in every array argument.

    Args:
        input: ``[N, C, H, W]``.
        offset: ``[N, 2*Goff*kh*kw, Ho, Wo]``.
        weight: ``[C_out, C/G, kh, kw]``.
        bias: ``[C_out]`` or None.
        stride, padding, dilation: an int or an ``(h, w)`` pair.
        mask: ``[N, Goff*kh*kw, Ho, Wo]`` or None (DCNv1).
        backend: None, ``"cupy"`` or ``"numba"`` (GPU arrays; CPU arrays always run Numba).
        deterministic: run the backward in its deterministic mode (bit-identical gradients, see
            :func:`pydeform.deform_conv2d_backward`); a static argument.

    Returns:
        ``[N, C_out, Ho, Wo]``, a JAX array of ``input``'s dtype.
    """
    arrays = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    for name in ("input", "offset", "weight"):
        if arrays[name] is None:
            raise TypeError(f"{name}: expected an array, got None")
    _check_arrays(arrays, {"input": 4, "offset": 4, "weight": 4, "bias": 1, "mask": 4})
    static = {
        "stride": int_pair("stride", stride, minimum=1),
        "padding": int_pair("padding", padding, minimum=0),
        "dilation": int_pair("dilation", dilation, minimum=1),
        "deterministic": check_bool("deterministic", deterministic),
    }
    return _DEFORM_CONV2D(arrays, static, backend)


# Deformable U-Net operators


def _deform_conv_transpose2d_plan(shapes, dtype, static, backend, deterministic):
    geometry = _deform_unet.deform_conv_transpose2d_geometry(
        shapes, static["stride"], static["padding"], static["output_padding"], static["dilation"], static["groups"])
    n = shapes["input"][0]
    kernels, masked = _kernels("deform_conv2d", backend), shapes.get("mask") is not None
    return (
        (n, geometry.in_channels, geometry.height, geometry.width),
        dtype,
        _deform_unet.deform_conv_transpose2d_workspace(kernels, n, geometry, dtype, backward=False, masked=masked,
                                                       deterministic=deterministic),
        _deform_unet.deform_conv_transpose2d_workspace(kernels, n, geometry, dtype, backward=True, masked=masked),
    )


_DEFORM_CONV_TRANSPOSE2D = _Op(_deform_unet.deform_conv_transpose2d, _deform_unet.deform_conv_transpose2d_backward,
                               _deform_conv_transpose2d_plan, deterministic_forward=True)


def deform_conv_transpose2d(input, offset, weight, bias=None, stride=1, padding=0, output_padding=0, dilation=1,
                            groups=1, mask=None, *, backend=None, deterministic=False):
    """:func:`pydeform.deform_conv_transpose2d` on JAX arrays, differentiable in every array argument.

    ``input [N, C_in, H, W]``, ``offset [N, 2*Goff*kh*kw, H, W]``, ``weight [C_in, C_out/groups, kh,
    kw]``, ``bias [C_out]`` or None, ``mask [N, Goff*kh*kw, H, W]`` or None; returns
    ``[N, C_out, H_out, W_out]``. ``deterministic`` (static): run the forward's splat in its
    deterministic mode (bit-identical outputs, see :func:`pydeform.deform_conv_transpose2d`; the
    backward has no scatter).
    """
    arrays = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    for name in ("input", "offset", "weight"):
        if arrays[name] is None:
            raise TypeError(f"{name}: expected an array, got None")
    _check_arrays(arrays, {"input": 4, "offset": 4, "weight": 4, "bias": 1, "mask": 4})
    static = {
        "stride": int_pair("stride", stride, minimum=1),
        "padding": int_pair("padding", padding, minimum=0),
        "output_padding": int_pair("output_padding", output_padding, minimum=0),
        "dilation": int_pair("dilation", dilation, minimum=1),
        "groups": groups,
        "deterministic": check_bool("deterministic", deterministic),
    }
    return _DEFORM_CONV_TRANSPOSE2D(arrays, static, backend)


def _deform_pool2d_plan(shapes, dtype, static, backend, deterministic):
    max_mode = _deform_unet._check_mode(static["mode"])
    geometry = _deform_unet.deform_pool2d_geometry(
        shapes, static["kernel_size"], static["stride"], static["padding"], static["dilation"])
    n = shapes["input"][0]
    kernels, masked = _kernels("deform_pool2d", backend), shapes.get("mask") is not None

    def workspace(backward):
        return _deform_unet.deform_pool2d_workspace(kernels, n, geometry, dtype, backward=backward, masked=masked,
                                                    recompute_indices=max_mode, deterministic=deterministic)

    return (n, geometry.channels, geometry.out_h, geometry.out_w), dtype, workspace(False), workspace(True)


_DEFORM_POOL2D = _Op(_deform_unet.deform_pool2d, _deform_unet.deform_pool2d_backward, _deform_pool2d_plan)


def deform_pool2d(input, offset, kernel_size, stride=None, padding=0, dilation=1, mode="max", mask=None, *,
                  backend=None, deterministic=False):
    """:func:`pydeform.deform_pool2d` on JAX arrays, differentiable in input, offset and mask
    (max mode recomputes the arg-max in the backward).

    ``input [N, C, H, W]``, ``offset [N, 2*Goff*kh*kw, Ho, Wo]``, ``mask [N, Goff*kh*kw, Ho, Wo]``
    or None; returns ``[N, C, Ho, Wo]``. ``deterministic`` (static): run the backward in its
    deterministic mode (see :func:`pydeform.deform_pool2d_backward`).
    """
    arrays = {"input": input, "offset": offset, "mask": mask}
    for name in ("input", "offset"):
        if arrays[name] is None:
            raise TypeError(f"{name}: expected an array, got None")
    _check_arrays(arrays, {"input": 4, "offset": 4, "mask": 4})
    static = {
        "kernel_size": int_pair("kernel_size", kernel_size, minimum=1),
        "stride": None if stride is None else int_pair("stride", stride, minimum=1),
        "padding": int_pair("padding", padding, minimum=0),
        "dilation": int_pair("dilation", dilation, minimum=1),
        "mode": mode,
        "deterministic": check_bool("deterministic", deterministic),
    }
    return _DEFORM_POOL2D(arrays, static, backend)


def _rois(rois, dtype):
    """``rois`` as one ``[K, 5]`` JAX array: per-image ``[L_i, 4]`` lists get their batch index."""
    acc = accumulation_dtype(dtype)
    rois = boxes_from_lists(rois, lambda host: jnp.asarray(host, dtype=acc))
    if isinstance(rois, (list, tuple)):
        parts = []
        for i, boxes in enumerate(rois):
            if getattr(boxes, "ndim", None) != 2 or boxes.shape[1] != 4:
                raise ValueError(f"rois[{i}]: expected shape [K, 4], got {getattr(boxes, 'shape', type(boxes))}")
            check_box_dtype(f"rois[{i}]", boxes.dtype, dtype)
            index = jnp.full((boxes.shape[0], 1), i, dtype=acc)
            parts.append(jnp.concatenate([index, boxes.astype(acc)], axis=1))
        return jnp.concatenate(parts, axis=0) if parts else jnp.zeros((0, 5), dtype=acc)
    if not hasattr(rois, "shape") or rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois: expected a [K, 5] array, got {getattr(rois, 'shape', type(rois))}")
    check_box_dtype("rois", rois.dtype, dtype)
    # The kernels read boxes in the accumulation dtype; converting here keeps it out of the callback.
    return rois.astype(acc)


def _roi_family(forward, backward, params):
    """An :class:`_Op` for a RoI op whose ``params(shapes, k, **static)`` checks its arguments."""

    def plan(shapes, dtype, static, backend, deterministic):
        k = shapes["rois"][0]
        checked = params(shapes, k, **static)
        kernels = _kernels("roi", backend)
        return (
            _roi.roi_output_shape(checked, k),
            dtype,
            _roi.roi_workspace(kernels, checked, shapes, dtype, backward=False),
            _roi.roi_workspace(kernels, checked, shapes, dtype, backward=True, deterministic=deterministic),
        )

    return _Op(forward, backward, plan, no_grad=("rois",))


def _roi_call(op, input, rois, static, backend, **optional):
    """``static`` holds the op's static arguments and ``deterministic`` (checked here)."""
    if input is None:
        raise TypeError("input: expected an array, got None")
    check_bool("deterministic", static["deterministic"])
    dtype = _check_arrays({"input": input, **optional}, {"input": 4, **{name: 4 for name in optional}})
    rows = _rois(rois, dtype)
    _check_values(lambda boxes, xp: check_roi_values(boxes, input.shape[0], xp), rows)
    return op({"input": input, "rois": rows, **optional}, static, backend)


_ROI_ALIGN = _roi_family(
    _roi.roi_align, _roi.roi_align_backward,
    lambda shapes, k, output_size, spatial_scale, sampling_ratio, aligned, mode: _roi.roi_align_params(
        shapes, k, output_size, spatial_scale, sampling_ratio, aligned, mode, False),
)
_PS_ROI_ALIGN = _roi_family(
    _roi.ps_roi_align, _roi.ps_roi_align_backward,
    lambda shapes, k, output_size, spatial_scale, sampling_ratio: _roi.roi_align_params(
        shapes, k, output_size, spatial_scale, sampling_ratio, True, "avg", True),
)
_ROI_POOL = _roi_family(
    _roi.roi_pool, _roi.roi_pool_backward,
    lambda shapes, k, output_size, spatial_scale: _roi.roi_pool_params(shapes, k, output_size, spatial_scale, False),
)
_PS_ROI_POOL = _roi_family(
    _roi.ps_roi_pool, _roi.ps_roi_pool_backward,
    lambda shapes, k, output_size, spatial_scale: _roi.roi_pool_params(shapes, k, output_size, spatial_scale, True),
)
_DEFORM_ROI_POOL = _roi_family(_roi.deform_roi_pool, _roi.deform_roi_pool_backward, _roi.deform_roi_pool_params)
_DEFORM_PSROI_POOL = _roi_family(_roi.deform_psroi_pool, _roi.deform_psroi_pool_backward,
                                 _roi.deform_psroi_pool_params)


def roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, mode="avg", *,
              backend=None, deterministic=False):
    """:func:`pydeform.roi_align` on JAX arrays, differentiable in ``input`` (the boxes get a
    zero gradient). ``deterministic`` (static, on every RoI op here): run the backward in its
    deterministic mode (see :func:`pydeform.roi_align_backward`).

    ``input [N, C, H, W]``; ``rois [K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` or a list of
    per-image ``[L_i, 4]`` boxes. Returns ``[K, C, PH, PW]``.
    """
    static = dict(output_size=output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                  aligned=aligned, mode=mode, deterministic=deterministic)
    return _roi_call(_ROI_ALIGN, input, rois, static, backend)


def ps_roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, *, backend=None, deterministic=False):
    """:func:`pydeform.ps_roi_align` on JAX arrays: ``input [N, C_out*PH*PW, H, W]``, ``rois`` as
    :func:`roi_align`; returns ``[K, C_out, PH, PW]``, differentiable in ``input``."""
    static = dict(output_size=output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                  deterministic=deterministic)
    return _roi_call(_PS_ROI_ALIGN, input, rois, static, backend)


def roi_pool(input, rois, output_size, spatial_scale=1.0, *, backend=None, deterministic=False):
    """:func:`pydeform.roi_pool` on JAX arrays: ``input [N, C, H, W]``, ``rois`` as
    :func:`roi_align`; returns ``[K, C, PH, PW]``, differentiable in ``input``."""
    static = dict(output_size=output_size, spatial_scale=spatial_scale, deterministic=deterministic)
    return _roi_call(_ROI_POOL, input, rois, static, backend)


def ps_roi_pool(input, rois, output_size, spatial_scale=1.0, *, backend=None, deterministic=False):
    """:func:`pydeform.ps_roi_pool` on JAX arrays: ``input [N, C_out*PH*PW, H, W]``, ``rois`` as
    :func:`roi_align`; returns ``[K, C_out, PH, PW]``, differentiable in ``input``."""
    static = dict(output_size=output_size, spatial_scale=spatial_scale, deterministic=deterministic)
    return _roi_call(_PS_ROI_POOL, input, rois, static, backend)


def deform_roi_pool(input, rois, offset=None, output_size=7, spatial_scale=1.0, sampling_ratio=0, gamma=0.1,
                    mask=None, *, backend=None, deterministic=False):
    """:func:`pydeform.deform_roi_pool` on JAX arrays, differentiable in ``input``, ``offset``, ``mask``.

    ``input [N, C, H, W]``, ``rois`` as :func:`roi_align`, ``offset [K, 2, PH, PW]`` or None,
    ``mask [K, 1, PH, PW]`` or None; returns ``[K, C, PH, PW]``.
    """
    static = dict(output_size=output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, gamma=gamma,
                  deterministic=deterministic)
    return _roi_call(_DEFORM_ROI_POOL, input, rois, static, backend, offset=offset, mask=mask)


def deform_psroi_pool(input, rois, trans=None, output_dim=None, group_size=1, pooled_size=7, part_size=None,
                      sample_per_part=4, trans_std=0.0, spatial_scale=1.0, *, backend=None, deterministic=False):
    """:func:`pydeform.deform_psroi_pool` on JAX arrays, differentiable in ``input`` and ``trans``.

    ``input [N, output_dim*group_size^2, H, W]``, ``rois`` as :func:`roi_align`, ``trans
    [K, 2*num_classes, part_size, part_size]`` or None; returns
    ``[K, output_dim, pooled_size, pooled_size]``.
    """
    static = dict(output_dim=output_dim, group_size=group_size, pooled_size=pooled_size, part_size=part_size,
                  sample_per_part=sample_per_part, trans_std=trans_std, spatial_scale=spatial_scale,
                  deterministic=deterministic)
    return _roi_call(_DEFORM_PSROI_POOL, input, rois, static, backend, trans=trans)


# ----------------------------------------------------------------------------------------------
# CenterNet


def _check_on_empty_batch(function, arrays: dict, **static):
    """Run the array-level ``function``'s checks at trace time on NumPy stand-ins with batch 0
    (every check but the batch size, which all arrays must share; nothing is computed)."""
    present = {name: value for name, value in arrays.items() if value is not None}
    first_name, first = next(iter(present.items()))
    for name, value in present.items():
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise TypeError(f"{name}: expected a JAX array, got {type(value).__module__}.{type(value).__qualname__}")
        if value.ndim and first.ndim and value.shape[0] != first.shape[0]:
            raise ValueError(f"{name}: expected batch size {first.shape[0]} like {first_name}, got shape {value.shape}")
    stand_ins = {name: np.empty((0,) + tuple(v.shape[1:]), _stand_in_dtype(v.dtype)) for name, v in present.items()}
    try:
        function(**stand_ins, **static)
    except (TypeError, ValueError) as error:
        # Report the caller's batch size, not the stand-ins'.
        raise type(error)(str(error).replace("(0, ", f"({first.shape[0]}, ")) from None


def _stand_in_dtype(dtype) -> np.dtype:
    """Half types exist on the GPU only; the checks are the same for float32 stand-ins."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.kind not in "iub" and dtype.name not in _CPU_DTYPES else dtype


@functools.lru_cache(maxsize=None)
def _centernet_run(function, key: tuple):
    """The callback's ``run`` of the array-level ``function`` with static arguments ``key``."""
    static = dict(key)

    def run(arrays, backend):
        result = function(**arrays, **static, backend=backend)
        return result._asdict() if isinstance(result, tuple) else {"output": result}

    return run


def centernet_decode(heat, wh, reg=None, K=100, *, kernel=3, cat_spec_wh=False, down_ratio=1.0, threshold=None,
                     backend=None):
    """:func:`pydeform.centernet_decode` on JAX arrays (no gradient: the inputs are
    ``stop_gradient``-ed).

    Args:
        heat: ``[B, C, H, W]`` class scores (after the sigmoid).
        wh: ``[B, 2, H, W]``, or ``[B, 2C, H, W]`` with ``cat_spec_wh``.
        reg: ``[B, 2, H, W]`` or None.
        K, kernel, cat_spec_wh, down_ratio, threshold, backend: as :func:`pydeform.centernet_decode`.

    Returns:
        ``[B, K, 6]`` rows ``(x1, y1, x2, y2, score, class)`` in heat's accumulation dtype.
    """
    arrays = {"heat": heat, "wh": wh, "reg": reg}
    for name in ("heat", "wh"):
        if arrays[name] is None:
            raise TypeError(f"{name}: expected an array, got None")
    dtype = _check_arrays(arrays, {"heat": 4, "wh": 4, "reg": 4})
    static = dict(K=K, kernel=kernel, cat_spec_wh=cat_spec_wh, down_ratio=down_ratio, threshold=threshold)
    _check_on_empty_batch(_centernet.centernet_decode, arrays, **static)
    params = _centernet.centernet_decode_params(heat.shape, wh.shape, None if reg is None else reg.shape, **static)
    outputs, plan = _centernet.centernet_workspace(_kernels("centernet", backend), params, dtype)
    present = {name: jax.lax.stop_gradient(value) for name, value in arrays.items() if value is not None}
    run = _centernet_run(_centernet.centernet_decode, tuple(sorted(static.items())))
    return _launch(run, present, outputs, plan, backend)["output"]


def centernet_targets(boxes, labels, num_classes, output_size, *, down_ratio=4, min_overlap=0.7, max_objects=128,
                      backend=None):
    """:func:`pydeform.centernet_targets` on JAX arrays (no gradient: the boxes are
    ``stop_gradient``-ed).

    Args:
        boxes: ``[B, M, 4]`` float32 or float64 ``(x1, y1, x2, y2)`` in input-image pixels.
        labels: ``[B, M]`` integer class ids in ``[0, num_classes)``, -1 for padding.
        num_classes, output_size, down_ratio, min_overlap, max_objects, backend: as
            :func:`pydeform.centernet_targets`.

    Returns:
        :class:`pydeform.centernet.CenterNetTargets` of JAX arrays: heatmap
        ``[B, num_classes, out_h, out_w]``, wh and reg ``[B, max_objects, 2]`` (the boxes' dtype),
        ind ``[B, max_objects]`` int64, reg_mask ``[B, max_objects]`` uint8.
    """
    arrays = {"boxes": boxes, "labels": labels}
    for name, value in arrays.items():
        if value is None:
            raise TypeError(f"{name}: expected an array, got None")
    static = dict(num_classes=num_classes, output_size=_hashable(output_size), down_ratio=down_ratio,
                  min_overlap=min_overlap, max_objects=max_objects)
    _check_on_empty_batch(_centernet.centernet_targets, arrays, **static)
    check_backend(backend, _library())
    params = _centernet.centernet_targets_params(labels.shape, **static)
    _check_values(lambda b, l, xp: _centernet.check_target_values(b, l, params.num_classes, xp), boxes, labels)
    outputs, plan = _centernet.centernet_workspace(_kernels("centernet", backend), params, boxes.dtype,
                                                   labels_dtype=labels.dtype)
    run = _centernet_run(_centernet.centernet_targets, tuple(sorted(static.items())))
    results = _launch(run, {"boxes": jax.lax.stop_gradient(boxes), "labels": labels}, outputs, plan, backend)
    return _centernet.CenterNetTargets(**results)


def _focal_loss_plan(shapes, dtype, static, backend, deterministic):
    kernels = _kernels("centernet", backend)
    params = _centernet.FocalLossParams(float(static["alpha"]), float(static["beta"]))
    shape = shapes["pred"]
    forward_outputs, forward_plan = _centernet.centernet_workspace(kernels, params, dtype, shape=shape)
    _, backward_plan = _centernet.centernet_workspace(kernels, params, dtype, shape=shape, backward=True)
    return forward_outputs["output"][0], dtype, forward_plan, backward_plan


_FOCAL_LOSS = _Op(_centernet.centernet_focal_loss, _centernet.centernet_focal_loss_backward, _focal_loss_plan,
                  no_grad=("target",))


def centernet_focal_loss(pred, target, *, alpha=2, beta=4, backend=None):
    """:func:`pydeform.centernet_focal_loss` on JAX arrays, differentiable in ``pred`` (the
    target gets a zero gradient).

    Args:
        pred: ``[B, C, H, W]`` predicted heatmap.
        target: ``[B, C, H, W]`` target heatmap, pred's dtype.
        alpha, beta: finite exponents >= 0.

    Returns:
        The loss, a 0-d JAX array of pred's dtype.
    """
    arrays = {"pred": pred, "target": target}
    for name, value in arrays.items():
        if value is None:
            raise TypeError(f"{name}: expected an array, got None")
    _check_arrays(arrays, {"pred": 4, "target": 4})
    _check_on_empty_batch(_centernet.centernet_focal_loss, arrays, alpha=alpha, beta=beta)
    return _FOCAL_LOSS(arrays, dict(alpha=alpha, beta=beta), backend)


# ----------------------------------------------------------------------------------------------
# Semi-convolutional operators


def _require_arrays(arrays: dict) -> None:
    for name, value in arrays.items():
        if value is None:
            raise TypeError(f"{name}: expected an array, got None")


def _check_label_values(labels, num_instances) -> None:
    _check_values(lambda l, xp: _semiconv.check_label_values(l, num_instances), labels)


def semiconv_embed(phi, spacing=1.0):
    """:func:`pydeform.semiconv_embed` on a JAX array ``[N, D, H, W]`` (D >= 2): two broadcast
    additions in XLA, differentiable (the coordinates are constants)."""
    _require_arrays({"phi": phi})
    _check_arrays({"phi": phi}, {"phi": 4})
    cy, cx = _semiconv.coordinate_offsets("phi", phi.shape, True, spacing)
    height, width = phi.shape[2:]
    rows = (cy[0] * np.arange(height)).astype(phi.dtype)[:, None]
    columns = (cx[1] * np.arange(width)).astype(phi.dtype)[None, :]
    return jnp.asarray(phi).at[:, 0].add(rows).at[:, 1].add(columns)


def _semiconv_run(function, key: tuple, statistics: bool = False):
    """The callback's ``run`` of the array-level ``function`` with static arguments ``key``;
    ``statistics``: the loss's backward, taking the forward's statistics as arrays."""
    static = dict(key)

    def run(arrays, backend):
        if statistics:
            arrays = dict(arrays)
            saved = _semiconv.InstanceLossStatistics(*(arrays.pop(name) for name in ("means", "counts", "unit_sums")))
            return {"grad_psi": function(**arrays, **static, statistics=saved, backend=backend)}
        result = function(**arrays, **static, backend=backend)
        if isinstance(result, tuple) and not hasattr(result, "_asdict"):  # (loss, statistics)
            return {"output": result[0], **result[1]._asdict()}
        return result._asdict() if isinstance(result, tuple) else {"output": result}

    return run


def _loss_forward(**arguments):
    return _semiconv.instance_mean_loss(**arguments, return_statistics=True)


@functools.lru_cache(maxsize=None)
def _instance_mean_loss_vjp(key: tuple, backend):
    """The loss as a ``custom_vjp``: its forward returns the statistics, the backward's residuals."""
    static = dict(key)
    forward, backward = _semiconv_run(_loss_forward, key), _semiconv_run(_semiconv.instance_mean_loss_backward, key,
                                                                           statistics=True)

    def plans(psi):
        return _semiconv.semiconv_workspace(_kernels("semiconv", backend), "instance_mean_loss", {"psi": psi.shape},
                                            np.dtype(psi.dtype), static["num_instances"], static["reduction"])

    def fwd(psi, labels):
        outputs, plan, _ = plans(psi)
        results = _launch(forward, {"psi": psi, "labels": labels}, outputs, plan, backend)
        return results["output"], (psi, labels, results["means"], results["counts"], results["unit_sums"])

    def bwd(residuals, grad_output):
        psi, labels, means, counts, unit_sums = residuals
        arrays = {"grad_output": grad_output, "psi": psi, "labels": labels, "means": means, "counts": counts,
                  "unit_sums": unit_sums}
        grad = _launch(backward, arrays, {"grad_psi": (psi.shape, psi.dtype)}, plans(psi)[2], backend)["grad_psi"]
        return grad, None

    @jax.custom_vjp
    def op(psi, labels):
        return fwd(psi, labels)[0]

    op.defvjp(fwd, bwd)
    return op


def instance_mean_loss(psi, labels, num_instances, reduction="mean", *, coordinates=False, spacing=1.0, backend=None):
    """:func:`pydeform.instance_mean_loss` on JAX arrays, differentiable in psi: the forward
    returns the per-instance statistics as residuals, so the backward reads psi once.

    Args:
        psi: ``[N, D, H, W]`` embeddings (phi with ``coordinates=True``).
        labels: ``[N, H, W]`` integer labels in ``[0, num_instances]`` (checked eagerly on the CPU).
        num_instances, reduction, coordinates, spacing, backend: as the array API's.

    Returns:
        ``[N, K]`` ("none") or a 0-d array of psi's dtype.
    """
    arrays = {"psi": psi, "labels": labels}
    _require_arrays(arrays)
    _check_arrays({"psi": psi}, {"psi": 4})
    static = dict(num_instances=num_instances, reduction=reduction, coordinates=coordinates,
                  spacing=_hashable(spacing))
    _check_on_empty_batch(_semiconv.instance_mean_loss, arrays, **static)
    check_backend(backend, _library())
    _check_label_values(labels, num_instances)
    return _instance_mean_loss_vjp(tuple(sorted(static.items())), backend)(psi, labels)


def instance_means(psi, labels, num_instances, *, coordinates=False, spacing=1.0, backend=None):
    """:func:`pydeform.instance_means` on JAX arrays (no gradient): :class:`pydeform.InstanceMeans`
    of JAX arrays (means ``[N, K, D]`` psi's dtype, counts ``[N, K]`` int64)."""
    arrays = {"psi": psi, "labels": labels}
    _require_arrays(arrays)
    _check_arrays({"psi": psi}, {"psi": 4})
    static = dict(num_instances=num_instances, coordinates=coordinates, spacing=_hashable(spacing))
    _check_on_empty_batch(_semiconv.instance_means, arrays, **static)
    check_backend(backend, _library())
    _check_label_values(labels, num_instances)
    outputs, plan, _ = _semiconv.semiconv_workspace(_kernels("semiconv", backend), "instance_means",
                                                    {"psi": psi.shape}, np.dtype(psi.dtype), num_instances)
    run = _semiconv_run(_semiconv.instance_means, tuple(sorted(static.items())))
    results = _launch(run, {"psi": jax.lax.stop_gradient(psi), "labels": labels}, outputs, plan, backend)
    return _semiconv.InstanceMeans(**results)


def _by_argument(backward, names):
    """``backward`` (a NamedTuple of ``grad_<name>`` fields) as _Op reads gradients: one field
    per argument name."""
    gradients = collections.namedtuple("Gradients", names)
    return lambda **arguments: gradients(*backward(**arguments))


def _semiconv_plan(op):
    def plan(shapes, dtype, static, backend, deterministic):
        outputs, forward_plan, backward_plan = _semiconv.semiconv_workspace(_kernels("semiconv", backend), op, shapes,
                                                                            dtype)
        return (*outputs["output"], forward_plan, backward_plan)

    return plan


_AFFINITY = _Op(_semiconv.sigma_split(_semiconv.affinity),
                _by_argument(_semiconv.sigma_split(_semiconv.affinity_backward), ("psi", "centers", "sigma")),
                _semiconv_plan("affinity"))
_SEEDED_MASK_LOGITS = _Op(_semiconv.sigma_split(_semiconv.seeded_mask_logits),
                          _by_argument(_semiconv.sigma_split(_semiconv.seeded_mask_logits_backward),
                                       ("scores", "psi", "sigma")),
                          _semiconv_plan("seeded_mask_logits"))


def _sigma_call(op, function, arrays: dict, sigma, static: dict, backend):
    """``op`` with sigma an array (differentiable) or a number (the static ``sigma_value``)."""
    _require_arrays(arrays)
    if hasattr(sigma, "shape"):
        arrays = {**arrays, "sigma": sigma}
        static = {**static, "sigma_value": 1.0}
    else:
        static = {**static, "sigma_value": sigma}
    # sigma's rank and dtype: the array API's check on the stand-ins.
    _check_arrays({name: value for name, value in arrays.items() if name != "sigma"}, {"psi": 4, "centers": 3,
                                                                                       "scores": 3})
    _check_on_empty_batch(_semiconv.sigma_split(function), arrays, **static)
    return op(arrays, {**static, "spacing": _hashable(static["spacing"])}, backend)


def affinity(psi, centers, sigma, kernel="laplacian", *, coordinates=False, spacing=1.0, backend=None):
    """:func:`pydeform.affinity` on JAX arrays: ``[N, K, H, W]``, differentiable in psi, centers
    and sigma when it is an array ``[N, K]`` (a number gets no gradient)."""
    return _sigma_call(_AFFINITY, _semiconv.affinity, {"psi": psi, "centers": centers}, sigma,
                       dict(kernel=kernel, coordinates=coordinates, spacing=spacing), backend)


def seeded_mask_logits(scores, psi, sigma, mode="argmax", *, coordinates=False, spacing=1.0, backend=None):
    """:func:`pydeform.seeded_mask_logits` on JAX arrays: ``[R, h, w]``, differentiable in scores,
    psi and sigma when it is an array ``[R]``."""
    return _sigma_call(_SEEDED_MASK_LOGITS, _semiconv.seeded_mask_logits, {"scores": scores, "psi": psi}, sigma,
                       dict(mode=mode, coordinates=coordinates, spacing=spacing), backend)


def _voting_call(function, arrays: dict, static: dict, backend, **plan_options):
    """A voting op (no gradient) launched on ``arrays``, float ones stop_gradient-ed."""
    _require_arrays(arrays)
    _check_arrays({"psi": arrays["psi"]}, {"psi": 4})
    _check_on_empty_batch(function, arrays, **static)
    check_backend(backend, _library())
    shapes = {name: arrays[name].shape for name in ("psi", "centers") if name in arrays}
    outputs, plan, _ = _semiconv.semiconv_workspace(_kernels("semiconv", backend), function.__name__, shapes,
                                                    np.dtype(arrays["psi"].dtype), **plan_options)
    run = _semiconv_run(function, tuple(sorted(static.items())))
    values = {name: jax.lax.stop_gradient(value) for name, value in arrays.items()}
    return _launch(run, values, outputs, plan, backend)["output"]


def hough_votes(psi, foreground, shape=None, *, coordinates=False, spacing=1.0, backend=None):
    """:func:`pydeform.hough_votes` on JAX arrays: int32 ``[N, H', W']`` (no gradient)."""
    size = tuple(psi.shape[2:]) if shape is None else tuple(int_pair("shape", shape, minimum=1))
    return _voting_call(_semiconv.hough_votes, {"psi": psi, "foreground": foreground},
                        dict(shape=size, coordinates=coordinates, spacing=_hashable(spacing)), backend, vote_shape=size)


def assign_to_centers(psi, foreground, centers, max_distance=float("inf"), *, coordinates=False, spacing=1.0,
                      backend=None):
    """:func:`pydeform.assign_to_centers` on JAX arrays: int32 labels ``[N, H, W]`` (no gradient)."""
    return _voting_call(_semiconv.assign_to_centers, {"psi": psi, "foreground": foreground, "centers": centers},
                        dict(max_distance=max_distance, coordinates=coordinates, spacing=_hashable(spacing)), backend)


def hough_peaks(votes, K, *, min_votes=1, kernel=3, backend=None):
    """:func:`pydeform.hough_peaks` on JAX arrays through :func:`centernet_decode`:
    :class:`pydeform.HoughPeaks` of JAX arrays (centers float32 ``[N, K, 2]``, votes int32)."""
    _require_arrays({"votes": votes})
    _check_on_empty_batch(_semiconv.hough_peaks, {"votes": votes}, K=K, min_votes=min_votes, kernel=kernel)
    n, height, width = votes.shape
    heat = votes.astype(jnp.float32).reshape(n, 1, height, width)
    zeros = jnp.zeros((n, 2, height, width), jnp.float32)
    detections = centernet_decode(heat, zeros, zeros, K, kernel=kernel, threshold=float(min_votes), backend=backend)
    return _semiconv.peaks_of_detections(detections, jnp)
