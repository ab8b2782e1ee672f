"""PyTorch integration: every op as a ``torch.library`` custom op, functional wrappers and
``nn.Module``\\ s with torchvision / mmcv constructor arguments and parameter names.

Each op is a custom op in the ``pydeform`` namespace (``torch.ops.pydeform.<op>``) with a fake
implementation (output shapes from the same argument checks the array API uses), and each
differentiable op has its backward registered with ``register_autograd``, the backward itself a
custom op (``torch.ops.pydeform.<op>_backward``) running the analytic backward kernels; so
``torch.compile(..., fullgraph=True)`` traces them without graph breaks.

The scatters of deform_conv2d's, the RoI ops' and deform_pool2d's backwards and of
deform_conv_transpose2d's forward follow ``torch.use_deterministic_algorithms``: while it is on
they run in their deterministic mode (``deterministic=True`` of the array API: bit-identical
results in every run).

CPU tensors run the Numba CPU kernels. CUDA tensors run the CuPy kernels on the tensor's device
and on PyTorch's current stream, with every array the op allocates (outputs and scratch) taken
from PyTorch's caching allocator; tensors cross to CuPy and back through DLPack without a copy
or a synchronisation. Under ``torch.autocast("cuda")`` the ops run natively in the autocast
dtype (float16 or bfloat16, float32 accumulation inside the kernels); boxes keep their dtype.

Importing this module imports torch (never CuPy or Numba until an op runs).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from . import centernet as _centernet
from . import deform_conv as _deform_conv
from . import deform_unet as _deform_unet
from . import roi as _roi
from . import semiconv as _semiconv
from ._arrays import check_finite_float, int_pair, unchecked_values
from ._interop import to_native

__all__ = [
    "CenterNetDecoder",
    "DeformConv2d",
    "DeformConvTranspose2d",
    "DeformConvTranspose2dPack",
    "DeformPool2d",
    "DeformPool2dPack",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "InstanceMeanLoss",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "ModulatedDeformRoIPoolPack",
    "PSRoIAlign",
    "PSRoIPool",
    "RoIAlign",
    "RoIPool",
    "SemiConvEmbedding",
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


# ---------------------------------------------------------------------------------------------
# Running an array-level op on tensors


def _cupy_stream(stream):
    """PyTorch's stream as a CuPy stream (no new stream, no synchronisation)."""
    import cupy

    if hasattr(stream, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(stream)
    # PyTorch before 2.10 has no __cuda_stream__ protocol: wrap the raw handle.
    return cupy.cuda.ExternalStream(stream.cuda_stream, stream.device.index)


def _torch_allocator(device: torch.device):
    """A CuPy allocator handing out blocks of PyTorch's caching allocator on ``device``; each
    block lives as long as the CuPy array (and any tensor made from it) that holds it."""
    import cupy

    def allocate(size: int):
        block = torch.empty(size, dtype=torch.uint8, device=device)
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(block.data_ptr(), size, block, device.index), 0)

    return allocate


@contextlib.contextmanager
def _running_on(device: torch.device):
    """CUDA: make CuPy use ``device``, PyTorch's current stream there and PyTorch's allocator,
    with no host check of box and label values (a device-to-host read would synchronise)."""
    if device.type != "cuda":
        yield
        return
    import cupy

    with cupy.cuda.Device(device.index), _cupy_stream(torch.cuda.current_stream(device)), \
            cupy.cuda.using_allocator(_torch_allocator(device)), unchecked_values():
        yield


def _to_torch(result, device: torch.device):
    if result is None:
        return None
    if isinstance(result, tuple):
        return tuple(_to_torch(item, device) for item in result)
    if device.type == "cpu":
        # np.asarray: NumPy reductions of 0-d arrays give scalars.
        return torch.from_numpy(np.asarray(result))
    return torch.from_dlpack(result)


def _call(function, names: list, args: tuple):
    """``function`` (an array-level pydeform op) on a custom op's arguments, tensors exchanged
    through DLPack; returns tensors (a tuple for a NamedTuple result)."""
    device = next(a.device for a in args if isinstance(a, Tensor))
    with _running_on(device):
        native = {n: (to_native(n, a.detach()) if isinstance(a, Tensor) else a) for n, a in zip(names, args)}
        return _to_torch(function(**native), device)


# ---------------------------------------------------------------------------------------------
# Custom ops

_AUTOCAST_LIBRARY = torch.library.Library("pydeform", "IMPL")

#: Box arguments keep their dtype under autocast (coordinates of a few hundred pixels are not
#: representable in bfloat16; the array API takes float32 boxes with half-precision images).
_BOX_ARGUMENTS = ("rois", "boxes")


def _argument_names(arguments: str) -> list:
    return [a.split()[-1].split("=")[0] for a in arguments.split(", ")]


def _tensor_names(arguments: str) -> list:
    return [a.split()[-1] for a in arguments.split(", ") if a.startswith("Tensor")]


def _autocast_arguments(args: tuple, names: list, device_type: str, dtype: torch.dtype) -> tuple:
    """The arguments as an op runs them under autocast: floating tensors of ``device_type``
    other than float64 and boxes in the autocast ``dtype``."""
    return tuple(
        a.to(dtype)
        if isinstance(a, Tensor) and a.is_floating_point() and a.device.type == device_type
        and a.dtype != torch.float64 and n not in _BOX_ARGUMENTS else a
        for n, a in zip(names, args)
    )


def _register_autocast(name: str, op, names: list):
    """``torch.library.register_autocast`` casts to one fixed dtype and casts boxes too; this
    rule casts to the dtype of the enclosing autocast region (float16 or bfloat16)."""
    key = torch._C.DispatchKey.AutocastCUDA

    def run_in_autocast_dtype(_keyset, *args):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*_autocast_arguments(args, names, "cuda", torch.get_autocast_dtype("cuda")))

    _AUTOCAST_LIBRARY.impl(name, run_in_autocast_dtype, "AutocastCUDA", with_keyset=True)


def _define(name: str, arguments: str, returns: str, impl, fake):
    """``torch.ops.pydeform.<name>`` with the schema ``(<arguments>) -> <returns>``, ``impl`` and
    ``fake`` (the output for shape propagation) taking the arguments positionally."""
    op = torch.library.custom_op(f"pydeform::{name}", impl, mutates_args=(), schema=f"({arguments}) -> {returns}")
    op.register_fake(fake)
    _register_autocast(name, op, _argument_names(arguments))
    return op


def _shapes(values: dict, tensor_names: list) -> dict:
    """The tensor arguments' shapes, None for absent optional ones (what the argument checks of
    the array API take)."""
    return {n: (None if values[n] is None else tuple(values[n].shape)) for n in tensor_names}


_DETERMINISTIC_ARGUMENT = ", bool deterministic=False"


