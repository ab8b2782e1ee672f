"""Argument rules shared by the RoI ops: the boxes and scalar parameters, and the two limits
that bound the work of one output element (docs/roi.md, "Bounded work")."""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._arrays import accumulation_dtype, array_library, check_int, values_checked

__all__ = [
    "COORDINATE_LIMIT", "MAX_SAMPLES_PER_AXIS", "boxes_from_lists", "check_box_dtype", "check_positive_float",
    "check_roi_values", "check_samples_per_axis", "normalize_rois",
]

# The most samples a bin takes along each axis: the largest sampling_ratio / sample_per_part a
# call may ask for, and the cap of adaptive sampling's ceil(bin size). Every backend and the
# reference apply it; the CUDA C copy is roi.cu's kMaxSamplesPerAxis.
MAX_SAMPLES_PER_AXIS = 1024
# A roi whose corners, scaled by spatial_scale (in the accumulation dtype), are not all within
# [-COORDINATE_LIMIT, COORDINATE_LIMIT] feature-map pixels is invalid: 0 outputs, no gradient. No
# feature map is that large, float32 cannot tell whole pixels apart there, and within it every
# bin size, sample count and rounded corner of every op is finite and fits an int64 exactly.
# The CUDA C copy is roi.cu's kCoordinateLimit.
COORDINATE_LIMIT = float(2**24)


def check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite positive number, got {value!r}")
    return float(value)


def check_box_dtype(name: str, dtype, input_dtype) -> None:
    """Boxes have the input's dtype or its accumulation dtype (float32 for half types)."""
    allowed = sorted({np.dtype(input_dtype).name, accumulation_dtype(input_dtype).name})
    if np.dtype(dtype).name not in allowed:
        raise TypeError(f"{name}: expected dtype {' or '.join(allowed)} like input, got {np.dtype(dtype).name}")


def boxes_from_lists(rois, asarray):
    """``rois`` with its lists of numbers made arrays by ``asarray(float64 NumPy array)``.

    A list of rows of numbers (``[[batch_index, x1, y1, x2, y2], ...]``) becomes one ``[K, 5]``
    array; the items of a per-image list that are lists of rows (``[[x1, y1, x2, y2], ...]``, or
    ``[]`` for an image without boxes) become ``[L_i, 4]`` arrays. Arrays stay as they are.
    """
    if not isinstance(rois, (list, tuple)):
        return rois
    if rois and all(_is_row(item) for item in rois):
        return _rows_array("rois", rois, asarray)
    return type(rois)(
        _rows_array(f"rois[{i}]", item, asarray) if isinstance(item, (list, tuple)) else item
        for i, item in enumerate(rois)
    )


def _is_row(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)


def _rows_array(name: str, rows, asarray):
    if not rows:
        return asarray(np.zeros((0, 4)))
    if not all(_is_row(row) for row in rows) or len({len(row) for row in rows}) != 1:
        raise TypeError(f"{name}: expected an array, or a list of rows of numbers of one length, got {rows!r}")
    return asarray(np.array(rows, dtype=np.float64))


def check_samples_per_axis(name: str, value, minimum=None) -> int:
    """An int argument that sets the samples per bin and axis: at most MAX_SAMPLES_PER_AXIS."""
    value = check_int(name, value, minimum)
    if value > MAX_SAMPLES_PER_AXIS:
        raise ValueError(
            f"{name}: expected at most {MAX_SAMPLES_PER_AXIS} samples per bin and axis, got {value!r}"
        )
    return value


def normalize_rois(rois, input, library: str, xp):
    """Return the boxes as a C-contiguous ``[K, 5]`` array in the accumulation dtype of ``input``.

    ``rois`` is ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` or a list/tuple of per-image
    ``[L_i, 4]`` arrays whose list position is the batch index; either may be given as Python
    lists of numbers (:func:`boxes_from_lists`). Boxes may have the input's dtype
    or, for float16 / bfloat16 inputs, float32 (coordinates of a few hundred pixels are not
    representable in bfloat16). A batch index that is not an integer in ``[0, N)`` or a
    non-finite coordinate raises ``ValueError`` naming the first offending row; for CuPy arrays
    this check costs one device-to-host transfer of a flag, and it is skipped inside
    :func:`pydeform._arrays.unchecked_values` (the kernels then give such a row 0 outputs).
    """
    acc = accumulation_dtype(input.dtype)

    def check_part(name, part, columns):
        lib = array_library(name, part)
        if lib != library:
            raise TypeError(f"{name}: expected a {library} array like input, got a {lib} array")
        if library == "cupy" and part.device.id != input.device.id:
            raise ValueError(f"{name}: expected an array on GPU {input.device.id} like input, got GPU {part.device.id}")
        check_box_dtype(name, part.dtype, input.dtype)
        if part.ndim != 2 or part.shape[1] != columns:
            raise ValueError(f"{name}: expected shape [K, {columns}], got {tuple(part.shape)}")
        return part.astype(acc, copy=False)

    rois = boxes_from_lists(rois, lambda host: xp.asarray(host.astype(acc)))
    if isinstance(rois, (list, tuple)):
        parts = []
        for i, boxes in enumerate(rois):
            boxes = check_part(f"rois[{i}]", boxes, 4)
            index = xp.full((boxes.shape[0], 1), i, dtype=acc)
            parts.append(xp.concatenate([index, boxes], axis=1))
        boxes = xp.concatenate(parts, axis=0) if parts else xp.empty((0, 5), dtype=acc)
    else:
        boxes = check_part("rois", rois, 5)
    boxes = xp.ascontiguousarray(boxes)
    if values_checked():
        check_roi_values(boxes, input.shape[0], xp)
    return boxes


def check_roi_values(boxes, n: int, xp) -> None:
    """Raise ``ValueError`` naming the first ``[K, 5]`` row of ``boxes`` (an ``xp`` array) whose
    batch index is not an integer in ``[0, n)`` or that has a non-finite coordinate."""
    if not boxes.shape[0]:
        return
    index = boxes[:, 0]
    bad = (index != xp.floor(index)) | ~(index >= 0) | ~(index < n) | ~xp.isfinite(boxes[:, 1:]).all(axis=1)
    if bool(bad.any()):
        row = int(xp.argmax(bad))
        raise ValueError(
            f"rois: row {row} = {[float(v) for v in boxes[row].tolist()]} must have an integer batch index "
            f"in [0, {n}) and finite coordinates"
        )
