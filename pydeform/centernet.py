"""CenterNet ("Objects as Points"): fused heatmap decoding, training targets, focal loss.

Semantics are those of docs/centernet.md, which explains them with examples. This
module checks every argument once, takes the outputs and its own scratch as
:func:`centernet_workspace` plans them (from :mod:`pydeform._workspace`, so that a caller such
as :mod:`pydeform.jax` can provide them) and calls the CenterNet kernel set of the backend
(:func:`pydeform.backends.centernet_kernels`), whose methods are (all arrays C-contiguous, on
the kernel set's device; T = the input dtype, A = its accumulation dtype):

``decode(heat, wh, reg, detections, params)`` with :class:`CenterNetDecodeParams`: heat
``[B, C, H, W]`` T, wh ``[B, 2, H, W]`` or ``[B, 2C, H, W]`` T, reg ``[B, 2, H, W]`` T or None,
detections ``[B, K, 6]`` A, every element written; called only when B > 0 and K > 0.

``targets(boxes, labels, heatmap, wh, reg, ind, reg_mask, params)`` with
:class:`CenterNetTargetsParams`: boxes ``[B, M, 4]`` A (float32 or float64), labels ``[B, M]``
int64 in [-1, num_classes); the outputs are zero-filled here: heatmap
``[B, num_classes, out_h, out_w]`` A, wh / reg ``[B, max_objects, 2]`` A, ind
``[B, max_objects]`` int64, reg_mask ``[B, max_objects]`` uint8.

``focal_loss_sums(pred, target, sums, params)`` with :class:`FocalLossParams`: pred / target
``[B, C, H, W]`` T, sums ``[3]`` A written with (sum of positive terms, sum of negative terms,
number of positives), deterministically. ``focal_loss_grad(grad_output, pred, target, sums,
grad_pred, params)``: grad_output 0-d T, sums from ``focal_loss_sums``, grad_pred
``[B, C, H, W]`` T written entirely.

``decode_workspace(params, T)`` and ``focal_loss_workspace(size, T, *, backward)``: the scratch
``decode`` and ``focal_loss_sums`` (over ``size`` elements; with ``backward`` also
``focal_loss_grad``) request, ``{slot: (shape, dtype)}``, float32 copies of half-type arrays
included for a kernel set whose kernels compute from them (Numba CUDA).

Decisions beyond the original CenterNet code (docs/centernet.md):

- detections have the accumulation dtype of heat (float64 for float64, float32 for float32,
  float16 and bfloat16), so class ids and boxes stay exact; columns x1, y1, x2, y2, score, class.
- K may exceed C*H*W: slots past C*H*W are (0, 0, 0, 0, 0, -1). K = 0 gives ``[B, 0, 6]``,
  B = 0 gives ``[0, K, 6]``.
- ``threshold``: detections whose score is below it get score 0 and class -1; the box is kept.
- A NaN heat value is never a peak and never a neighbourhood maximum; its score is 0.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from ._arrays import (
    accumulation_dtype,
    array_library,
    check_arrays,
    check_backend,
    check_finite_float,
    check_int,
    int_pair,
    shape_of,
    values_checked,
)
from ._interop import dlpack_entry
from ._rois import check_positive_float
from ._workspace import output, scratch
from .backends import centernet_kernels

__all__ = [
    "CenterNetDecodeParams",
    "CenterNetTargets",
    "CenterNetTargetsParams",
    "FocalLossParams",
    "centernet_decode",
    "centernet_focal_loss",
    "centernet_focal_loss_backward",
    "centernet_targets",
    "centernet_workspace",
]

#: Scratch slot of the focal loss's sums [3] (positive terms, negative terms, positives), in A.
FOCAL_SUMS_SLOT = "centernet_focal_sums"
#: Scratch slot of centernet_targets' labels as int64 (for labels of another integer dtype).
TARGETS_LABELS_SLOT = "centernet_labels"


class CenterNetDecodeParams(NamedTuple):
    batch: int
    classes: int
    height: int
    width: int
    k: int
    kernel: int
    cat_spec_wh: bool
    has_reg: bool
    down_ratio: float
    has_threshold: bool
    threshold: float  # ignored when has_threshold is False


class CenterNetTargetsParams(NamedTuple):
    batch: int
    max_boxes: int
    num_classes: int
    out_h: int
    out_w: int
    down_ratio: float
    min_overlap: float
    max_objects: int


class FocalLossParams(NamedTuple):
    alpha: float
    beta: float


class CenterNetTargets(NamedTuple):
    """Training targets of :func:`centernet_targets` (A = float32 or float64, the boxes' dtype).

    heatmap: A [B, num_classes, out_h, out_w]; wh: A [B, max_objects, 2] (w, h);
    reg: A [B, max_objects, 2] (sub-pixel centre offset x, y); ind: int64 [B, max_objects]
    (y * out_w + x of the integer centre); reg_mask: uint8 [B, max_objects] (1 = object).
    """

    heatmap: object
    wh: object
    reg: object
    ind: object
    reg_mask: object


def centernet_workspace(kernels, params, dtype, *, labels_dtype=None, shape=None, backward=False):
    """The buffers one CenterNet driver call takes, ``(outputs, scratch)``, each
    ``{slot: (shape, dtype)}``: the drivers request theirs from this plan, and a caller that owns
    the memory (:mod:`pydeform.jax`) sizes its buffers with it. ``params`` picks the op:

    - :class:`CenterNetDecodeParams` (``dtype``: heat's): output ``"output"`` [B, K, 6] A; scratch
      the kernel set's ``decode_workspace`` (none when B or K is 0).
    - :class:`CenterNetTargetsParams` (``dtype``: the boxes', ``labels_dtype``: the labels'):
      outputs ``"heatmap"``, ``"wh"``, ``"reg"``, ``"ind"``, ``"reg_mask"`` (the fields of
      :class:`CenterNetTargets`); scratch the labels as int64 unless they are int64.
    - :class:`FocalLossParams` (``dtype``: pred's, ``shape``: pred's): output ``"output"`` (the
      0-d loss), or ``"grad_pred"`` ``shape`` with ``backward``; scratch the sums [3] A (the
      gradient of an empty pred needs none) and the kernel set's ``focal_loss_workspace``.
    """
    acc = accumulation_dtype(dtype)
    if isinstance(params, CenterNetDecodeParams):
        outputs = {"output": ((params.batch, params.k, 6), acc)}
        work = kernels.decode_workspace(params, dtype) if params.batch and params.k else {}
        return outputs, work
    if isinstance(params, CenterNetTargetsParams):
        batch, objects = params.batch, params.max_objects
        outputs = {
            "heatmap": ((batch, params.num_classes, params.out_h, params.out_w), np.dtype(dtype)),
            "wh": ((batch, objects, 2), np.dtype(dtype)),
            "reg": ((batch, objects, 2), np.dtype(dtype)),
            "ind": ((batch, objects), np.dtype(np.int64)),
            "reg_mask": ((batch, objects), np.dtype(np.uint8)),
        }
        converted = np.dtype(labels_dtype) != np.int64
        work = {TARGETS_LABELS_SLOT: ((batch, params.max_boxes), np.dtype(np.int64))} if converted else {}
        return outputs, work
    size = math.prod(shape)
    outputs = {"grad_pred": (tuple(shape), np.dtype(dtype))} if backward else {"output": ((), np.dtype(dtype))}
    work = {FOCAL_SUMS_SLOT: ((3,), acc)} if size or not backward else {}
    if size:
        work.update(kernels.focal_loss_workspace(size, dtype, backward=backward))
    return outputs, work


def _bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return bool(value)


def _require(**arrays):
    for name, value in arrays.items():
        if value is None:
            raise TypeError(f"{name}: expected an array, got None")


def _check_shape(name, shape, expected):
    shape = tuple(int(d) for d in shape)
    if shape != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {shape}")


def centernet_decode_params(heat_shape, wh_shape, reg_shape, K, kernel, cat_spec_wh, down_ratio,
                            threshold) -> CenterNetDecodeParams:
    """Check :func:`centernet_decode`'s shapes (``reg_shape`` None without reg) and scalars; the
    array API and :mod:`pydeform.jax` (at trace time) share these rules."""
    batch, classes, height, width = heat_shape
    if min(classes, height, width) < 1:
        raise ValueError(f"heat: expected at least one class and 1x1 pixels, got shape {tuple(heat_shape)}")
    cat_spec_wh = _bool("cat_spec_wh", cat_spec_wh)
    _check_shape("wh", wh_shape, (batch, 2 * classes if cat_spec_wh else 2, height, width))
    if reg_shape is not None:
        _check_shape("reg", reg_shape, (batch, 2, height, width))
    K = check_int("K", K, minimum=0)
    kernel = check_int("kernel", kernel, minimum=1)
    if kernel % 2 == 0:
        raise ValueError(f"kernel: expected an odd window size, got {kernel}")
    down_ratio = check_positive_float("down_ratio", down_ratio)
    has_threshold = threshold is not None
    threshold = check_finite_float("threshold", threshold) if has_threshold else 0.0
    return CenterNetDecodeParams(batch, classes, height, width, K, kernel, cat_spec_wh, reg_shape is not None,
                                 down_ratio, has_threshold, threshold)


def centernet_targets_params(labels_shape, num_classes, output_size, down_ratio, min_overlap,
                             max_objects) -> CenterNetTargetsParams:
    """Check :func:`centernet_targets`' scalars for labels of shape ``[B, M]``; shared with
    :mod:`pydeform.jax` like :func:`centernet_decode_params`."""
    batch, max_boxes = labels_shape
    num_classes = check_int("num_classes", num_classes, minimum=1)
    out_h, out_w = int_pair("output_size", output_size, minimum=1)
    down_ratio = check_positive_float("down_ratio", down_ratio)
    min_overlap = check_finite_float("min_overlap", min_overlap)
    if not 0 < min_overlap < 1:
        raise ValueError(f"min_overlap: expected a number in (0, 1), got {min_overlap!r}")
    max_objects = check_int("max_objects", max_objects, minimum=1)
    return CenterNetTargetsParams(batch, max_boxes, num_classes, out_h, out_w, down_ratio, min_overlap, max_objects)


@dlpack_entry
def centernet_decode(heat, wh, reg=None, K=100, *, kernel=3, cat_spec_wh=False, down_ratio=1.0,
                     threshold=None, backend=None):
    """Decode CenterNet heatmaps into the top-K detections of each image (docs/centernet.md).

    A pixel is a peak iff it equals the maximum of its ``kernel`` x ``kernel`` window (outside
    the map counts as -inf; plateaus keep every equal maximum); other pixels score 0. The K best
    scores of each image over all classes and pixels are taken, equal scores by the lowest flat
    index ``c*H*W + y*W + x``. Box centre: ``(x + reg[0], y + reg[1])``, or ``(x + 0.5,
    y + 0.5)`` without reg; box = centre -/+ (w, h) / 2, times ``down_ratio``.

    Args:
        heat (Tensor[B, C, H, W]): class scores (already through a sigmoid), C, H, W >= 1.
        wh (Tensor[B, 2, H, W] or Tensor[B, 2C, H, W]): box sizes (w, h); with ``cat_spec_wh``
            class c's pair is channels 2c, 2c + 1.
        reg (Tensor[B, 2, H, W], optional): sub-pixel centre offsets (x, y).
        K (int): detections per image, >= 0; slots past C*H*W are (0, 0, 0, 0, 0, -1).
        kernel (int): odd peak window size >= 1.
        cat_spec_wh (bool): class-specific sizes.
        down_ratio (float): positive factor from feature-map to input-image units.
        threshold (float, optional): detections scoring below it get score 0 and class -1.
        backend: None, "cupy" or "numba" (keyword-only).

    Returns:
        Tensor[B, K, 6]: rows (x1, y1, x2, y2, score, class) in the accumulation dtype of heat
        (float64 for float64, else float32).
    """
    _require(heat=heat, wh=wh)
    library, dtype = check_arrays({"heat": heat, "wh": wh, "reg": reg}, ranks={"heat": 4, "wh": 4, "reg": 4})
    kind = check_backend(backend, library)
    params = centernet_decode_params(shape_of(heat), shape_of(wh), None if reg is None else shape_of(reg), K,
                                     kernel, cat_spec_wh, down_ratio, threshold)
    kernels = centernet_kernels(library, kind)
    xp = kernels.xp
    outputs, _ = centernet_workspace(kernels, params, dtype)
    detections = output(xp, "output", *outputs["output"])
    if detections.size:
        kernels.decode(xp.ascontiguousarray(heat), xp.ascontiguousarray(wh),
                       None if reg is None else xp.ascontiguousarray(reg), detections, params)
    return detections


def _check_labels(labels, library, boxes):
    lib = array_library("labels", labels)
    if lib != library:
        raise TypeError(f"labels: expected a {library} array like boxes, got a {lib} array")
    if library == "cupy" and labels.device.id != boxes.device.id:
        raise ValueError(f"labels: expected an array on GPU {boxes.device.id} like boxes, got GPU {labels.device.id}")
    if np.dtype(labels.dtype).kind not in "iu":
        raise TypeError(f"labels: expected an integer dtype, got {np.dtype(labels.dtype).name}")
    if labels.ndim != 2:
        raise ValueError(f"labels: expected a 2-d array [B, M], got shape {shape_of(labels)}")


@dlpack_entry
def centernet_targets(boxes, labels, num_classes, output_size, *, down_ratio=4, min_overlap=0.7,
                      max_objects=128, backend=None):
    """CenterNet training targets of a padded batch of boxes (docs/centernet.md).

    Boxes are divided by ``down_ratio`` and clipped to the output grid; an object with a
    clipped height or width <= 0 is skipped. Each object draws a Gaussian of radius
    ``max(0, int(r))`` (r the original code's radius for ``min_overlap``, of the box size rounded
    up; sigma = (2 radius + 1) / 6) around its integer centre ``int(centre)`` into its class's
    heatmap, the element-wise maximum where Gaussians overlap. Object m (m < max_objects) fills
    slot m of wh, reg, ind and reg_mask; objects m >= max_objects and padding leave theirs zero.

    Args:
        boxes (Tensor[B, M, 4]): float32 or float64 (x1, y1, x2, y2) in input-image pixels;
            finite wherever the label is not -1.
        labels (Tensor[B, M]): integer class ids in [0, num_classes), -1 for padding.
        num_classes (int): heatmap channels, >= 1.
        output_size (int or (int, int)): (out_h, out_w) of the heatmap.
        down_ratio (float): positive input-to-output scale (keyword-only, as the rest).
        min_overlap (float): in (0, 1), the overlap the radius rule guarantees.
        max_objects (int): slots per image, >= 1.

    Returns:
        CenterNetTargets: heatmap [B, num_classes, out_h, out_w], wh [B, max_objects, 2],
        reg [B, max_objects, 2] (all the boxes' dtype), ind int64 [B, max_objects],
        reg_mask uint8 [B, max_objects].
    """
    _require(boxes=boxes, labels=labels)
    library = array_library("boxes", boxes)
    if np.dtype(boxes.dtype).name not in ("float32", "float64"):
        raise TypeError(f"boxes: expected dtype float32 or float64, got {np.dtype(boxes.dtype).name}")
    if boxes.ndim != 3 or boxes.shape[2] != 4:
        raise ValueError(f"boxes: expected shape [B, M, 4], got {shape_of(boxes)}")
    _check_labels(labels, library, boxes)
    _check_shape("labels", shape_of(labels), shape_of(boxes)[:2])
    kind = check_backend(backend, library)
    params = centernet_targets_params(shape_of(labels), num_classes, output_size, down_ratio, min_overlap,
                                      max_objects)
    num_classes = params.num_classes

    kernels = centernet_kernels(library, kind)
    xp = kernels.xp
    boxes = xp.ascontiguousarray(boxes)
    labels = xp.ascontiguousarray(labels)
    if values_checked():
        # One device-to-host transfer of a flag on the GPU. Checked before the int64 conversion,
        # which would wrap unsigned labels of 2**63 and more to negative (padding) values.
        check_target_values(boxes, labels, num_classes, xp)
    outputs, work = centernet_workspace(kernels, params, boxes.dtype, labels_dtype=labels.dtype)
    if TARGETS_LABELS_SLOT in work:
        converted = scratch(xp, TARGETS_LABELS_SLOT, *work[TARGETS_LABELS_SLOT])
        converted[...] = labels
        labels = converted
    targets = CenterNetTargets(**{slot: output(xp, slot, *spec, zero=True) for slot, spec in outputs.items()})
    if params.batch and params.max_boxes:
        kernels.targets(boxes, labels, *targets, params)
    return targets


def check_target_values(boxes, labels, num_classes: int, xp) -> None:
    """Raise ``ValueError`` naming the first object of ``boxes [B, M, 4]`` / ``labels [B, M]``
    (``xp`` arrays) whose label is outside ``[-1, num_classes)`` or, unless it is -1, whose box
    is not finite."""
    if not labels.size:
        return
    bad_label = (labels < -1) | (labels >= num_classes)
    bad_box = (labels >= 0) & ~xp.isfinite(boxes).all(axis=2)
    if bool((bad_label | bad_box).any()):
        b, m = (int(i) for i in np.unravel_index(int(xp.argmax(bad_label | bad_box)), labels.shape))
        raise ValueError(
            f"labels / boxes: object [{b}, {m}] has label {int(labels[b, m])} and box "
            f"{[float(v) for v in boxes[b, m].tolist()]}; expected a label in [-1, {num_classes}) "
            f"and, unless the label is -1, finite coordinates"
        )


def _focal_call(pred, target, alpha, beta, backend, grad_output=None):
    """Shared checks of the focal loss and its gradient: (kernel set, pred, target, params)."""
    _require(pred=pred, target=target)
    # grad_output (backward only) may be 0-d or [1]; its shape is checked by the caller.
    arrays = {"pred": pred, "target": target, "grad_output": grad_output}
    ranks = {"pred": 4, "target": 4, "grad_output": getattr(grad_output, "ndim", 0)}
    library, _ = check_arrays(arrays, ranks=ranks)
    _check_shape("target", shape_of(target), shape_of(pred))
    kind = check_backend(backend, library)
    params = FocalLossParams(_non_negative("alpha", alpha), _non_negative("beta", beta))
    kernels = centernet_kernels(library, kind)
    xp = kernels.xp
    target = xp.ascontiguousarray(target)
    if target.size and values_checked():
        # One device-to-host transfer of a flag on the GPU; written so that NaN counts as outside.
        outside = ~((target >= 0) & (target <= 1))
        if bool(outside.any()):
            index = tuple(int(i) for i in np.unravel_index(int(xp.argmax(outside)), target.shape))
            raise ValueError(
                f"target: element {list(index)} is {float(target[index])}; expected values in [0, 1] "
                f"(a heatmap like centernet_targets' one)"
            )
    return kernels, xp.ascontiguousarray(pred), target, params


def _non_negative(name, value):
    value = check_finite_float(name, value)
    if value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return value


def _focal_sums(kernels, pred, target, params, work):
    """The focal loss's sums in their planned scratch slot (``work`` from centernet_workspace)."""
    sums = scratch(kernels.xp, FOCAL_SUMS_SLOT, *work[FOCAL_SUMS_SLOT])
    if pred.size:
        kernels.focal_loss_sums(pred, target, sums, params)
    else:
        sums.fill(0)
    return sums


@dlpack_entry
def centernet_focal_loss(pred, target, *, alpha=2, beta=4, backend=None):
    """The penalty-reduced pixel-wise focal loss of CenterNet (docs/centernet.md).

    With p = clip(pred, 1e-4, 1 - 1e-4) and y = target: positives (y == 1) add
    ``-log(p) (1 - p)^alpha``, negatives (y < 1) add ``-log(1 - p) p^alpha (1 - y)^beta``; the
    sum is divided by the number of positives (1 when there are none). Deterministic.

    Args:
        pred (Tensor[B, C, H, W]): predicted heatmap.
        target (Tensor[B, C, H, W]): target heatmap (see :func:`centernet_targets`), pred's dtype.
        alpha, beta (float): finite exponents >= 0 (keyword-only).

    Returns:
        Tensor[]: the loss, a 0-d array of pred's dtype.
    """
    kernels, pred, target, params = _focal_call(pred, target, alpha, beta, backend)
    xp = kernels.xp
    outputs, work = centernet_workspace(kernels, params, pred.dtype, shape=pred.shape)
    sums = _focal_sums(kernels, pred, target, params, work)
    # (positive + negative terms) / max(positives, 1) in A, in place in the sums (slices, not
    # elements: NumPy would give scalars), then cast into the 0-d output.
    total, positives = sums[0:1], sums[2:3]
    xp.add(total, sums[1:2], out=total)
    xp.maximum(positives, 1, out=positives)
    xp.divide(total, positives, out=total)
    loss = output(xp, "output", *outputs["output"])
    loss[...] = total.reshape(())
    return loss


@dlpack_entry
def centernet_focal_loss_backward(grad_output, pred, target, *, alpha=2, beta=4, backend=None):
    """Gradient of :func:`centernet_focal_loss` with respect to pred.

    The clamp passes the gradient where 1e-4 <= pred <= 1 - 1e-4 (bounds in the accumulation
    dtype) and blocks it outside, as torch.clamp does.

    Args:
        grad_output (Tensor[] or Tensor[1], or a number): gradient of the loss; an array has
            pred's dtype, a Python or NumPy number is taken in pred's dtype.
        pred, target (Tensor[B, C, H, W]): as for the loss.

    Returns:
        Tensor[B, C, H, W]: gradient of the loss with respect to pred, pred's dtype.
    """
    _require(grad_output=grad_output)
    number = isinstance(grad_output, numbers.Real) and not isinstance(grad_output, bool)
    kernels, pred, target, params = _focal_call(pred, target, alpha, beta, backend,
                                                None if number else grad_output)
    xp = kernels.xp
    if number:
        grad_output = xp.asarray(grad_output, dtype=pred.dtype)
    if shape_of(grad_output) not in ((), (1,)):
        raise ValueError(f"grad_output: expected shape () or (1,), got {shape_of(grad_output)}")
    outputs, work = centernet_workspace(kernels, params, pred.dtype, shape=pred.shape, backward=True)
    grad_pred = output(xp, "grad_pred", *outputs["grad_pred"])
    if pred.size:
        sums = _focal_sums(kernels, pred, target, params, work)
        kernels.focal_loss_grad(xp.ascontiguousarray(grad_output).reshape(()), pred, target, sums, grad_pred,
                                params)
    return grad_pred