def _define_differentiable(name: str, arguments: str, output_fake, forward, backward, grad_names: tuple,
                           deterministic: bool = False, deterministic_forward: bool = False):
    """A forward op running ``forward`` (array level), its backward op
    ``<name>_backward(grad_output, <arguments>)`` running ``backward`` and returning one tensor
    per entry of ``grad_names`` (an empty one for an absent optional argument), and the
    autograd formula connecting them. ``output_fake(shapes, values)`` gives the forward's output.
    ``deterministic``: the backward has a deterministic mode; its op takes a last argument
    ``bool deterministic=False``, which autograd sets to
    ``torch.are_deterministic_algorithms_enabled()`` when the backward runs.
    ``deterministic_forward``: the forward has one; the forward op takes that last argument
    (the functional wrapper sets it), the backward op does not."""
    names, tensor_names = _argument_names(arguments), _tensor_names(arguments)
    forward_arguments = arguments + (_DETERMINISTIC_ARGUMENT if deterministic_forward else "")
    forward_names = _argument_names(forward_arguments)
    backward_arguments = f"Tensor grad_output, {arguments}" + (_DETERMINISTIC_ARGUMENT if deterministic else "")
    backward_names = _argument_names(backward_arguments)

    def forward_fake(*args):
        values = dict(zip(names, args))
        return output_fake(_shapes(values, tensor_names), values)

    forward_op = _define(name, forward_arguments, "Tensor", lambda *args: _call(forward, forward_names, args),
                         forward_fake)

    def slots(grads, grad_output):
        """One tensor per gradient: empty where the argument (so its gradient) is absent."""
        grads = tuple(grad_output.new_empty(0) if g is None else g for g in grads)
        return grads[0] if len(grads) == 1 else grads

    def backward_fake(grad_output, *args):
        values = dict(zip(names, args[:len(names)]))
        return slots([None if values[g] is None else torch.empty_like(values[g], memory_format=torch.contiguous_format)
                      for g in grad_names], grad_output)

    def backward_impl(grad_output, *args):
        grads = _call(backward, backward_names, (grad_output,) + args)
        return slots(grads if isinstance(grads, tuple) else (grads,), grad_output)

    returns = "Tensor" if len(grad_names) == 1 else "(" + ", ".join(["Tensor"] * len(grad_names)) + ")"
    backward_op = _define(f"{name}_backward", backward_arguments, returns, backward_impl, backward_fake)
    tensor_positions = [i for i, a in enumerate(arguments.split(", ")) if a.startswith("Tensor")]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in tensor_positions))
        # The forward's deterministic flag (last) is not the backward's to take.
        ctx.inputs = [None if i in tensor_positions else v for i, v in enumerate(inputs[:len(names)])]

    def grad_formula(ctx, grad_output):
        inputs = list(ctx.inputs)
        for i, saved in zip(tensor_positions, ctx.saved_tensors):
            inputs[i] = saved
        mode = (torch.are_deterministic_algorithms_enabled(),) if deterministic else ()
        grads = backward_op(grad_output, *inputs, *mode)
        grads = dict(zip(grad_names, grads if isinstance(grads, tuple) else (grads,)))
        gradients = tuple(grads[n] if n in grads and inputs[i] is not None else None for i, n in enumerate(names))
        return gradients + (None,) * (len(forward_names) - len(names))  # none for a deterministic flag

    forward_op.register_autograd(grad_formula, setup_context=setup_context)
    return forward_op, backward_op


def _deform_conv2d_fake(shapes, v):
    g = _deform_conv.deform_conv2d_geometry(shapes, v["stride"], v["padding"], v["dilation"])
    return v["input"].new_empty((v["input"].shape[0], g.out_channels, g.out_h, g.out_w))


def _roi_fake(params_of):
    """The fake of a RoI op whose parameters ``params_of(shapes, k, values)`` gives."""

    def fake(shapes, v):
        k = v["rois"].shape[0]
        return v["input"].new_empty(_roi.roi_output_shape(params_of(shapes, k, v), k))

    return fake


_deform_conv2d_op, _ = _define_differentiable(
    "deform_conv2d",
    "Tensor input, Tensor offset, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
    "Tensor? mask",
    _deform_conv2d_fake, _deform_conv.deform_conv2d, _deform_conv.deform_conv2d_backward,
    ("input", "offset", "weight", "bias", "mask"), deterministic=True,
)
# The Deformable U-Net operators.


def _deform_conv_transpose2d_fake(shapes, v):
    g = _deform_unet.deform_conv_transpose2d_geometry(shapes, v["stride"], v["padding"], v["output_padding"],
                                                      v["dilation"], v["groups"])
    return v["input"].new_empty((v["input"].shape[0], g.in_channels, g.height, g.width))


def _deform_pool2d_fake(shapes, v):
    _deform_unet._check_mode(v["mode"])
    g = _deform_unet.deform_pool2d_geometry(shapes, v["kernel_size"], v["stride"], v["padding"], v["dilation"])
    return v["input"].new_empty((v["input"].shape[0], g.channels, g.out_h, g.out_w))


_deform_conv_transpose2d_op, _ = _define_differentiable(
    "deform_conv_transpose2d",
    "Tensor input, Tensor offset, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] output_padding, "
    "int[] dilation, int groups, Tensor? mask",
    _deform_conv_transpose2d_fake, _deform_unet.deform_conv_transpose2d, _deform_unet.deform_conv_transpose2d_backward,
    ("input", "offset", "weight", "bias", "mask"), deterministic_forward=True,
)
_deform_pool2d_op, _ = _define_differentiable(
    "deform_pool2d",
    "Tensor input, Tensor offset, int[] kernel_size, int[] stride, int[] padding, int[] dilation, str mode, "
    "Tensor? mask",
    _deform_pool2d_fake, _deform_unet.deform_pool2d, _deform_unet.deform_pool2d_backward,
    ("input", "offset", "mask"), deterministic=True,
)

# deform_pool2d with its arg-max indices (max mode): a forward op returning (output, indices) and
# a backward op that routes the gradient through the saved indices instead of recomputing them.
_POOL_ARGUMENTS = ("Tensor input, Tensor offset, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
                   "str mode, Tensor? mask")
_POOL_NAMES = _argument_names(_POOL_ARGUMENTS)


def _deform_pool2d_with_indices(**arguments):
    return _deform_unet.deform_pool2d(**arguments, return_indices=True)


def _deform_pool2d_with_indices_fake(*args):
    values = dict(zip(_POOL_NAMES, args))
    _deform_unet._check_mode(values["mode"], True)
    out = _deform_pool2d_fake(_shapes(values, _tensor_names(_POOL_ARGUMENTS)), values)
    return out, out.new_empty(out.shape, dtype=torch.int32)


_deform_pool2d_with_indices_op = _define(
    "deform_pool2d_with_indices", _POOL_ARGUMENTS, "(Tensor, Tensor)",
    lambda *args: _call(_deform_pool2d_with_indices, _POOL_NAMES, args), _deform_pool2d_with_indices_fake,
)
_POOL_INDICES_BACKWARD_ARGUMENTS = f"Tensor grad_output, {_POOL_ARGUMENTS}, Tensor indices{_DETERMINISTIC_ARGUMENT}"


def _deform_pool2d_indices_backward_fake(grad_output, input, offset, kernel_size, stride, padding, dilation, mode, mask,
                                         indices, deterministic=False):
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            torch.empty_like(offset, memory_format=torch.contiguous_format),
            grad_output.new_empty(0) if mask is None else torch.empty_like(mask, memory_format=torch.contiguous_format))


def _deform_pool2d_indices_backward_impl(*args):
    grads = _call(_deform_unet.deform_pool2d_backward, _argument_names(_POOL_INDICES_BACKWARD_ARGUMENTS), args)
    return tuple(args[0].new_empty(0) if g is None else g for g in grads)


_deform_pool2d_indices_backward_op = _define(
    "deform_pool2d_with_indices_backward", _POOL_INDICES_BACKWARD_ARGUMENTS, "(Tensor, Tensor, Tensor)",
    _deform_pool2d_indices_backward_impl, _deform_pool2d_indices_backward_fake,
)


def _setup_pool_indices_context(ctx, inputs, output):
    input, offset, mask = inputs[0], inputs[1], inputs[7]
    ctx.save_for_backward(input, offset, mask, output[1])
    ctx.geometry = inputs[2:7]


def _pool_indices_gradients(ctx, grad_output, _grad_indices):
    input, offset, mask, indices = ctx.saved_tensors
    grads = _deform_pool2d_indices_backward_op(grad_output, input, offset, *ctx.geometry, mask, indices,
                                               torch.are_deterministic_algorithms_enabled())
    return grads[0], grads[1], None, None, None, None, None, None if mask is None else grads[2]


_deform_pool2d_with_indices_op.register_autograd(_pool_indices_gradients, setup_context=_setup_pool_indices_context)

_roi_align_op, _ = _define_differentiable(
    "roi_align",
    "Tensor input, Tensor rois, int[] output_size, float spatial_scale, int sampling_ratio, bool aligned, str mode",
    _roi_fake(lambda s, k, v: _roi.roi_align_params(s, k, v["output_size"], v["spatial_scale"], v["sampling_ratio"],
                                                    v["aligned"], v["mode"], False)),
    _roi.roi_align, _roi.roi_align_backward, ("input",), deterministic=True,
)
_ps_roi_align_op, _ = _define_differentiable(
    "ps_roi_align",
    "Tensor input, Tensor rois, int[] output_size, float spatial_scale, int sampling_ratio",
    _roi_fake(lambda s, k, v: _roi.roi_align_params(s, k, v["output_size"], v["spatial_scale"], v["sampling_ratio"],
                                                    True, "avg", True)),
    _roi.ps_roi_align, _roi.ps_roi_align_backward, ("input",), deterministic=True,
)
_roi_pool_op, _ = _define_differentiable(
    "roi_pool",
    "Tensor input, Tensor rois, int[] output_size, float spatial_scale",
    _roi_fake(lambda s, k, v: _roi.roi_pool_params(s, k, v["output_size"], v["spatial_scale"], False)),
    _roi.roi_pool, _roi.roi_pool_backward, ("input",), deterministic=True,
)
_ps_roi_pool_op, _ = _define_differentiable(
    "ps_roi_pool",
    "Tensor input, Tensor rois, int[] output_size, float spatial_scale",
    _roi_fake(lambda s, k, v: _roi.roi_pool_params(s, k, v["output_size"], v["spatial_scale"], True)),
    _roi.ps_roi_pool, _roi.ps_roi_pool_backward, ("input",), deterministic=True,
)
_deform_roi_pool_op, _ = _define_differentiable(
    "deform_roi_pool",
    "Tensor input, Tensor rois, Tensor? offset, int[] output_size, float spatial_scale, int sampling_ratio, "
    "float gamma, Tensor? mask",
    _roi_fake(lambda s, k, v: _roi.deform_roi_pool_params(s, k, v["output_size"], v["spatial_scale"],
                                                          v["sampling_ratio"], v["gamma"])),
    _roi.deform_roi_pool, _roi.deform_roi_pool_backward, ("input", "offset", "mask"), deterministic=True,
)
_deform_psroi_pool_op, _ = _define_differentiable(
    "deform_psroi_pool",
    "Tensor input, Tensor rois, Tensor? trans, int? output_dim, int group_size, int pooled_size, int? part_size, "
    "int sample_per_part, float trans_std, float spatial_scale",
    _roi_fake(lambda s, k, v: _roi.deform_psroi_pool_params(
        s, k, v["output_dim"], v["group_size"], v["pooled_size"], v["part_size"], v["sample_per_part"],
        v["trans_std"], v["spatial_scale"])),
    _roi.deform_psroi_pool, _roi.deform_psroi_pool_backward, ("input", "trans"), deterministic=True,
)


def _focal_loss_fake(shapes, v):
    return v["pred"].new_empty(())


_centernet_focal_loss_op, _ = _define_differentiable(
    "centernet_focal_loss",
    "Tensor pred, Tensor target, float alpha, float beta",
    _focal_loss_fake, _centernet.centernet_focal_loss, _centernet.centernet_focal_loss_backward, ("pred",),
)


def _decode_fake(heat, wh, reg, K, kernel, cat_spec_wh, down_ratio, threshold):
    # Detections have heat's accumulation dtype (float64 stays, the rest accumulate in float32).
    return heat.new_empty((heat.shape[0], K, 6), dtype=torch.float64 if heat.dtype == torch.float64 else torch.float32)


_DECODE_ARGUMENTS = (
    "Tensor heat, Tensor wh, Tensor? reg, int K, int kernel, bool cat_spec_wh, float down_ratio, float? threshold"
)
_centernet_decode_op = _define(
    "centernet_decode", _DECODE_ARGUMENTS, "Tensor",
    lambda *args: _call(_centernet.centernet_decode, _argument_names(_DECODE_ARGUMENTS), args), _decode_fake,
)


def _targets_fake(boxes, labels, num_classes, output_size, down_ratio, min_overlap, max_objects):
    batch = boxes.shape[0]
    per_object = boxes.new_empty((batch, max_objects, 2))
    return (boxes.new_empty((batch, num_classes, *output_size)), per_object, torch.empty_like(per_object),
            labels.new_empty((batch, max_objects), dtype=torch.int64),
            labels.new_empty((batch, max_objects), dtype=torch.uint8))


_TARGETS_ARGUMENTS = (
    "Tensor boxes, Tensor labels, int num_classes, int[] output_size, float down_ratio, float min_overlap, "
    "int max_objects"
)
_centernet_targets_op = _define(
    "centernet_targets", _TARGETS_ARGUMENTS, "(Tensor, Tensor, Tensor, Tensor, Tensor)",
    lambda *args: _call(_centernet.centernet_targets, _argument_names(_TARGETS_ARGUMENTS), args), _targets_fake,
)


# The semi-convolutional operators. Their argument names are the array API's; sigma, a number
# or a tensor there, is split in two (``Tensor? sigma`` and ``float sigma_value``, used when
# sigma is None) so that a number gets no gradient.


def _semiconv_embed_backward(grad_output, phi, spacing):
    # The coordinates are constants: psi's gradient is phi's (a copy: an op returns no alias).
    return grad_output.copy()


_semiconv_embed_op, _ = _define_differentiable(
    "semiconv_embed", "Tensor phi, float[] spacing", lambda shapes, v: torch.empty_like(v["phi"]),
    _semiconv.semiconv_embed, _semiconv_embed_backward, ("phi",),
)
_affinity_op, _ = _define_differentiable(
    "affinity",
    "Tensor psi, Tensor centers, Tensor? sigma, float sigma_value, str kernel, bool coordinates, float[] spacing",
    lambda shapes, v: v["psi"].new_empty((shapes["psi"][0], shapes["centers"][1], *shapes["psi"][2:])),
    _semiconv.sigma_split(_semiconv.affinity), _semiconv.sigma_split(_semiconv.affinity_backward),
    ("psi", "centers", "sigma"),
)
_seeded_mask_logits_op, _ = _define_differentiable(
    "seeded_mask_logits",
    "Tensor scores, Tensor psi, Tensor? sigma, float sigma_value, str mode, bool coordinates, float[] spacing",
    lambda shapes, v: torch.empty_like(v["scores"]), _semiconv.sigma_split(_semiconv.seeded_mask_logits),
    _semiconv.sigma_split(_semiconv.seeded_mask_logits_backward), ("scores", "psi", "sigma"),
)


def _statistics_dtype(psi: Tensor) -> torch.dtype:
    """The dtype of :class:`pydeform.InstanceLossStatistics` for ``psi`` (its kernel set's)."""
    library = "numpy" if psi.device.type == "cpu" else "cupy"
    # Half types accumulate like float32.
    like = np.float64 if psi.dtype == torch.float64 else np.float32
    return getattr(torch, _semiconv._kernels(library, None).statistics_dtype(like).name)


_LOSS_ARGUMENTS = "Tensor psi, Tensor labels, int num_instances, str reduction, bool coordinates, float[] spacing"
_LOSS_BACKWARD_ARGUMENTS = ("Tensor grad_output, Tensor psi, Tensor labels, Tensor means, Tensor counts, "
                            "Tensor unit_sums, int num_instances, str reduction, bool coordinates, float[] spacing")


def _loss_forward(**arguments):
    loss, statistics = _semiconv.instance_mean_loss(**arguments, return_statistics=True)
    return (loss, *statistics)


def _loss_backward(grad_output, psi, labels, means, counts, unit_sums, **static):
    # The labels are the forward's, whose values it checked: not read a second time (a label
    # outside [0, K] would only leave its pixels out, as on the GPU, where no check is made).
    with unchecked_values():
        return _semiconv.instance_mean_loss_backward(
            grad_output, psi, labels, statistics=_semiconv.InstanceLossStatistics(means, counts, unit_sums), **static)


def _loss_fake(psi, labels, num_instances, reduction, coordinates, spacing):
    _semiconv._choice("reduction", reduction, _semiconv.REDUCTIONS)
    n, dims = psi.shape[:2]
    statistics = psi.new_empty((n, num_instances, dims), dtype=_statistics_dtype(psi))
    return (psi.new_empty((n, num_instances) if reduction == "none" else ()), statistics,
            psi.new_empty((n, num_instances), dtype=torch.int64), torch.empty_like(statistics))


# The loss's forward returns the statistics its backward needs (the per-instance means, counts
# and unit-vector sums), so the backward reads psi once instead of recomputing them.
_instance_mean_loss_op = _define(
    "instance_mean_loss", _LOSS_ARGUMENTS, "(Tensor, Tensor, Tensor, Tensor)",
    lambda *args: _call(_loss_forward, _argument_names(_LOSS_ARGUMENTS), args), _loss_fake,
)
_instance_mean_loss_backward_op = _define(
    "instance_mean_loss_backward", _LOSS_BACKWARD_ARGUMENTS, "Tensor",
    lambda *args: _call(_loss_backward, _argument_names(_LOSS_BACKWARD_ARGUMENTS), args),
    lambda grad_output, psi, *_: torch.empty_like(psi, memory_format=torch.contiguous_format),
)


def _loss_setup_context(ctx, inputs, output):
    psi, labels, *static = inputs
    ctx.save_for_backward(psi, labels, *output[1:])
    ctx.static = static
    ctx.mark_non_differentiable(*output[1:])


def _loss_grad(ctx, grad_loss, *_):
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _instance_mean_loss_backward_op(grad_loss, *ctx.saved_tensors, *ctx.static)
    return grad, None, None, None, None, None


_instance_mean_loss_op.register_autograd(_loss_grad, setup_context=_loss_setup_context)

_INSTANCE_MEANS_ARGUMENTS = "Tensor psi, Tensor labels, int num_instances, bool coordinates, float[] spacing"
_instance_means_op = _define(
    "instance_means", _INSTANCE_MEANS_ARGUMENTS, "(Tensor, Tensor)",
    lambda *args: _call(_semiconv.instance_means, _argument_names(_INSTANCE_MEANS_ARGUMENTS), args),
    lambda psi, labels, k, *_: (psi.new_empty((psi.shape[0], k, psi.shape[1])),
                                psi.new_empty((psi.shape[0], k), dtype=torch.int64)),
)
_VOTES_ARGUMENTS = "Tensor psi, Tensor foreground, int[]? shape, bool coordinates, float[] spacing"
_hough_votes_op = _define(
    "hough_votes", _VOTES_ARGUMENTS, "Tensor",
    lambda *args: _call(_semiconv.hough_votes, _argument_names(_VOTES_ARGUMENTS), args),
    lambda psi, foreground, shape, *_: psi.new_empty((psi.shape[0], *(psi.shape[2:] if shape is None else shape)),
                                                     dtype=torch.int32),
)
_PEAKS_ARGUMENTS = "Tensor votes, int K, int min_votes, int kernel"
_hough_peaks_op = _define(
    "hough_peaks", _PEAKS_ARGUMENTS, "(Tensor, Tensor)",
    lambda *args: _call(_semiconv.hough_peaks, _argument_names(_PEAKS_ARGUMENTS), args),
    lambda votes, K, *_: (votes.new_empty((votes.shape[0], K, 2), dtype=torch.float32),
                          votes.new_empty((votes.shape[0], K), dtype=torch.int32)),
)
_ASSIGN_ARGUMENTS = ("Tensor psi, Tensor foreground, Tensor centers, float max_distance, bool coordinates, "
                     "float[] spacing")
_assign_to_centers_op = _define(
    "assign_to_centers", _ASSIGN_ARGUMENTS, "Tensor",
    lambda *args: _call(_semiconv.assign_to_centers, _argument_names(_ASSIGN_ARGUMENTS), args),
    lambda psi, foreground, *_: foreground.new_empty(tuple(foreground.shape), dtype=torch.int32),
)


# ---------------------------------------------------------------------------------------------
# Functional API
#
# Each function is wrapped with torch.fx.wrap, as torchvision's ops are: torch.fx.symbolic_trace
# records a call as one call_function node instead of tracing into the Python argument handling
# (list-of-boxes conversion, pair checks), which cannot run on Proxy values.


def _pair_list(name: str, value, minimum: int) -> list:
    return list(int_pair(name, value, minimum=minimum))


def _rois(boxes, input: Tensor) -> Tensor:
    """``[K, 5]`` rows from a ``[K, 5]`` tensor or a list of per-image ``[L_i, 4]`` tensors."""
    if isinstance(boxes, Tensor):
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"rois: expected a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__qualname__}")
    if not boxes:
        return input.new_empty((0, 5))
    rows = []
    for i, part in enumerate(boxes):
        if not isinstance(part, Tensor) or part.dim() != 2 or part.shape[1] != 4:
            got = tuple(part.shape) if isinstance(part, Tensor) else type(part).__qualname__
            raise ValueError(f"rois[{i}]: expected a Tensor[L, 4], got {got}")
        rows.append(torch.cat([part.new_full((part.shape[0], 1), i), part], dim=1))
    return torch.cat(rows)


@torch.fx.wrap
def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                  dilation=1, mask: Optional[Tensor] = None) -> Tensor:
    """Deformable convolution v1, or v2 (DCNv2) with ``mask``; torchvision's signature.

    Args:
        input (Tensor[N, C, H, W]): the input.
        offset (Tensor[N, 2*Goff*kh*kw, Ho, Wo]): the (dy, dx) pair of each kernel point.
        weight (Tensor[C_out, C/G, kh, kw]): the weight.
        bias (Tensor[C_out], optional): the bias.
        stride, padding, dilation (int or (int, int)): as for an ordinary convolution.
        mask (Tensor[N, Goff*kh*kw, Ho, Wo], optional): the DCNv2 modulation scalars.

    Returns:
        Tensor[N, C_out, Ho, Wo]. Semantics: :func:`pydeform.deform_conv2d`.
    """
    return _deform_conv2d_op(input, offset, weight, bias, _pair_list("stride", stride, 1),
                             _pair_list("padding", padding, 0), _pair_list("dilation", dilation, 1), mask)


@torch.fx.wrap
def deform_conv_transpose2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
                            padding=0, output_padding=0, groups: int = 1, dilation=1,
                            mask: Optional[Tensor] = None) -> Tensor:
    """Transposed deformable convolution, the adjoint of :func:`deform_conv2d` plus a bias;
    ``torch.nn.functional.conv_transpose2d``'s argument order, then ``mask``.

    Args:
        input (Tensor[N, C_in, H, W]): the input.
        offset (Tensor[N, 2*Goff*kh*kw, H, W]): the (dy, dx) pair of each kernel point, on the input grid.
        weight (Tensor[C_in, C_out/groups, kh, kw]): the weight.
        bias (Tensor[C_out], optional): the bias.
        stride, padding, output_padding, dilation (int or (int, int)), groups (int): as for
            ``conv_transpose2d``.
        mask (Tensor[N, Goff*kh*kw, H, W], optional): modulation scalars.

    Returns:
        Tensor[N, C_out, H_out, W_out]. Semantics: :func:`pydeform.deform_conv_transpose2d`; its
        splat runs in the deterministic mode while ``torch.use_deterministic_algorithms`` is on.
    """
    return _deform_conv_transpose2d_op(
        input, offset, weight, bias, _pair_list("stride", stride, 1), _pair_list("padding", padding, 0),
        _pair_list("output_padding", output_padding, 0), _pair_list("dilation", dilation, 1), groups, mask,
        torch.are_deterministic_algorithms_enabled())


@torch.fx.wrap
def deform_pool2d(input: Tensor, offset: Tensor, kernel_size, stride=None, padding=0, dilation=1, mode: str = "max",
                  mask: Optional[Tensor] = None, return_indices: bool = False):
    """Dense deformable pooling (avg or max), differentiable in input, offset and mask.

    Args:
        input (Tensor[N, C, H, W]): the input.
        offset (Tensor[N, 2*Goff*kh*kw, Ho, Wo]): the (dy, dx) pair of each kernel point.
        kernel_size, padding, dilation (int or (int, int)); stride (int, (int, int) or None for
            ``kernel_size``); mode (``"max"`` or ``"avg"``).
        mask (Tensor[N, Goff*kh*kw, Ho, Wo], optional): modulation scalars.
        return_indices (bool): also return the arg-max kernel point of each output element (max
            mode only); the backward then routes the gradient through them.

    Returns:
        Tensor[N, C, Ho, Wo], and with ``return_indices`` the int32 Tensor[N, C, Ho, Wo] of
        indices. Semantics: :func:`pydeform.deform_pool2d` (without the indices the backward
        recomputes the arg-max of max mode).
    """
    _deform_unet._check_mode(mode, return_indices)
    kernel = _pair_list("kernel_size", kernel_size, 1)
    arguments = (input, offset, kernel, kernel if stride is None else _pair_list("stride", stride, 1),
                 _pair_list("padding", padding, 0), _pair_list("dilation", dilation, 1), mode, mask)
    if return_indices:
        return _deform_pool2d_with_indices_op(*arguments)
    return _deform_pool2d_op(*arguments)


@torch.fx.wrap
def roi_align(input: Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False, mode: str = "avg") -> Tensor:
    """RoI Align (torchvision's signature; ``mode="max"`` as ONNX / mmcv).

    Args:
        input (Tensor[N, C, H, W]): the feature map.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): (batch index, x1, y1, x2, y2) rows, or
            per-image (x1, y1, x2, y2) boxes.
        output_size (int or (int, int)): (PH, PW).
        spatial_scale, sampling_ratio, aligned, mode: as :func:`pydeform.roi_align`.

    Returns:
        Tensor[K, C, PH, PW].
    """
    return _roi_align_op(input, _rois(boxes, input), _pair_list("output_size", output_size, 1),
                         check_finite_float("spatial_scale", spatial_scale), sampling_ratio, aligned, mode)


@torch.fx.wrap
def ps_roi_align(input: Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1) -> Tensor:
    """Position-sensitive RoI Align: input Tensor[N, C_out*PH*PW, H, W] -> Tensor[K, C_out, PH, PW]."""
    return _ps_roi_align_op(input, _rois(boxes, input), _pair_list("output_size", output_size, 1),
                            check_finite_float("spatial_scale", spatial_scale), sampling_ratio)


@torch.fx.wrap
def roi_pool(input: Tensor, boxes, output_size, spatial_scale: float = 1.0) -> Tensor:
    """RoI Pool: input Tensor[N, C, H, W] -> Tensor[K, C, PH, PW]."""
    return _roi_pool_op(input, _rois(boxes, input), _pair_list("output_size", output_size, 1),
                        check_finite_float("spatial_scale", spatial_scale))


@torch.fx.wrap
def ps_roi_pool(input: Tensor, boxes, output_size, spatial_scale: float = 1.0) -> Tensor:
    """Position-sensitive RoI Pool: input Tensor[N, C_out*PH*PW, H, W] -> Tensor[K, C_out, PH, PW]."""
    return _ps_roi_pool_op(input, _rois(boxes, input), _pair_list("output_size", output_size, 1),
                           check_finite_float("spatial_scale", spatial_scale))


@torch.fx.wrap
def deform_roi_pool(input: Tensor, rois, offset: Optional[Tensor] = None, output_size=7, spatial_scale: float = 1.0,
                    sampling_ratio: int = 0, gamma: float = 0.1, mask: Optional[Tensor] = None) -> Tensor:
    """Deformable RoI pooling (mmcv's signature, plus ``mask`` for the modulated variant).

    Args:
        input (Tensor[N, C, H, W]): the feature map.
        rois (Tensor[K, 5] or list of Tensor[L, 4]): as ``boxes`` of :func:`roi_align`.
        offset (Tensor[K, 2, PH, PW], optional): the (x, y) offset of each bin.
        mask (Tensor[K, 1, PH, PW], optional): the modulation of each bin.
        output_size, spatial_scale, sampling_ratio, gamma: as :func:`pydeform.deform_roi_pool`.

    Returns:
        Tensor[K, C, PH, PW]. Semantics: :func:`pydeform.deform_roi_pool`.
    """
    return _deform_roi_pool_op(input, _rois(rois, input), offset, _pair_list("output_size", output_size, 1),
                               check_finite_float("spatial_scale", spatial_scale), sampling_ratio,
                               check_finite_float("gamma", gamma), mask)


@torch.fx.wrap
def deform_psroi_pool(input: Tensor, rois, trans: Optional[Tensor] = None, output_dim: Optional[int] = None,
                      group_size: int = 1, pooled_size: int = 7, part_size: Optional[int] = None,
                      sample_per_part: int = 4, trans_std: float = 0.0, spatial_scale: float = 1.0) -> Tensor:
    """Deformable position-sensitive RoI pooling: input Tensor[N, output_dim*group_size^2, H, W],
    trans Tensor[K, 2*num_classes, part_size, part_size] (optional) ->
    Tensor[K, output_dim, pooled_size, pooled_size]. Semantics: :func:`pydeform.deform_psroi_pool`."""
    return _deform_psroi_pool_op(input, _rois(rois, input), trans, output_dim, group_size, pooled_size, part_size,
                                 sample_per_part, check_finite_float("trans_std", trans_std),
                                 check_finite_float("spatial_scale", spatial_scale))


@torch.fx.wrap
def centernet_decode(heat: Tensor, wh: Tensor, reg: Optional[Tensor] = None, K: int = 100, *, kernel: int = 3,
                     cat_spec_wh: bool = False, down_ratio: float = 1.0, threshold: Optional[float] = None) -> Tensor:
    """Top-K CenterNet detections: heat Tensor[B, C, H, W], wh Tensor[B, 2 or 2C, H, W],
    reg Tensor[B, 2, H, W] (optional) -> Tensor[B, K, 6] rows (x1, y1, x2, y2, score, class).
    Not differentiable. Semantics: :func:`pydeform.centernet_decode`."""
    return _centernet_decode_op(heat, wh, reg, K, kernel, cat_spec_wh, check_finite_float("down_ratio", down_ratio),
                                None if threshold is None else check_finite_float("threshold", threshold))


@torch.fx.wrap
def centernet_targets(boxes: Tensor, labels: Tensor, num_classes: int, output_size, *, down_ratio: float = 4,
                      min_overlap: float = 0.7, max_objects: int = 128) -> _centernet.CenterNetTargets:
    """CenterNet training targets of boxes Tensor[B, M, 4] and labels Tensor[B, M] (-1 pads):
    :class:`pydeform.CenterNetTargets` of tensors (heatmap [B, num_classes, out_h, out_w], wh,
    reg [B, max_objects, 2], ind int64 and reg_mask uint8 [B, max_objects]). Not differentiable.
    Semantics: :func:`pydeform.centernet_targets`."""
    return _centernet.CenterNetTargets(*_centernet_targets_op(
        boxes, labels, num_classes, _pair_list("output_size", output_size, 1),
        check_finite_float("down_ratio", down_ratio), check_finite_float("min_overlap", min_overlap), max_objects))


@torch.fx.wrap
def centernet_focal_loss(pred: Tensor, target: Tensor, *, alpha: float = 2, beta: float = 4) -> Tensor:
    """CenterNet's focal loss of pred / target Tensor[B, C, H, W]: a 0-d tensor, differentiable
    in ``pred``. Semantics: :func:`pydeform.centernet_focal_loss`."""
    return _centernet_focal_loss_op(pred, target, check_finite_float("alpha", alpha), check_finite_float("beta", beta))


def _spacing(spacing) -> list:
    return list(_semiconv._spacing(spacing))


def _sigma_arguments(sigma):
    """``(sigma, sigma_value)`` of the ops' schema for a number or a tensor ``sigma``."""
    return (sigma, 1.0) if isinstance(sigma, Tensor) else (None, check_finite_float("sigma", sigma))


@torch.fx.wrap
def semiconv_embed(phi: Tensor, spacing=1.0) -> Tensor:
    """phi Tensor[N, D, H, W] (D >= 2) with the pixel coordinates ``(sy * y, sx * x)`` added to
    channels 0 and 1 (``spacing = (sy, sx)`` or one number); differentiable. Semantics:
    :func:`pydeform.semiconv_embed`."""
    return _semiconv_embed_op(phi, _spacing(spacing))


@torch.fx.wrap
def instance_means(psi: Tensor, labels: Tensor, num_instances: int, *, coordinates: bool = False,
                   spacing=1.0) -> _semiconv.InstanceMeans:
    """Per-instance mean embeddings and pixel counts: :class:`pydeform.InstanceMeans` of tensors
    (means [N, K, D], counts int64 [N, K]). Not differentiable. Semantics:
    :func:`pydeform.instance_means`."""
    return _semiconv.InstanceMeans(*_instance_means_op(psi, labels, num_instances, coordinates, _spacing(spacing)))


@torch.fx.wrap
def instance_mean_loss(psi: Tensor, labels: Tensor, num_instances: int, reduction: str = "mean", *,
                       coordinates: bool = False, spacing=1.0) -> Tensor:
    """The instance mean loss of psi Tensor[N, D, H, W] (phi with ``coordinates=True``) for
    integer labels Tensor[N, H, W] in [0, num_instances]: Tensor[N, K] ("none") or a 0-d tensor,
    differentiable in psi. The forward keeps the per-instance statistics for the backward, which
    then reads psi once. Semantics: :func:`pydeform.instance_mean_loss`."""
    return _instance_mean_loss_op(psi, labels, num_instances, reduction, coordinates, _spacing(spacing))[0]


@torch.fx.wrap
def affinity(psi: Tensor, centers: Tensor, sigma, kernel: str = "laplacian", *, coordinates: bool = False,
             spacing=1.0) -> Tensor:
    """Affinities Tensor[N, K, H, W] of psi Tensor[N, D, H, W] to centers Tensor[N, K, D];
    ``sigma`` a number > 0 or Tensor[N, K]. Differentiable in psi, centers and a tensor sigma.
    Semantics: :func:`pydeform.affinity`."""
    return _affinity_op(psi, centers, *_sigma_arguments(sigma), kernel, coordinates, _spacing(spacing))


@torch.fx.wrap
def seeded_mask_logits(scores: Tensor, psi: Tensor, sigma, mode: str = "argmax", *, coordinates: bool = False,
                       spacing=1.0) -> Tensor:
    """Mask logits Tensor[R, h, w] of regions (scores Tensor[R, h, w], psi Tensor[R, D, h, w])
    from their seed embedding; ``sigma`` a number > 0 or Tensor[R]. Differentiable in scores,
    psi and a tensor sigma. Semantics: :func:`pydeform.seeded_mask_logits`."""
    return _seeded_mask_logits_op(scores, psi, *_sigma_arguments(sigma), mode, coordinates, _spacing(spacing))


@torch.fx.wrap
def hough_votes(psi: Tensor, foreground: Tensor, shape=None, *, coordinates: bool = False, spacing=1.0) -> Tensor:
    """int32 vote counts Tensor[N, H', W'] of the foreground (bool Tensor[N, H, W]) pixels'
    rounded (psi_0, psi_1). Not differentiable. Semantics: :func:`pydeform.hough_votes`."""
    shape = None if shape is None else _pair_list("shape", shape, 1)
    return _hough_votes_op(psi, foreground, shape, coordinates, _spacing(spacing))


@torch.fx.wrap
def hough_peaks(votes: Tensor, K: int, *, min_votes: int = 1, kernel: int = 3) -> _semiconv.HoughPeaks:
    """The K strongest local maxima of int32 votes Tensor[N, H, W]: :class:`pydeform.HoughPeaks`
    of tensors (centers float32 [N, K, 2], votes int32 [N, K]). Semantics:
    :func:`pydeform.hough_peaks`."""
    return _semiconv.HoughPeaks(*_hough_peaks_op(votes, K, min_votes, kernel))


@torch.fx.wrap
def assign_to_centers(psi: Tensor, foreground: Tensor, centers: Tensor, max_distance: float = math.inf, *,
                      coordinates: bool = False, spacing=1.0) -> Tensor:
    """int32 labels Tensor[N, H, W]: 1 + the nearest center's index for foreground pixels, 0
    elsewhere. Not differentiable. Semantics: :func:`pydeform.assign_to_centers`."""
    return _assign_to_centers_op(psi, foreground, centers, float(max_distance), coordinates, _spacing(spacing))


# ---------------------------------------------------------------------------------------------
# Modules


class _Module(nn.Module):
    """Base of the modules here: refuses ``torch.jit.script`` with a message saying so (TorchScript
    cannot compile the Python argument handling of the functions; see docs/torch.md)."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__}: pydeform.torch does not support TorchScript (torch.jit.script); "
            "use torch.compile, torch.export or torch.fx instead"
        )


class _DeformableConvolution(_Module):
    """What torchvision's and mmcv's deformable convolution modules share: the geometry
    attributes and the ``weight`` [C_out, C_in/groups, kh, kw] and ``bias`` [C_out] parameters."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, groups: int,
                 bias: bool):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups: {groups} must divide in_channels ({in_channels}) and out_channels ({out_channels})"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = int_pair("kernel_size", kernel_size, minimum=1)
        self.stride = int_pair("stride", stride, minimum=1)
        self.padding = int_pair("padding", padding, minimum=0)
        self.dilation = int_pair("dilation", dilation, minimum=1)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)

    def _convolve(self, input: Tensor, offset: Tensor, mask: Optional[Tensor]) -> Tensor:
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)


class DeformConv2d(_DeformableConvolution):
    """torchvision's ``DeformConv2d``: same constructor, parameters (``weight``, ``bias``) and
    initialisation; ``forward(input, offset, mask=None)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """input Tensor[N, C_in, H, W], offset Tensor[N, 2*Goff*kh*kw, Ho, Wo], mask
        Tensor[N, Goff*kh*kw, Ho, Wo] (optional) -> Tensor[N, C_out, Ho, Wo]."""
        return self._convolve(input, offset, mask)


class ModulatedDeformConv2d(_DeformableConvolution):
    """mmcv's ``ModulatedDeformConv2d`` (DCNv2): same constructor, parameters (``weight``,
    ``bias``) and initialisation (uniform in +-1/sqrt(C_in*kh*kw), zero bias);
    ``forward(x, offset, mask)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deform_groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.deform_groups = deform_groups
        self.init_weights()

    def init_weights(self) -> None:
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """x Tensor[N, C_in, H, W], offset Tensor[N, 2*deform_groups*kh*kw, Ho, Wo], mask
        Tensor[N, deform_groups*kh*kw, Ho, Wo] -> Tensor[N, C_out, Ho, Wo]."""
        return self._convolve(x, offset, mask)


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):
    """mmcv's ``ModulatedDeformConv2dPack``: a :class:`ModulatedDeformConv2d` that computes its
    offsets and mask with its own convolution ``conv_offset`` (3*deform_groups*kh*kw channels:
    the y/x offsets, then the mask logits through a sigmoid), zero-initialised as in DCNv2 so
    training starts from a plain convolution with mask 0.5; ``forward(x)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset = nn.Conv2d(
            self.in_channels, self.deform_groups * 3 * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size, stride=self.stride, padding=self.padding, dilation=self.dilation, bias=True,
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x Tensor[N, C_in, H, W] -> Tensor[N, C_out, Ho, Wo]."""
        points = self.deform_groups * self.kernel_size[0] * self.kernel_size[1]
        offset, mask_logits = torch.split(self.conv_offset(x), [2 * points, points], dim=1)
        return self._convolve(x, offset, torch.sigmoid(mask_logits))


class DeformConvTranspose2d(_Module):
    """Transposed deformable convolution with ``nn.ConvTranspose2d``'s constructor, parameters
    (``weight`` [C_in, C_out/groups, kh, kw], ``bias`` [C_out]) and initialisation, plus
    ``deform_groups``; ``forward(input, offset, mask=None)`` with offsets and mask on the input
    grid."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, deform_groups: int = 1):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups: {groups} must divide in_channels ({in_channels}) and out_channels ({out_channels})"
            )
        if out_channels % deform_groups:
            raise ValueError(f"deform_groups: {deform_groups} must divide out_channels ({out_channels})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.deform_groups = deform_groups
        self.kernel_size = int_pair("kernel_size", kernel_size, minimum=1)
        self.stride = int_pair("stride", stride, minimum=1)
        self.padding = int_pair("padding", padding, minimum=0)
        self.output_padding = int_pair("output_padding", output_padding, minimum=0)
        self.dilation = int_pair("dilation", dilation, minimum=1)
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.ConvTranspose2d's: Kaiming-uniform weight, bias uniform in +-1/sqrt(fan_in)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """input Tensor[N, C_in, H, W], offset Tensor[N, 2*deform_groups*kh*kw, H, W], mask
        Tensor[N, deform_groups*kh*kw, H, W] (optional) -> Tensor[N, C_out, H_out, W_out]."""
        return deform_conv_transpose2d(input, offset, self.weight, self.bias, self.stride, self.padding,
                                       self.output_padding, self.groups, self.dilation, mask)


class DeformConvTranspose2dPack(DeformConvTranspose2d):
    """A :class:`DeformConvTranspose2d` that predicts its offsets (and, ``modulated=True``, its
    mask through a sigmoid) from the input with its own 3x3 convolution ``conv_offset`` on the
    input grid, zero-initialised so that training starts from ``conv_transpose2d`` (times 0.5
    when modulated, as DCNv2); ``forward(x)``."""

    def __init__(self, *args, modulated: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.modulated = modulated
        points = self.deform_groups * self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(self.in_channels, (3 if modulated else 2) * points, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x Tensor[N, C_in, H, W] -> Tensor[N, C_out, H_out, W_out]."""
        offset, mask = _predicted_offsets(self.conv_offset(x), self.deform_groups * self.kernel_size[0]
                                          * self.kernel_size[1], self.modulated)
        return super().forward(x, offset, mask)


def _predicted_offsets(prediction: Tensor, points: int, modulated: bool):
    """(offset, mask) of a Pack module's offset convolution: 2*points offset channels, then
    points mask logits through a sigmoid when modulated."""
    if not modulated:
        return prediction, None
    offset, mask_logits = torch.split(prediction, [2 * points, points], dim=1)
    return offset, torch.sigmoid(mask_logits)


class DeformPool2d(_Module):
    """Dense deformable pooling as a module (``nn.MaxPool2d`` / ``nn.AvgPool2d``'s geometry
    arguments and ``mode``); ``forward(input, offset, mask=None)``."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, mode: str = "max"):
        super().__init__()
        _deform_unet._check_mode(mode)
        self.kernel_size = int_pair("kernel_size", kernel_size, minimum=1)
        self.stride = self.kernel_size if stride is None else int_pair("stride", stride, minimum=1)
        self.padding = int_pair("padding", padding, minimum=0)
        self.dilation = int_pair("dilation", dilation, minimum=1)
        self.mode = mode

    def forward(self, input: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """input Tensor[N, C, H, W], offset Tensor[N, 2*Goff*kh*kw, Ho, Wo], mask
        Tensor[N, Goff*kh*kw, Ho, Wo] (optional) -> Tensor[N, C, Ho, Wo]."""
        return deform_pool2d(input, offset, self.kernel_size, self.stride, self.padding, self.dilation, self.mode,
                             mask)


class DeformPool2dPack(DeformPool2d):
    """A :class:`DeformPool2d` that predicts its offsets (and, ``modulated=True``, its mask
    through a sigmoid) from the input with its own convolution ``conv_offset`` of the pooling
    geometry (so on the output grid), zero-initialised so that training starts from plain
    pooling; ``forward(x)``."""

    def __init__(self, in_channels: int, kernel_size, stride=None, padding=0, dilation=1, mode: str = "max",
                 deform_groups: int = 1, modulated: bool = False):
        super().__init__(kernel_size, stride, padding, dilation, mode)
        if in_channels % deform_groups:
            raise ValueError(f"deform_groups: {deform_groups} must divide in_channels ({in_channels})")
        self.in_channels, self.deform_groups, self.modulated = in_channels, deform_groups, modulated
        points = deform_groups * self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(in_channels, (3 if modulated else 2) * points, kernel_size=self.kernel_size,
                                     stride=self.stride, padding=self.padding, dilation=self.dilation)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x Tensor[N, C, H, W] -> Tensor[N, C, Ho, Wo]."""
        offset, mask = _predicted_offsets(self.conv_offset(x), self.deform_groups * self.kernel_size[0]
                                          * self.kernel_size[1], self.modulated)
        return super().forward(x, offset, mask)


class RoIAlign(_Module):
    """torchvision's ``RoIAlign(output_size, spatial_scale, sampling_ratio, aligned=False)``;
    ``forward(input, rois)``: input Tensor[N, C, H, W], rois Tensor[K, 5] or list of
    Tensor[L, 4] -> Tensor[K, C, PH, PW]."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale
        self.sampling_ratio, self.aligned = sampling_ratio, aligned

    def forward(self, input: Tensor, rois) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)


class PSRoIAlign(_Module):
    """torchvision's ``PSRoIAlign(output_size, spatial_scale, sampling_ratio)``."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int):
        super().__init__()
        self.output_size, self.spatial_scale, self.sampling_ratio = output_size, spatial_scale, sampling_ratio

    def forward(self, input: Tensor, rois) -> Tensor:
        return ps_roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio)


class _RoIPoolModule(_Module):
    """RoIPool and PSRoIPool: ``output_size`` and ``spatial_scale``."""

    def __init__(self, output_size, spatial_scale: float):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale


# The modules call the functions through this module's globals, which torch.fx patches while
# it traces (a function held elsewhere, e.g. as a class attribute, would be traced through).


class RoIPool(_RoIPoolModule):
    """torchvision's ``RoIPool(output_size, spatial_scale)``."""

    def forward(self, input: Tensor, rois) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)


class PSRoIPool(_RoIPoolModule):
    """torchvision's ``PSRoIPool(output_size, spatial_scale)``."""

    def forward(self, input: Tensor, rois) -> Tensor:
        return ps_roi_pool(input, rois, self.output_size, self.spatial_scale)


class DeformRoIPool(_Module):
    """mmcv's ``DeformRoIPool(output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1)``;
    ``forward(input, rois, offset=None)``."""

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__()
        self.output_size = int_pair("output_size", output_size, minimum=1)
        self.spatial_scale = check_finite_float("spatial_scale", spatial_scale)
        self.gamma = check_finite_float("gamma", gamma)
        self.sampling_ratio = sampling_ratio

    def forward(self, input: Tensor, rois, offset: Optional[Tensor] = None) -> Tensor:
        """input Tensor[N, C, H, W], rois Tensor[K, 5], offset Tensor[K, 2, PH, PW] (optional)
        -> Tensor[K, C, PH, PW]."""
        return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
                               self.gamma)


def _fc_head(in_features: int, hidden: int, out_features: int, layers: int) -> nn.Sequential:
    """mmcv's offset / mask heads: ``layers`` Linear layers with ReLU between them, the last
    one zero-initialised (so training starts without deformation)."""
    sizes = [in_features] + [hidden] * (layers - 1) + [out_features]
    modules = []
    for i in range(layers):
        modules.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < layers - 1:
            modules.append(nn.ReLU(inplace=True))
    nn.init.zeros_(modules[-1].weight)
    nn.init.zeros_(modules[-1].bias)
    return nn.Sequential(*modules)


class DeformRoIPoolPack(DeformRoIPool):
    """mmcv's ``DeformRoIPoolPack(output_size, output_channels, deform_fc_channels=1024,
    spatial_scale=1.0, sampling_ratio=0, gamma=0.1)``: the offsets come from ``offset_fc``
    (three Linear layers) applied to a first, undeformed pooling; ``forward(input, rois)``."""

    def __init__(self, output_size, output_channels: int, deform_fc_channels: int = 1024, spatial_scale: float = 1.0,
                 sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels, self.deform_fc_channels = output_channels, deform_fc_channels
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _fc_head(bins * output_channels, deform_fc_channels, bins * 2, layers=3)

    def _offset(self, plain: Tensor) -> Tensor:
        return self.offset_fc(plain.flatten(1)).view(plain.shape[0], 2, *self.output_size)

    def forward(self, input: Tensor, rois) -> Tensor:
        """input Tensor[N, output_channels, H, W], rois Tensor[K, 5] -> Tensor[K, output_channels, PH, PW]."""
        plain = super().forward(input, rois)
        return super().forward(input, rois, self._offset(plain))


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """mmcv's ``ModulatedDeformRoIPoolPack``: :class:`DeformRoIPoolPack` plus a mask from
    ``mask_fc`` (two Linear layers and a sigmoid, last Linear zero-initialised) multiplying each
    deformed bin."""

    def __init__(self, output_size, output_channels: int, deform_fc_channels: int = 1024, spatial_scale: float = 1.0,
                 sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma)
        bins = self.output_size[0] * self.output_size[1]
        self.mask_fc = nn.Sequential(*_fc_head(bins * output_channels, deform_fc_channels, bins, layers=2),
                                     nn.Sigmoid())

    def forward(self, input: Tensor, rois) -> Tensor:
        plain = DeformRoIPool.forward(self, input, rois)
        mask = self.mask_fc(plain.flatten(1)).view(plain.shape[0], 1, *self.output_size)
        return deform_roi_pool(input, rois, self._offset(plain), self.output_size, self.spatial_scale,
                               self.sampling_ratio, self.gamma, mask)


class CenterNetDecoder(_Module):
    """CenterNet's decoding as a module: ``forward(heat, wh, reg=None)`` -> Tensor[B, K, 6]
    (see :func:`centernet_decode`)."""

    def __init__(self, K: int = 100, kernel: int = 3, cat_spec_wh: bool = False, down_ratio: float = 1.0,
                 threshold: Optional[float] = None):
        super().__init__()
        self.K, self.kernel, self.cat_spec_wh = K, kernel, cat_spec_wh
        self.down_ratio, self.threshold = down_ratio, threshold

    def forward(self, heat: Tensor, wh: Tensor, reg: Optional[Tensor] = None) -> Tensor:
        return centernet_decode(heat, wh, reg, self.K, kernel=self.kernel, cat_spec_wh=self.cat_spec_wh,
                                down_ratio=self.down_ratio, threshold=self.threshold)


class SemiConvEmbedding(_Module):
    """A semi-convolutional embedding head: a 1x1 or 3x3 convolution (``conv``, padding keeping
    the size) from ``in_channels`` to ``dims`` channels whose output phi gets the pixel
    coordinates, psi = :func:`semiconv_embed` (phi, spacing); ``forward(x)`` -> Tensor[N, dims, H, W]."""

    def __init__(self, in_channels: int, dims: int, kernel_size: int = 1, spacing=1.0):
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size: expected 1 or 3, got {kernel_size!r}")
        if dims < 2:
            raise ValueError(f"dims: expected at least 2 channels (y, x), got {dims!r}")
        self.spacing = _spacing(spacing)
        self.conv = nn.Conv2d(in_channels, dims, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        """x Tensor[N, in_channels, H, W] -> psi Tensor[N, dims, H, W]."""
        return semiconv_embed(self.conv(x), self.spacing)


class InstanceMeanLoss(_Module):
    """:func:`instance_mean_loss` as a module: ``InstanceMeanLoss(num_instances, reduction="mean",
    coordinates=False, spacing=1.0)``; ``forward(psi, labels)``."""

    def __init__(self, num_instances: int, reduction: str = "mean", *, coordinates: bool = False, spacing=1.0):
        super().__init__()
        _semiconv._choice("reduction", reduction, _semiconv.REDUCTIONS)
        self.num_instances, self.reduction = num_instances, reduction
        self.coordinates, self.spacing = coordinates, _spacing(spacing)

    def forward(self, psi: Tensor, labels: Tensor) -> Tensor:
        """psi Tensor[N, D, H, W], labels Tensor[N, H, W] -> the loss."""
        return instance_mean_loss(psi, labels, self.num_instances, self.reduction, coordinates=self.coordinates,
                                  spacing=self.spacing)
